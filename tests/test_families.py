"""Beyond the eleven registered families: each failure class of issue 16 at its cause, and a fast subset of
bench/coverage.py's timm families (the full sweep is the bench script; its table is docs/COVERAGE.md)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import align
from compress.alignment.blocks import find_blocks
from compress.alignment.graph import trace
from compress.alignment.spaces import find_spaces
from compress.registry import create_model
from fuse.stats import CrossStats

from .helpers import perturb_

COVERAGE = json.loads((Path(__file__).resolve().parents[1] / "bench" / "coverage_models.json").read_text())
# one family per failure class the issue names, plus cheap representatives of other timm module styles
FAST = ["pvt_v2", "maxxvit", "beit", "tiny_vit", "metaformer", "efficientvit_mit", "levit", "regnet", "densenet",
        "efficientnet", "xcit", "cait"]


def coverage_model(family: str, seed: int = 0):
    name, kwargs, size = COVERAGE[family]
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, **kwargs).eval(), name, kwargs, size


@pytest.mark.parametrize("family", FAST)
def test_permuting_every_space_keeps_the_logits(family):
    """The check that catches a wrong space (class 4: MaxViT's per-head bias passed as SDPA's mask), on every
    family of the fast subset, with its blocks found."""
    model, name, kwargs, size = coverage_model(family)
    perturb_(model)
    x = torch.randn(4, 3, size, size)
    al = align(model, size)
    sg = al.spaces
    assert sg.spaces and al.blocks and al.stages
    twin = create_model(name, num_classes=10, **kwargs).eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(1))))
    with torch.no_grad():
        y = model(x)
        err = (twin(x) - y).abs().max().item() / max(1.0, y.abs().max().item())
    assert err < 1e-4


def test_blocks_called_with_extra_arguments_are_found():
    """Class 1: PVT-v2 calls its blocks as `block(x, feat_size)`."""
    model, _, _, size = coverage_model("pvt_v2")
    blocks = find_blocks(model, torch.randn(1, 3, size, size))
    assert len(blocks) == sum(len(s.blocks) for s in model.stages)  # every block, each with its attention branch
    assert all(b.branch("attn") is not None for b in blocks)


@pytest.mark.parametrize("family", ["regnet", "densenet"])
def test_blocks_held_as_plain_attributes_or_in_a_dict_are_found(family):
    """Class 3: RegNet's stages hold blocks as attributes (`s1.b1`), DenseNet's dense blocks are ModuleDicts
    inside the `features` Sequential (which is also where the stem is)."""
    model, _, _, size = coverage_model(family)
    names = [b.name for b in find_blocks(model, torch.randn(1, 3, size, size))]
    if family == "regnet":
        expected = [f"{s}.{b}" for s in ("s1", "s2", "s3", "s4") for b, _ in getattr(model, s).named_children()]
    else:
        expected = [f"features.denseblock{i}.{n}" for i in (1, 2, 3, 4)
                    for n, _ in getattr(model.features, f"denseblock{i}").named_children()]
        names = [n for n in names if ".denseblock" in n]  # (and the transitions between them)
    assert names == expected


def test_tracing_a_model_with_a_shared_parameter_leaves_it_intact():
    """Class 2: a parameter registered under two names must come back as itself, not as a FakeTensor."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    x = torch.randn(2, 4)
    before = model(x)
    params = [id(p) for p in model.parameters()]
    trace(model, x)
    assert [id(p) for p in model.parameters()] == params and model.a.weight is model.b.weight
    assert torch.equal(model(x), before)


def test_a_metaformer_head_is_not_a_block_and_safe_softmax_is_attention():
    """Class 3: PoolFormer's `head` Sequential is no block (nor a bridge); TinyViT's `_safe_softmax` attends."""
    model, _, _, size = coverage_model("metaformer")
    names = [b.name for b in find_blocks(model, torch.randn(1, 3, size, size))]
    assert names and not any(n.startswith("head") for n in names)
    model, _, _, size = coverage_model("tiny_vit")
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    assert "_safe_softmax" not in sg.unknown_ops
    blocks = find_blocks(model, torch.randn(1, 3, size, size))
    # TinyViT's attention blocks also run a local depthwise conv: conv + attention in one block is a bridge
    kinds = {b.name: b.kind for b in blocks}
    assert {k for n, k in kinds.items() if n.startswith("stages.0.")} == {"conv"}  # MBConvs
    assert {k for n, k in kinds.items() if not n.startswith("stages.0.")} == {"bridge"}


def test_linear_attention_without_a_softmax_is_attention():
    """Class 3: EfficientViT (MIT)'s ReLU linear attention multiplies two activations and has no softmax."""
    model, _, _, size = coverage_model("efficientvit_mit")
    kinds = {b.kind for b in find_blocks(model, torch.randn(1, 3, size, size))}
    assert kinds & {"attention", "bridge"}, kinds


def test_beit_qkv_bias_concatenation_keeps_head_spaces():
    """Class 5: BEiT's qkv bias is cat(q_bias, k_bias, v_bias) viewed as (3, heads, head_dim): its heads and
    head_dim stay free spaces, shared by the weight rows and the three bias parts."""
    model, _, _, size = coverage_model("beit")
    sg = find_spaces(model, torch.randn(1, 3, size, size))
    heads = model.blocks[0].attn.num_heads
    qkv = [s for s in sg.spaces if "blocks.0.attn.qkv.weight" in s.tensors]
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= {t for s in qkv for t in s.tensors}
    assert heads in {s.size for s in qkv}


def test_correlation_of_constant_activations_is_bounded_and_flagged():
    """Class 6: a neuron that never varies gets correlation 0 (not a value far outside [-1, 1])."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 4, generator=g)
    a[:, 0] = 3.0  # constant
    b = a.clone() + 0.1 * torch.randn(256, 4, generator=g)
    st = CrossStats(4, 4)
    st.update(a, b)
    corr = st.correlation()
    assert corr.abs().max() <= 1 and corr[0].abs().max() == 0 and st.degenerate == (1, 0)
    assert corr[1, 1] > 0.9


def test_fusion_of_a_constant_space_is_matched_on_weights_and_says_so():
    from fuse import FuseConfig, fuse_models

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    models = [Net().eval(), Net().eval()]
    for m in models:
        with torch.no_grad():
            m.fc1.weight.zero_()  # every hidden unit outputs its bias: constant over the images
    _, report = fuse_models(models, torch.randn(64, 8), FuseConfig(ground="acts", calib=64, batch_size=32, repair=False))
    assert any("fc1.weight:0" in f and "constant" in f and "matched on weights" in f for f in report.fallbacks), \
        report.fallbacks


def test_weight_range_search_keeps_min_max_where_the_error_is_flat():
    """Class 7: with a zero gradient on a channel (its Hessian-weighted error flat in the range), the search
    keeps the min-max range instead of the grid's floor (1% of the range)."""
    from quantize.config import SearchConfig
    from quantize.engine import Record, Site
    from quantize.quantizers import Uniform
    from quantize.search import search

    site = Site("fc", "linear", "fc", ["a", "w"])
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, 8, generator=g), torch.randn(16, 8, generator=g)
    out = x @ w.T
    grad = torch.ones_like(out)
    grad[:, 2] = 0  # channel 2 does not matter to the loss on these images
    rec = Record({"a": x, "w": w}, (), out, grad)
    q = Uniform(8, True, axis=0, channels=4)
    search(site, rec, {"w": q}, "w", SearchConfig())
    span = w.abs().amax(1)
    minmax = Uniform(8, True, axis=0, channels=4).set_range(-span, span)
    assert torch.allclose(q.scale[2], minmax.scale[2])  # min-max on the flat channel
    assert (q.scale > 0.3 * minmax.scale).all()


def test_a_wrong_rule_is_caught_by_the_invariance_check_and_its_space_dropped(monkeypatch):
    """No silent wrong answer: were an op's rule wrong (here `flip` is declared elementwise, though it reads the
    feature axis by position), `find_spaces` finds out on the model itself and drops the space it broke."""
    from compress.alignment import spaces

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc3(torch.relu(self.fc2(h.flip(-1))))

    monkeypatch.setitem(spaces._RULES, "flip", spaces._same)
    model, x = Net().eval(), torch.randn(4, 6)
    raw = find_spaces(model, x[:1], verify=False)
    checked = find_spaces(model, x[:1])
    assert checked.rejected == ["fc1.weight:0"] and len(checked.spaces) == len(raw.spaces) - 1
    twin = Net().eval()
    twin.load_state_dict(checked.permute_state(model.state_dict(), checked.random_permutations()))
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    # a second copy of the architecture (fusion's anchor) takes the verdict over without checking again
    inherited = find_spaces(Net().eval(), x[:1], verify=checked)
    assert inherited.rejected == checked.rejected
    assert [s.name for s in inherited.spaces] == [s.name for s in checked.spaces]
