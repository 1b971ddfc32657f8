"""Pruning: physically smaller models that still run, exact removal of dead units, replay from checkpoints."""

import copy

import pytest
import torch
from torch import nn

from cli import main
from compress import Checkpoint, load, save
from compress.alignment import axes as ax
from compress.alignment.spaces import find_spaces
from compress.alignment.surgery import removable_spaces
from compress.errors import CompressError
from compress.measure import macs, param_count
from prune import PruneConfig, importance, kept_units, prune
from prune.lowrank import factorize, rank_for
from prune.pipeline import pruned_verdict
from prune.width import plan_width
from tests.helpers import FAMILIES, perturb_, small_model


def _calib(size: int, n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("arch", FAMILIES)
def test_width_gives_expected_shapes_and_runs(arch):
    model, size = small_model(arch)
    perturb_(model)
    x, y = _calib(size)
    sg, keep, rows = plan_width(copy.deepcopy(model), x[:1], x, y, 0.5)
    assert keep, f"{arch}: nothing to prune"
    # the expected size of every tensor follows from the kept units of the spaces on its axes
    expected = sum(torch.Size([len(ax.index_map(a, keep)) for a in sg.tensor_axes[n]]).numel()
                   for n, _ in model.named_parameters())
    pruned = prune(model, x, y, PruneConfig("width", 0.5)).model
    assert param_count(pruned) == expected < param_count(small_model(arch)[0])
    assert pruned(x).shape == (len(x), 10)


def test_vit_width_by_hand():
    model, size = small_model("vit")  # embed 96, 3 heads of 32, MLP 384, 4 blocks
    x, y = _calib(size)
    before = param_count(model)
    pruned = prune(model, x, y, PruneConfig("width", 0.5)).model
    # per block: MLP 384 -> 192 (fc1 rows + bias, fc2 columns) and 3 -> 2 heads (q, k, v rows + bias, proj cols)
    per_block = 192 * (96 + 1) + 192 * 96 + 32 * 3 * (96 + 1) + 32 * 96
    assert before - param_count(pruned) == 4 * per_block
    assert pruned.blocks[0].attn.num_heads == 2 and pruned.blocks[0].mlp.fc1.out_features == 192


@pytest.mark.parametrize("arch", ["vit", "swin", "resnet", "mixer"])
def test_removing_dead_units_keeps_the_function(arch):
    """Units whose outgoing weights are zero contribute nothing; activation importance must find exactly
    them, and slicing them away must leave the logits unchanged."""
    model, size = small_model(arch)
    perturb_(model)
    x, y = _calib(size)
    sg = find_spaces(model, x[:1])
    spaces = [s for s in removable_spaces(model, sg, x[:1], [s for s in sg.spaces if not s.residual and
                                                             any(m.role == "in" for m in s.members)])]
    assert spaces
    state = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for s in spaces:
            dead = torch.arange(s.size - kept_units(s.size, 0.5))  # the units a 0.5 cut removes
            for m in s.members:
                if m.role == "in":
                    state[m.tensor].data.index_fill_(m.axis, ax.index_map(sg.tensor_axes[m.tensor][m.axis],
                                                                          {s.id: dead}), 0.0)
        ref = model(x)
    pruned = prune(model, x, y, PruneConfig("width", 0.5)).model
    with torch.no_grad():
        assert (pruned(x) - ref).abs().max().item() < 1e-4
    assert param_count(pruned) < param_count(small_model(arch)[0])


@pytest.mark.parametrize("method", ["width", "depth", "lowrank"])
def test_ratio_zero_is_identity(method):
    model, size = small_model("vit")
    perturb_(model)
    x, y = _calib(size)
    with torch.no_grad():
        ref = model(x)
    pruned = prune(copy.deepcopy(model), x, y, PruneConfig(method, 0.0)).model
    with torch.no_grad():
        assert torch.equal(pruned(x), ref)
    assert param_count(pruned) == param_count(model)


@pytest.mark.parametrize("arch", ["vit", "resnet", "mobilevit", "efficientformer"])
def test_depth_removes_the_most_similar_blocks(arch):
    model, size = small_model(arch)
    x, y = _calib(size)
    before = (param_count(model), macs(model, size))
    result = prune(model, x, y, PruneConfig("depth", 0.25))
    removed = [r for r in result.rows if r["removed"]]
    assert removed and min(r["cos_in_out"] for r in removed) >= max(r["cos_in_out"] for r in result.rows
                                                                    if not r["removed"])
    assert param_count(result.model) < before[0] and macs(result.model, size) < before[1]
    assert result.model(x).shape == (len(x), 10)


def test_depth_branches_and_errors():
    model, size = small_model("vit")
    x, y = _calib(size)
    result = prune(model, x, y, PruneConfig("depth", 0.25, unit="mlp"))
    assert sum(r["removed"] for r in result.rows) == 1 and type(model.blocks[0].norm1).__name__ == "LayerNorm"
    with pytest.raises(CompressError, match="separate attn branch"):
        prune(small_model("resnet")[0], *_calib(32), PruneConfig("depth", 0.25, unit="attn"))
    with pytest.raises(CompressError, match="every unit"):
        prune(small_model("vit")[0], x, y, PruneConfig("depth", 0.99))
    with pytest.raises(CompressError, match="would remove no unit"):  # 0.05 of 4 blocks rounds to none
        prune(small_model("vit")[0], x, y, PruneConfig("depth", 0.05))


class _HardCoded(nn.Module):
    """A hidden layer that the model's own forward reshapes with a hard-coded 4 x 4 (GCViT's windows do the
    like): it cannot be sliced. `wide` adds a layer before it that can."""

    def __init__(self, wide: bool):
        super().__init__()
        self.fc0 = nn.Sequential(nn.Linear(48, 32), nn.ReLU()) if wide else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(32 if wide else 48, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc1(self.fc0(x.flatten(1))).relu()
        return self.fc2(h.reshape(x.shape[0], 4, 4).flatten(1))


def test_width_says_which_spaces_it_cannot_slice():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    with pytest.raises(CompressError, match="can slice none of _HardCoded's"):
        prune(_HardCoded(False), x, y, PruneConfig("width", 0.5, importance="magnitude"))
    model = _HardCoded(True)
    before = param_count(model)
    result = prune(model, x, y, PruneConfig("width", 0.5, importance="magnitude"))
    stuck = [r for r in result.rows if r["kind"] == "not sliceable"]
    assert stuck and all("does not run" in r["why"] for r in stuck)
    assert {r["space"] for r in result.rows if r["kept"] < r["units"]} == {"fc0.0.weight:0"}
    assert param_count(result.model) < before and result.model(x).shape == (8, 10)


def test_lowrank_break_even_and_whitening():
    assert rank_for(384, 96, 0.0) == 0 and rank_for(384, 96, 0.5) == 38  # 384*96/480 = 76.8 is break-even
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    x = torch.randn(512, 48, generator=g) * torch.linspace(0.01, 3, 48)  # very unequal input scales
    gram = (x.T @ x).double()
    errors = []
    for metric in (None, gram):
        down, up = factorize(w, 8, metric)
        errors.append(((x @ w.T - x @ (up @ down).T) ** 2).mean().item())
    assert errors[1] < 0.8 * errors[0]  # whitening minimises the error on the data, not on the weights
    model, size = small_model("mixer")
    xs, ys = _calib(size)
    pruned = prune(copy.deepcopy(model), xs, ys, PruneConfig("lowrank", 0.5, whiten=True)).model
    assert param_count(pruned) < param_count(model) and pruned(xs).shape == (len(xs), 10)


def test_hessian_accumulates_every_sample():
    """Torch-Pruning keeps only the last sample's g^2; ours sums over all: scores are additive over data."""
    model, size = small_model("resnet")
    perturb_(model)
    x, y = _calib(size, 4)
    sg = find_spaces(model, x[:1])
    spaces = [s for s in sg.spaces if not s.residual][:3]
    both = importance(model, sg, spaces, "hessian", x, y)
    parts = [importance(model, sg, spaces, "hessian", x[i:i + 2], y[i:i + 2]) for i in (0, 2)]
    for s in spaces:
        assert torch.allclose(both[s.id], (parts[0][s.id] + parts[1][s.id]) / 2, rtol=1e-4)


def test_bad_ratios_are_refused():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(CompressError, match="ratio"):
            PruneConfig("width", bad)
    with pytest.raises(CompressError, match="every unit"):
        PruneConfig("depth", keep=0)
    assert kept_units(3, 0.99) == 1 and kept_units(100, 0.5, round_to=8) == 56


@pytest.mark.parametrize("method,extra", [("width", ["--importance", "taylor", "--round-to", "8"]),
                                          ("depth", ["--unit", "block"]), ("lowrank", ["--whiten"])])
def test_cli_prune_reloads_with_eval(tmp_path, method, extra):
    src = tmp_path / "vit.pt"
    save(Checkpoint.create("vit", num_classes=10, seed=0), src)
    out, js, ev = tmp_path / "p.pt", tmp_path / "p.json", tmp_path / "e.json"
    assert main(["prune", str(src), "--method", method, "--ratio", "0.5", *extra, "--calib", "16", "--out",
                 str(out), "--json", str(js)]) == 0
    import json

    r = json.loads(js.read_text())
    assert r["params_after"] < r["params_before"] and r["macs_after"] < r["macs_before"]
    assert {"latency_before_ms", "latency_after_ms", "top1_before", "top1_after"} <= set(r)
    assert [n for n in r["notes"] if n.startswith("the pruned model")] == pruned_verdict(r)
    assert main(["eval", str(out), "--latency-runs", "2", "--json", str(ev)]) == 0
    e = json.loads(ev.read_text())
    assert e["params"] == r["params_after"] and abs(e["top1"] - r["top1_after"]) < 1e-9
    ckpt = load(out)
    assert ckpt.structure[-1]["op"] == {"width": "resize", "depth": "replace", "lowrank": "factorize"}[method]


def test_prune_says_when_the_pruned_model_loses_accuracy_or_is_no_faster():
    """More than a point of top-1 lost, or no faster at a batch size: each gets a note, with the recovery
    advice that fits; within a point and faster at both, none."""
    good = {"top1_before": 98.5, "top1_after": 97.6, "finetune_epochs": 0, "latency_before_ms": 1.0,
            "latency_after_ms": 0.7, "latency_before_ms_batch32": 9.0, "latency_after_ms_batch32": 6.0}
    assert pruned_verdict(good) == []
    lost, = pruned_verdict({**good, "top1_after": 97.4})
    assert "97.40 is more than a point under the original's 98.50" in lost and "--finetune-epochs N" in lost
    lost, = pruned_verdict({**good, "top1_after": 97.4, "finetune_epochs": 4})
    assert lost.endswith("a longer recovery or a lower --ratio / --target-macs")
    slow = pruned_verdict({**good, "latency_after_ms": 1.0, "latency_after_ms_batch32": 9.5})
    assert slow == ["the pruned model is no faster than the original at batch 1 (1.00 ms against 1.00)",
                    "the pruned model is no faster than the original at batch 32 (9.50 ms against 9.00)"]


@pytest.mark.slow
def test_cli_recovery_with_distillation_and_bad_input(tmp_path, capsys):
    src = tmp_path / "vit.pt"
    save(Checkpoint.create("vit", num_classes=10, seed=0), src)
    out = tmp_path / "p.pt"
    assert main(["prune", str(src), "--target-macs", "0.3", "--finetune-epochs", "1", "--distill-from-original",
                 "--calib", "16", "--out", str(out)]) == 0
    assert load(out).provenance["metrics"]["top1_after"] is not None
    bad = tmp_path / "bad.pt"
    assert main(["prune", str(src), "--ratio", "1.0", "--out", str(bad)]) == 2
    assert "ratio out of range" in capsys.readouterr().err and not bad.exists()
    assert main(["prune", str(src), "--method", "depth", "--keep", "0", "--out", str(bad)]) == 2
    assert main(["prune", str(src), "--out", str(src)]) == 2  # never over the input
