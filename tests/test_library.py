"""The shape of the house: one `run(inputs, data, config) -> (Checkpoint, Result)` per pipeline, configs that
validate on construction, registries the core reads without importing a pipeline, and the segmentation
round trip of a structured checkpoint."""

import re
from pathlib import Path

import pytest
import torch

import distill
import fuse
import prune
import quantize
from compress import Checkpoint, CompressError, load, save
from compress.alignment.surgery import STRUCTURE_OPS
from compress.config import TrainRun
from compress.segmentation import SegmentationNet
from compress.steps import STEPS

from .helpers import SLIM_RESNET

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_never_imports_a_pipeline():
    offenders = []
    for path in (ROOT / "compress").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from|import)\s+(fuse|distill|quantize|prune)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_pipelines_register_their_steps_and_structure_ops_with_the_core():
    assert STEPS.names() == ["distill", "eval", "fuse", "prune", "quantize", "train"]
    assert {"replace", "resize", "factorize", "quantize"} <= set(STRUCTURE_OPS.names())
    for kind in STEPS.names():
        step = STEPS.get(kind)
        assert callable(step) and step.config.__doc__ and "Example" in step.config.__doc__


@pytest.mark.parametrize("registry", [distill.METHODS, quantize.METHODS, prune.METHODS, prune.CRITERIA, fuse.SOLVERS])
def test_every_declared_registry_entry_resolves(registry):
    assert registry.names() and all(callable(registry.get(name)) for name in registry.names())


@pytest.mark.parametrize("make,message", [
    (lambda: quantize.QuantizeRun(bits="w9a8"), "bits out of range"),
    (lambda: quantize.QuantizeRun(method="round"), "unknown quantization method 'round'"),
    (lambda: quantize.QuantizeRun(calib=0), "--calib"),
    (lambda: distill.DistillRun(kd_alpha=1.5), "kd_alpha"),
    (lambda: distill.DistillRun(method="copy"), "unknown distillation method 'copy'"),
    (lambda: distill.DistillRun(teacher_args={"depth": 2}), "--train-teacher"),
    (lambda: prune.PruneRun(ratio=1.0), "ratio out of range"),
    (lambda: prune.PruneRun(importance="luck"), "unknown importance criterion 'luck'"),
    (lambda: prune.PruneRun(target_macs=1.5), "MACs target out of range"),
    (lambda: fuse.FuseRun(solver="greedy"), "unknown solver 'greedy'"),
    (lambda: fuse.FuseRun(width=2.0), "bad --width"),
    (lambda: fuse.FuseRun(finetune_epochs=1, finetune_batch_size=0), "batch_size=0"),
    (lambda: TrainRun(epochs=0), "epochs >= 1"),
])
def test_configs_validate_on_construction(make, message):
    with pytest.raises(CompressError, match=re.escape(message)):
        make()


def test_bits_are_parsed_once_into_the_config():
    cfg = quantize.QuantizeRun(bits="W6A4")
    assert (cfg.w_bits, cfg.a_bits, cfg.bits) == (6, 4, "w6a4")


def test_each_pipeline_runs_from_python_on_checkpoints_in_memory(tmp_path):
    torch.manual_seed(0)
    a = Checkpoint.create("resmlp", arch_args={"num_blocks": 2}, seed=0)
    b = Checkpoint.create("resmlp", arch_args={"num_blocks": 2}, seed=1)
    fused, r = fuse.run([a, b], "digits", fuse.FuseRun(calib=64))
    assert r.kind == "fuse" and r.score == r["ot"] and [row.name for row in r.rows][-1] == "OT one-shot (acts, emd)"
    _, r16 = fuse.run([a, b], "digits", fuse.FuseRun(calib=64, stats_precision="bf16"))  # the report says so
    assert r16["stats_precision"] == "bf16" and r16.rows[-1].name == "OT one-shot (acts, bf16 statistics, emd)"
    assert fused.provenance["kind"] == "fuse" and fused.provenance["command"].startswith("compress fuse --models")
    thin, r = prune.run(fused, "digits", prune.PruneRun(ratio=0.5, calib=16))
    assert r.rows[1].params < r.rows[0].params and thin.structure[-1]["op"] == "resize"
    q, r = quantize.run(thin, "digits", quantize.QuantizeRun(method="minmax", calib=8))
    assert r.rows[1].runtime == "simulated" and q.structure[-1]["op"] == "quantize"
    path = save(q, tmp_path / "q.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the quantized, pruned, fused model reloads as it was
        assert torch.allclose(load(path).build()(x), q.build()(x))


def test_a_pruned_segmentation_checkpoint_reloads_with_its_edits(tmp_path):
    torch.manual_seed(0)
    net = SegmentationNet("resnet", 11, SLIM_RESNET, img_size=32).eval()
    base = Checkpoint("resnet", SLIM_RESNET, 11, "segmentation")
    x = torch.randn(8, 3, 32, 32)
    pruned = prune.prune(net, x, torch.zeros(8, dtype=torch.long), prune.PruneConfig("width", 0.5,
                                                                                      importance="magnitude"))
    ckpt = base.derive(pruned.model, "prune", structure=[pruned.op])
    back = load(save(ckpt, tmp_path / "seg.pt")).build()
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in pruned.model.parameters())
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in base.instantiate().parameters())
    with torch.no_grad():
        assert torch.allclose(back(x), pruned.model(x), atol=1e-5)
