"""Pretrained timm weights: from a local file (what users behind a firewall do) exactly as the model that
saved them, a re-initialised head when the classes differ, a pretrained teacher, a segmentation network's
backbone, and clear errors offline or for weights of another architecture. The hub is never reached: this
machine has no route to it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cli import main
from compress import Checkpoint, CompressError, load

ROOT = Path(__file__).resolve().parents[1]
ARCH = "resnet10t"  # timm's smallest ResNet with published weights (5.4 M parameters, 176 px)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm model built here, its weights saved the way timm publishes them (.safetensors)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=1000).eval()
    path = tmp_path_factory.mktemp("w") / f"{ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_a_pretrained_file_gives_exactly_the_model_that_saved_it(weights, tmp_path):
    model, path = weights
    ckpt = Checkpoint.create(ARCH, num_classes=1000, pretrained=str(path))
    assert (ckpt.input.size, ckpt.input.mean) == (176, (0.485, 0.456, 0.406))  # fed as the weights were trained
    x = torch.randn(2, 3, 176, 176)
    with torch.no_grad():
        assert torch.equal(ckpt.build()(x), model(x))


@pytest.mark.slow
def test_other_classes_reinitialise_the_head_and_a_linear_probe_keeps_the_features(weights, tmp_path):
    model, path = weights
    out, js = tmp_path / "p.pt", tmp_path / "p.json"
    assert main(["train", "--arch", ARCH, "--pretrained-file", str(path), "--head-only", "--data", "digits",
                 "--subset", "fraction=0.1", "--epochs", "1", "--batch-size", "32", "--out", str(out),
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert any("classifier re-initialised: the weights predict 1000 classes, digits has 10" in n for n in r["notes"])
    state = load(out).state_dict
    assert state["fc.weight"].shape == (10, 512)
    own = model.state_dict()  # frozen features: every backbone tensor, BatchNorm statistics included
    assert all(torch.equal(v, own[k]) for k, v in state.items() if not k.startswith("fc."))


@pytest.mark.slow
def test_a_pretrained_teacher_gets_its_head_finetuned_first(weights, tmp_path):
    _, path = weights
    js = tmp_path / "d.json"
    assert main(["distill", "--teacher", ARCH, "--pretrained-file", str(path), "--teacher-epochs", "1",
                 "--student", "resmlp", "--student-args", "num_blocks=1", "--method", "kd", "--epochs", "1",
                 "--data", "digits", "--subset", "fraction=0.1", "--no-baselines", "--out", str(tmp_path / "s.pt"),
                 "--json", str(js)]) == 0
    teacher = load(tmp_path / "s.pt.teacher.pt")
    assert teacher.provenance["settings"]["head-only"] and teacher.num_classes == 10
    assert any("resolution 32 -> 176" in c for c in json.loads(js.read_text())["reconciled"])


def test_pretrained_errors_are_one_line_and_write_nothing(weights, tmp_path, capsys):
    _, path = weights
    out = tmp_path / "x.pt"
    with pytest.raises(CompressError, match="do not fit 'resnet18'"):
        Checkpoint.create("resnet18", num_classes=10, pretrained=str(path))
    assert main(["train", "--arch", "vit", "--pretrained", "--out", str(out)]) == 2
    assert "pretrained weights come with timm model names, not 'vit'" in capsys.readouterr().err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cli", "train", "--arch", ARCH, "--pretrained", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "cannot fetch timm's pretrained weights" in err[-1] and "--pretrained-file" in err[-1]
    assert not out.exists()


def test_pretrained_weights_start_a_segmentation_backbone_exactly(weights):
    model, path = weights
    seg = Checkpoint.create(ARCH, num_classes=11, task="segmentation", pretrained=str(path))
    assert (seg.task, seg.num_classes, seg.input.size) == ("segmentation", 11, 176)
    net = seg.build()
    x = torch.randn(1, 3, 176, 176)
    with torch.no_grad():
        assert torch.equal(net.backbone(x), model.forward_head(model.forward_features(x), pre_logits=True))
        assert net(x).shape == (1, 11, 176, 176)
