"""Shared helpers for the tests."""

import torch

from compress import create_model
from compress.registry import default_img_size

# timm's resnet18 at a sixteenth of its channels (0.7 M parameters instead of 11 M): what tests train
SLIM_RESNET = {"channels": (16, 32, 64, 128)}
SLIM_RESNET_ARGS = "channels=16x32x64x128"

FAMILIES = ["vit", "deit", "swin", "resnet", "convnext", "mobilevit", "mobilevitv2", "efficientformer",
            "efficientformerv2", "mixer", "resmlp"]


def small_model(arch: str):
    """A registered alias in eval mode, with its input size."""
    return create_model(arch, num_classes=10).eval(), default_img_size(arch)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Break the symmetric init (norm weights at 1, zero biases, zero heads) so a wrong permutation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                scale = t.std().item() if t.numel() > 1 and t.std() > 0 else 0.1
                t.add_(0.2 * scale * noise)


def permuted_copy(arch: str, model: torch.nn.Module, size: int, seed: int = 5) -> torch.nn.Module:
    """A fresh `arch` holding `model`'s weights with every space randomly permuted (same function)."""
    from compress.alignment.spaces import find_spaces

    sg = find_spaces(model, torch.randn(1, 3, size, size))
    twin = create_model(arch, num_classes=10).eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(seed))))
    return twin


def assert_same_function(arch: str, state: dict, model: torch.nn.Module, size: int, atol: float = 1e-4) -> None:
    """A fresh `arch` loaded with `state` computes what `model` computes (max abs logit difference < atol)."""
    other = create_model(arch, num_classes=10).eval()
    other.load_state_dict(state)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max().item() < atol


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
