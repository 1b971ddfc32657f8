"""The alignment layer: spaces (permutation invariance), blocks (kinds, bridges) and taps (NCHW)."""

import pytest
import torch

from compress import align, create_model
from compress.alignment.blocks import find_blocks
from compress.alignment.spaces import find_spaces

from .helpers import FAMILIES, perturb_, small_model


@pytest.mark.parametrize("arch", FAMILIES)
def test_random_permutation_of_every_space_keeps_logits(arch):
    model, size = small_model(arch)
    perturb_(model)
    x = torch.randn(4, 3, size, size)
    sg = find_spaces(model, x[:1])
    assert sg.unknown_ops == []
    assert len(sg.spaces) >= 4 and any(s.residual for s in sg.spaces)
    assert sg.coverage(model.state_dict()) > 0.9
    state = model.state_dict()
    permuted = sg.permute_state(state, sg.random_permutations(torch.Generator().manual_seed(1)))
    floats = [k for k, v in state.items() if v.dtype.is_floating_point and v.numel() > 1]
    moved = sum(not torch.equal(state[k], permuted[k]) for k in floats)
    assert moved / len(floats) > 0.7, "most tensors must actually be permuted"
    twin = create_model(arch, num_classes=10).eval()  # a fresh model: timm caches attention biases in eval
    twin.load_state_dict(permuted)
    with torch.no_grad():
        y, y2 = model(x), twin(x)
    assert (y - y2).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["vit", "resnet", "mobilevit"])
def test_permuting_part_of_a_space_breaks_the_model(arch):
    """The invariance test can fail: permuting a space on only some of its tensors changes the logits."""
    model, size = small_model(arch)
    perturb_(model)
    x = torch.randn(4, 3, size, size)
    sg = find_spaces(model, x[:1])
    space = max(sg.spaces, key=lambda s: len(s.tensors))
    perm = {space.id: torch.randperm(space.size, generator=torch.Generator().manual_seed(0))}
    state = model.state_dict()
    full = sg.permute_state(state, perm)
    half = dict(state)
    first = space.tensors[0]
    half[first] = full[first]  # only one member tensor moves
    twin = create_model(arch, num_classes=10).eval()
    twin.load_state_dict(half)
    with torch.no_grad():
        assert (model(x) - twin(x)).abs().max().item() > 1e-3


def test_vit_spaces_are_head_aware():
    model, size = small_model("vit")
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    qkv = [s for s in sg.spaces if s.name.startswith("blocks.0.attn.qkv.weight")]
    # heads (shared by q, k, v), head_dim of q and k (tied by the attention product), head_dim of v
    assert sorted(s.size for s in qkv) == [3, 32, 32]
    residual = [s for s in sg.spaces if s.residual]
    assert len(residual) == 1 and {"cls_token", "pos_embed", "head.weight"} <= set(residual[0].tensors)


@pytest.mark.parametrize("arch", ["mobilevit", "efficientformer"])
def test_bridge_blocks_are_found(arch):
    model, size = small_model(arch)
    blocks = find_blocks(model, torch.randn(1, 3, size, size))
    bridges = [b for b in blocks if b.kind == "bridge"]
    assert bridges, [(b.name, b.kind) for b in blocks]
    if arch == "mobilevit":  # the MobileViT blocks (conv -> tokens -> conv), not the inverted residuals
        assert {b.name for b in bridges} == {"stages.2.1", "stages.3.1", "stages.4.1"}
    else:  # the 4-D -> 3-D transition before the attention stage
        assert {b.name for b in bridges} == {"stages.3.blocks.0", "stages.3.blocks.2"}


@pytest.mark.parametrize("arch,kind", [("vit", "attention"), ("swin", "attention"), ("resnet", "conv"),
                                       ("convnext", "conv"), ("mixer", "mlp"), ("resmlp", "mlp")])
def test_block_kinds_of_plain_families(arch, kind):
    model, size = small_model(arch)
    blocks = find_blocks(model, torch.randn(1, 3, size, size))
    assert blocks and {b.kind for b in blocks} == {kind}
    assert [b.index for b in blocks] == list(range(len(blocks)))


@pytest.mark.parametrize("arch", FAMILIES)
def test_stage_taps_are_nchw_with_declared_channels(arch):
    model, size = small_model(arch)
    al = align(model, size)
    x = torch.randn(2, 3, size, size)
    feats = al.features(x)
    assert 3 <= len(feats) <= 4
    for f, s in zip(feats, al.stages):
        assert f.ndim == 4 and f.shape[0] == 2 and f.shape[1] == s.channels
    emb = al.embedding(x)
    assert emb.ndim == 4 and emb.shape[0] == 2


def test_vit_taps_match_the_blocks_tokens():
    """The NCHW tap of a ViT block is exactly that block's patch tokens (cls removed)."""
    model, size = small_model("vit")
    x = torch.randn(2, 3, size, size)
    store = {}
    h = model.blocks[1].register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    feats = align(model, size).features(x)
    model(x)
    h.remove()
    tokens = store["o"][:, 1:]  # drop cls
    assert torch.allclose(feats[1].flatten(2).transpose(1, 2), tokens, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_attention_maps_are_row_stochastic(arch):
    model, size = small_model(arch)
    maps = align(model, size).attention_maps(torch.randn(2, 3, size, size))
    assert maps
    for m in maps.values():
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
    assert all(getattr(mod, "fused_attn", False) in (True, False) for mod in model.modules())


@pytest.mark.parametrize("arch,streams", [("vit", 1), ("swin", 3), ("resnet", 4), ("convnext", 4), ("mixer", 1)])
def test_one_residual_stream_per_stage(arch, streams):
    """Residual = two input-dependent tensors added; a relative-position bias or a mask does not count."""
    model, size = small_model(arch)
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    assert sum(s.residual for s in sg.spaces) == streams


@pytest.mark.parametrize("arch", ["vit", "swin", "mobilevitv2", "efficientformerv2"])
def test_transport_with_permutation_matrices_equals_permutation(arch):
    model, size = small_model(arch)
    perturb_(model)
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    perms = sg.random_permutations(torch.Generator().manual_seed(2))
    # new[i] = old[p[i]]  <=>  new = old @ M with M[p[i], i] = 1
    mats = {k: torch.eye(len(p))[:, p] for k, p in perms.items()}
    maps = {k: {"in": m, "out": m} for k, m in mats.items()}
    a, b = sg.permute_state(model.state_dict(), perms), sg.transport_state(model.state_dict(), maps)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_roles_mark_contracted_axes():
    model, size = small_model("vit")
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    assert sg.roles[("blocks.0.mlp.fc2.weight", 1)] == "in" and sg.roles[("blocks.0.mlp.fc2.weight", 0)] == "out"
    assert sg.roles[("blocks.0.norm1.weight", 0)] == "out" and sg.roles[("patch_embed.proj.weight", 1)] == "in"


@pytest.mark.parametrize("arch,kinds", [("vit", ["attn", "mlp"]), ("swin", ["attn", "mlp"]), ("mixer", ["mlp", "mlp"]),
                                        ("resnet", []), ("convnext", []), ("mobilevit", [])])
def test_residual_branches_are_found_from_the_forward(arch, kinds):
    """A branch reads the residual stream through its pre-norm; ConvNeXt's norm between its depthwise conv
    and its MLP reads a sub-layer's output, so it is no branch (removing it would remove the block)."""
    model, size = small_model(arch)
    blocks = find_blocks(model, torch.randn(1, 3, size, size))
    assert [b.kind for b in blocks[0].branches] == kinds
    for b in blocks:
        for br in b.branches:
            assert br.norm and model.get_submodule(br.norm) is not None and model.get_submodule(br.module)


def test_blocks_called_with_extra_arguments_are_found():
    """Blocks are read from one real forward, with whatever arguments the model passes them."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x, scale: float):
            return x + scale * self.fc(self.norm(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x.flatten(1)[:, :4])
            for i, b in enumerate(self.blocks):
                x = b(x, 0.5 * i)
            return self.head(x)

    blocks = find_blocks(Net(), torch.randn(1, 3, 8, 8))
    assert [(b.name, b.kind) for b in blocks] == [("blocks.0", "mlp"), ("blocks.1", "mlp")]
    assert [br.module for br in blocks[1].branches] == ["blocks.1.fc"]
