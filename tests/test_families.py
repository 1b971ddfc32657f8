"""Beyond the eleven registered families: each failure class of issue 16 at its cause, and a fast subset of
bench/coverage.py's timm families (the full sweep is the bench script; its table is docs/COVERAGE.md)."""

import functools
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


class MLP(nn.Module):
    """fc2(relu(fc1(x))): the smallest network with one hidden space."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


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

    Net = MLP
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
    # and fusion says which spaces it averaged without aligning them
    from fuse import FuseConfig, fuse_models

    _, report = fuse_models([twin, model], torch.randn(16, 6), FuseConfig(ground="acts", calib=16, batch_size=8,
                                                                           repair=False))
    assert report.unaligned == ["fc1.weight:0"]


def test_a_few_constant_neurons_are_matched_on_their_own_weights():
    """Class 6, partly: three of eight hidden units constant over the calibration images (dead ReLUs of a
    random network) are tied for the activations; their own weights break the tie, so a permuted copy fuses
    back exactly (a wrong pair among them would change the output elsewhere) and the report says so."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(64, 8)
    with torch.no_grad():
        model.fc1.weight[:3] = 0  # units 0 to 2 output their biases, whatever the image
        model.fc1.bias[:3] = torch.tensor([0.5, 0.9, -0.7])
    report = _fused_with_a_permuted_copy_is_itself(model, Net, x, seed=0)
    assert any(f.startswith("fc1.weight:0: 3 of 8 neurons tied by their activations (3 constant")
               for f in report.fallbacks), report.fallbacks


def test_neurons_with_one_activation_up_to_scale_are_told_apart_by_their_weights():
    """LCNetV2: a hundred of a wide conv's channels fire on the same few positions, so their correlations are
    all 1 up to float32 noise (1e-6, which the cost's square root makes 1e-3) and the noise picked the pairs.
    Correlations within 1e-4 are now ties, broken by the weights: here four hidden units are positive multiples
    of one unit (correlation exactly 1), and a permuted copy fuses back exactly."""
    Net = functools.partial(MLP, hidden=12)
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(64, 8)
    with torch.no_grad():
        scale = torch.tensor([1.0, 1.7, 0.6, 2.3])[:, None]
        model.fc1.weight[:4] = scale * model.fc1.weight[:1]
        model.fc1.bias[:4] = scale[:, 0] * model.fc1.bias[0]
    report = _fused_with_a_permuted_copy_is_itself(model, Net, x, seed=3)
    assert any(f.startswith("fc1.weight:0: 4 of 12 neurons tied") for f in report.fallbacks), report.fallbacks


def test_a_flat_model_has_its_composite_children_as_blocks():
    """Class 3: NASNet-style cells registered on the model itself (no container, no stage module): the
    composite children between the stem and the head are the blocks."""
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return x + torch.relu(self.bn(self.conv(x)))

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            self.cell_0, self.cell_1, self.cell_2 = Cell(), Cell(), Cell()
            self.last_linear = nn.Linear(8, 10)

        def forward(self, x):
            x = self.cell_2(self.cell_1(self.cell_0(self.conv0(x))))
            return self.last_linear(x.mean((2, 3)))

    blocks = find_blocks(Flat().eval(), torch.randn(1, 3, 16, 16))
    assert [(b.name, b.kind) for b in blocks] == [("cell_0", "conv"), ("cell_1", "conv"), ("cell_2", "conv")]


def test_feature_info_written_for_a_wrapper_resolves_and_a_trunk_is_not_the_stem():
    """Gemma4-ViT: feature_info says `blocks.0` for `encoder.blocks.0`, and the first child with parameters
    (`encoder`) holds the whole trunk: the stem is `encoder.patch_embed`, the blocks are found, and OFA's
    stage taps reach them."""
    from compress.alignment.taps import embedding_module, feature_modules

    model, _, _, size = coverage_model("gemma4_vit")
    assert feature_modules(model)[0] == "encoder.blocks.0" and embedding_module(model) == "encoder.patch_embed"
    al = align(model, size)
    assert [b.name for b in al.blocks] == [f"encoder.blocks.{i}" for i in range(len(model.encoder.blocks))]
    assert all(b.kind == "attention" for b in al.blocks)
    assert _one_ofa_step(model, size)


def test_feature_info_in_the_singular_resolves_to_the_plural_module():
    """Twins: feature_info says `block.0` for `blocks.0`; the stage taps and TransKD's stage entries (the input
    of each stage's first block) must name modules the model has."""
    from compress.alignment.taps import feature_modules, logits_and_features

    model, _, _, size = coverage_model("twins")
    assert [f["module"] for f in model.feature_info][:2] == ["block.0", "block.1"]
    assert feature_modules(model)[:2] == ["blocks.0", "blocks.1"]
    al = align(model, size)
    assert all(e.startswith(s.module + ".") for e, s in zip(al.stage_entries, al.stages))
    x = torch.randn(2, 3, size, size)
    _, feats, embeds = logits_and_features(model, x, al.stages, al.stage_entries)
    assert len(embeds) == len(feats) == 4 and all(e.shape[0] == 2 for e in embeds)


def test_stages_the_classifier_lacks_come_from_forward_intermediates():
    """HRNet: its feature_info names the features-only wrapper's modules (`stage1`); distillation taps then
    take the model's own forward_intermediates in the same pass as its logits."""
    from compress.alignment.taps import canonical_stages, logits_and_features

    model, _, _, size = coverage_model("hrnet")
    x = torch.randn(2, 3, size, size)
    stages = canonical_stages(model)
    assert "stage1" in [s.module for s in stages] and not hasattr(model, "stage1")
    logits, feats, _ = logits_and_features(model, x, stages)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[s.index for s in stages], intermediates_only=True)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(feats, ref))
    assert _one_ofa_step(model, size)


def test_stages_named_by_missing_modules_are_placed_by_resolution():
    """MViTv2's feature_info says `block.N` for `stages.N`: its stages' blocks are found by their output's
    grid, so each stage's entry is its first block, and its blocks make it a token stage."""
    model, _, _, size = coverage_model("mvitv2")
    al = align(model, size)
    assert [s.module for s in al.stages] == [f"block.{i}" for i in range(4)]
    assert al.stage_entries == [f"stages.{i}.blocks.0" for i in range(4)]
    assert al.stage_families == ["token"] * 4 and not al.gaps()["stages_without_blocks"]


@pytest.mark.parametrize("family", ["hrnet", "mvitv2"])
def test_transkd_taps_a_segmentation_backbone_whose_stages_are_missing_modules(family):
    """A segmentation network over such a backbone exposes timm's forward_intermediates / forward_head, so
    distillation reads its stage maps and embeddings in the same pass as its logits."""
    from compress.alignment.taps import logits_and_features
    from compress.checkpoint import InputSpec
    from compress.segmentation import SegmentationNet
    from distill import DistillConfig, Distiller

    name, kwargs, size = COVERAGE[family]
    torch.manual_seed(0)
    student, teacher = (SegmentationNet(name, 10, kwargs, size) for _ in range(2))
    x = torch.randn(2, 3, size, size)
    d = Distiller(student, teacher.eval(), DistillConfig("transkd"), InputSpec(size), InputSpec(size), 10)
    with torch.no_grad():
        final, maps = student.eval().forward_intermediates(x, [s.index for s in student.stages])
        assert torch.equal(student.forward_head(final), student(x))
        logits, feats, embeds = logits_and_features(student, x, d.student_taps.all, d.student_taps.entries)
    assert torch.equal(logits, student(x)) and len(embeds) == 4
    assert all(torch.allclose(f, m, atol=1e-5) for f, m in zip(feats, maps))
    d.train()
    before = [p.detach().clone() for p in student.parameters()]
    loss = d(x, torch.randint(0, 10, (2, size, size)))
    loss.backward()
    torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01).step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_stage_returning_one_map_per_branch_gives_the_one_with_its_channels():
    """CrossViT's blocks return the tokens of both scales; a stage tap takes the one with its channels."""
    from compress.alignment.taps import _first

    small, large = torch.randn(2, 17, 96), torch.randn(2, 5, 192)
    assert _first([small, large], 192) is large and _first([small, large], 96) is small
    assert _first((small, (large,))) is small  # without channels: the first, as before


def _one_ofa_step(student: nn.Module, size: int) -> bool:
    from compress.checkpoint import InputSpec
    from distill import DistillConfig, Distiller

    teacher = create_model("resnet", num_classes=10, channels=(16, 32, 64, 128)).eval()
    d = Distiller(student, teacher, DistillConfig("ofa"), InputSpec(size), InputSpec(32), 10).train()
    before = [p.detach().clone() for p in student.parameters()]
    loss = d(torch.randn(2, 3, size, size), torch.tensor([1, 2]))
    loss.backward()
    torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01).step()
    return bool(torch.isfinite(loss)) and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_calibration_records_are_split_only_where_samples_are_independent():
    """Q-HyViT scores its candidates on the half of the batch they were not fitted on. CSATv2's last stage
    attends across the batch (a matmul of a batch x batch map): its records cannot be halved; a constant
    matrix with as many rows as the batch stays whole while its batch-major partner is halved."""
    from quantize.engine import Record, Site

    g = torch.Generator().manual_seed(0)
    across, v = torch.randn(8, 8, generator=g).softmax(-1), torch.randn(8, 49, generator=g)
    mixing = Site("attn", "matmul", "attn", ["a", "b"], shapes={"a": [1, 1], "b": [1, 49]})
    assert Record({"a": across, "b": v}, (), across @ v).halves(mixing) is None
    x, basis = torch.randn(8, 8, generator=g), torch.randn(8, 49, generator=g)
    fixed = Site("dct", "matmul", "dct", ["a", "b"], shapes={"a": [1, 8], "b": [8, 49]})
    first, second = Record({"a": x, "b": basis}, (), x @ basis).halves(fixed)
    assert first.inputs["b"] is basis and torch.equal(second.inputs["a"], x[4:])
    batched = Site("mm", "matmul", "mm", ["a", "b"], shapes={"a": [1, 5, 7], "b": [1, 7, 3]})
    a, b = torch.randn(8, 5, 7, generator=g), torch.randn(8, 7, 3, generator=g)
    assert Record({"a": a, "b": b}, (), a @ b).halves(batched) is not None


def test_a_block_returning_a_tuple_is_reconstructed():
    """Q-HyViT's rounding reconstruction on a block that returns several maps (CoaT's parallel blocks return
    all four scales): the error is summed over every output, and learned rounding lowers it."""
    from quantize import QuantConfig, calibrate
    from quantize.reconstruct import reconstruct_block

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc1(x), torch.relu(self.fc2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk, self.head = Two(), nn.Linear(32, 3)

        def forward(self, x):
            return self.head(torch.cat(self.blk(x), -1))

    torch.manual_seed(0)
    # correlated inputs, as activations are (for white ones nearest rounding is already the best in expectation,
    # and what rounding learns on half of the images does not carry to the other half)
    x = torch.randn(128, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(128, 16)
    qm, _ = calibrate(Net().eval(), x, QuantConfig(method="minmax", bits="w3a8"))
    before, after = reconstruct_block(qm, "blk", x, iters=200, lr=1e-2)
    assert before > 0 and after < 0.9 * before


def test_a_unit_with_as_many_elements_but_other_channels_is_not_a_pass_through():
    """PNASNet: a cell that halves the map and quadruples the channels keeps the element count; replacing it
    by a pass-through would feed the next cell the wrong channels. Only same-shape units are candidates."""
    from prune.depth import unit_similarity

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return x + torch.relu(self.bn(self.conv(x)))

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.cell_0, self.cell_1, self.cell_2 = Res(8), Down(), Res(32)
            self.last_linear = nn.Linear(32, 10)

        def forward(self, x):
            return self.last_linear(self.cell_2(self.cell_1(self.cell_0(self.conv0(x)))).mean((2, 3)))

    scores = unit_similarity(Net().eval(), torch.randn(1, 3, 16, 16), torch.randn(8, 3, 16, 16))
    assert sorted(scores) == ["cell_0", "cell_2"]


def test_a_tap_on_the_model_itself_and_an_entry_reading_a_list():
    """TResNet's first feature_info tap is the model itself (''): not a stage to look for blocks in.
    SelecSLS's blocks read a list ([x, skip]): TransKD's stage entry takes its first map."""
    from compress.alignment.taps import Stage, logits_and_features

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, xs):
            return [xs[0] + torch.relu(self.bn(self.conv(xs[0]))), xs[1]]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.body = nn.Sequential(Pair(), Pair())
            self.fc = nn.Linear(8, 10)
            self.feature_info = [{"module": "", "num_chs": 3, "reduction": 1},
                                 {"module": "body", "num_chs": 8, "reduction": 1}]

        def forward(self, x):
            x = self.stem(x)
            return self.fc(self.body([x, x])[0].mean((2, 3)))

    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    assert [b.name for b in find_blocks(model, x[:1])] == ["body.0", "body.1"]
    logits, feats, embeds = logits_and_features(model, x, [Stage(1, "body", 8, 1)], ["body.0"])
    assert feats[0].shape == (2, 8, 8, 8) and embeds[0].shape == (2, 8, 8, 8)
    assert torch.allclose(embeds[0], model.stem(x))


def test_head_count_of_a_kv_only_attention_is_kept_by_surgery():
    """GCViT's global attention has `qkv` = k and v only (2 x dim) and `head_dim`: resizing any space re-syncs
    every module's size attributes, and its head count must come from what the heads feed (the output
    projection), not from qkv / 3 (which made every GCViT slice fail)."""
    from torch import nn

    from compress.alignment.surgery import _sync_attention

    class KVAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = 2, 4
            self.qkv, self.proj = nn.Linear(8, 16), nn.Linear(8, 8)

    m = KVAttention()
    _sync_attention(m)
    assert m.num_heads == 2
    m.proj = nn.Linear(4, 8)  # one head sliced away
    _sync_attention(m)
    assert m.num_heads == 1


def test_few_samples_fall_back_to_weights_only_where_their_inputs_are_solved():
    """FasterNet: its last-stage MLPs see fewer samples than neurons (a 2x2 map), which sends them to the weight
    cost, but their input is a concatenation whose parts are solved after them: their weights would compare
    unaligned rows and a permuted copy fused back wrong (1.4e-3). They stay on activations (exact for a copy);
    the pooled head, whose inputs are solved, is still matched on weights."""
    report = _fuses_a_permuted_copy_back_exactly("fasternet")
    on_weights = [f.split(":")[0] for f in report.fallbacks if "matched on weights" in f]
    assert on_weights == ["conv_head.weight"], report.fallbacks


def test_spaces_do_not_depend_on_the_batch_size():
    """SAM's attention merges the batch with the heads (`reshape(3, B * heads, N, -1)`) before unbinding q, k
    and v. Each slice's copy of the heads axis was put back only where the axis stood alone, which a batch of
    one hides: from two images on, q, k and v kept the merged axis' old heads, the weights' heads became three
    free spaces, the invariance check rejected every space, and fusion silently averaged unaligned models."""
    model, name, kwargs, size = coverage_model("vision_transformer_sam")
    x = torch.randn(2, 3, size, size)
    one, two = find_spaces(model, x[:1], verify=False), find_spaces(model, x)
    assert [(s.name, s.size) for s in two.spaces] == [(s.name, s.size) for s in one.spaces]
    assert not two.rejected


def test_a_space_no_activation_carries_is_matched_on_weights():
    """A relative-position MLP (Swin-V2's cpb_mlp, ViT-relpos) runs on a constant coordinate table, so no
    activation of the images carries its hidden units: they were left unaligned, and a permuted copy fused back
    wrong (1.9e-3). They are matched on their weights, and the report says so."""
    report = _fuses_a_permuted_copy_back_exactly("vision_transformer_relpos")
    assert not report.unmatched
    assert any("rel_pos.mlp.fc1.weight:0: no activation" in f for f in report.fallbacks), report.fallbacks


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_conv_over_a_non_spatial_axis_passes_it_through_only_when_pointwise(kernel):
    """EfficientViM mixes its hidden state with 1x1 Conv1d over the state axis as the length. The conv rule gave
    every output position a fresh axis and left the input's unpinned, so the states written (b) and read (c)
    were split into a free and a pinned space, and permuting the free one changed the logits (3e-2). A
    pointwise conv now passes its positions through; any other conv pins the positions it reads."""

    class StateMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.write, self.read = nn.Conv1d(8, 6, 1), nn.Conv1d(8, 6, 1)
            self.mix = nn.Conv1d(8, 8, kernel, padding=kernel // 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # x: (batch, channels, tokens)
            h = x @ self.write(x).softmax(-1).transpose(1, 2)  # (batch, channels, states)
            return self.head((self.mix(h) @ self.read(x)).mean(-1))

    torch.manual_seed(0)
    model, x = StateMixer().eval(), torch.randn(4, 8, 10)
    sg = find_spaces(model, x, verify=False)
    states = [s for s in sg.spaces if s.size == 6]
    assert len(states) == (1 if kernel == 1 else 0)
    if states:
        assert {m.tensor for m in states[0].members} >= {"write.weight", "read.weight"}
    twin = StateMixer().eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(1))))
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)


def _fuses_a_permuted_copy_back_exactly(family: str):
    """Fuse a family's coverage model with a permuted copy of itself (activation costs, as the sweep's
    self-fuse check); asserts the logits come back within 1e-4 and returns the fusion report."""
    from fuse import FuseConfig, fuse_models

    model, name, kwargs, size = coverage_model(family)
    perturb_(model)
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    sg = find_spaces(model, x[:1])
    twin = create_model(name, num_classes=10, **kwargs).eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(5))))
    fused, report = fuse_models([twin, model], x, FuseConfig(ground="acts", solver="hungarian", calib=32,
                                                             batch_size=16, repair=False))
    other = create_model(name, num_classes=10, **kwargs).eval()
    other.load_state_dict(fused)
    with torch.no_grad():
        ref = model(x[:8])
        assert (other(x[:8]) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    return report


def _fused_with_a_permuted_copy_is_itself(model: nn.Module, make, x: torch.Tensor, seed: int):
    """Fuse a small model with a permuted copy of itself (activation costs on `x`); asserts every fused tensor
    equals the model's and returns the fusion report."""
    from fuse import FuseConfig, fuse_models

    sg = find_spaces(model, x[:1])
    twin = make().eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(seed))))
    fused, report = fuse_models([twin, model], x, FuseConfig(ground="acts", solver="hungarian", calib=len(x),
                                                             batch_size=len(x) // 2, repair=False))
    for k, v in model.state_dict().items():
        assert torch.allclose(fused[k], v, atol=1e-6), k
    return report


def test_learned_rounding_is_kept_only_where_it_carries_to_held_out_images():
    """Q-HyViT's bridge reconstruction learns rounding on half the calibration images and keeps it only if the
    block's error falls on the other half. Learned from images that span two directions of a 16-wide input, the
    rounding fits them and does not carry to images that span all of it: nearest rounding is kept. From the
    same images on both halves it is kept."""
    from quantize import QuantConfig, calibrate
    from quantize.reconstruct import reconstruct_block

    torch.manual_seed(0)
    narrow = torch.randn(32, 2) @ torch.randn(2, 16)
    for x, kept in ((torch.cat([narrow, torch.randn(32, 16)]), False), (torch.cat([narrow, narrow]), True)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3)).eval()
        qm, _ = calibrate(model, x, QuantConfig(method="minmax", bits="w3a8"))
        weight = model[0].weight.detach().clone()
        before, after = reconstruct_block(qm, "0", x, iters=200, lr=1e-2)
        assert (after < before) == kept and torch.equal(model[0].weight, weight) != kept, (before, after)


def test_lstm_hidden_units_are_a_space():
    """Sequencer mixes tokens with bidirectional LSTMs; on CPU nn.LSTM runs as `mkldnn_rnn_layer`, which had no
    rule (its parameters pinned: 49% on a free axis). Each direction's hidden units are one space across the
    four gates' rows, the recurrent columns and the output features; permuting them keeps the logits."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0].mean(1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 5, 8)
    sg = find_spaces(model, x)
    assert not sg.unknown_ops and not sg.rejected
    hidden = [s for s in sg.spaces if any(m.tensor.startswith("rnn.weight_hh") for m in s.members)]
    assert len(hidden) == 4 and all(s.size == 6 for s in hidden)  # two layers x two directions
    assert sg.coverage(model.state_dict()) > 0.9
    twin = Net().eval()
    twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(1))))
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    # no activation site carries them: fusion matches them on weights, but not through the recurrent weight,
    # whose columns (the same hidden units) are not aligned yet
    from fuse import FuseConfig, fuse_models

    fused, report = fuse_models([twin, model], torch.randn(16, 5, 8), FuseConfig(ground="acts", calib=16, batch_size=8,
                                                                                 repair=False))
    for k, v in model.state_dict().items():
        assert torch.allclose(fused[k], v, atol=1e-5), k
