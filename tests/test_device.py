"""Devices and precision: bad requests refused before any work, nothing in the library pinned to the CPU, and
(on a machine with a CUDA GPU; skipped elsewhere) training, distillation and evaluation on the GPU in fp32,
bf16 and fp16."""

import re
from pathlib import Path

import pytest
import torch

from cli import main
from compress import CompressError, InputSpec, create_model
from compress.config import TrainConfig
from compress.data import load_data
from compress.device import check_precision, resolve_device
from compress.measure import top1
from compress.train import train

from .helpers import SLIM_RESNET

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Every place the library moves a tensor to the host on purpose; a new one must be added here with its reason.
HOST_COPIES = {
    "compress/checkpoint.py": 3,  # checkpoints are written and read on the host
    "compress/train.py": 1,  # the resume state is read on the host, then loaded onto the model's device
    "compress/device.py": 2,  # the CPU device itself, when that is what was asked for
    "fuse/transport.py": 1,  # the OT solvers (POT, scipy) run on the host
    "fuse/fusion.py": 1,  # weight matching digests each cost on the host, where its solver then runs
    "distill/distiller.py": 1,  # the teacher cache hashes pixels on the host
}


def test_nothing_in_the_library_is_pinned_to_the_cpu():
    found = {}
    for pkg in ("compress", "fuse", "distill", "prune", "quantize"):
        for path in (ROOT / pkg).rglob("*.py"):
            code = "\n".join(line for line in path.read_text().splitlines() if ">>>" not in line)
            n = len(re.findall(r'\.cpu\(\)|device\("cpu"\)|map_location="cpu"', code))
            if n:
                found[str(path.relative_to(ROOT))] = n
    assert found == HOST_COPIES


def test_bad_device_and_precision_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(CompressError, match="unknown device 'gpu'"):
        TrainConfig(device="gpu")
    with pytest.raises(CompressError, match="fp16 on the CPU"):
        check_precision("fp16", torch.device("cpu"))
    out = tmp_path / "m.pt"
    assert main(["train", "--arch", "vit", "--precision", "fp16", "--device", "cpu", "--out", str(out)]) == 2
    assert "fp16 on the CPU" in capsys.readouterr().err and not out.exists()
    if not torch.cuda.is_available():
        assert main(["train", "--arch", "vit", "--device", "cuda", "--out", str(out)]) == 2
        assert "no CUDA GPU here" in capsys.readouterr().err and not out.exists()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")


def test_bf16_training_on_the_cpu_learns():
    data = load_data("digits", InputSpec(size=32))
    model = create_model("resnet", num_classes=10, **SLIM_RESNET)
    train(model, data.train, TrainConfig(epochs=3, seed=0, device="cpu", precision="bf16"))
    assert top1(model, data.test) > 60  # fp32: 3 epochs reach about 90


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_the_gpu_learns_in_every_precision(precision):
    data = load_data("digits", InputSpec(size=32))
    model = create_model("resnet", num_classes=10, **SLIM_RESNET)
    train(model, data.train, TrainConfig(epochs=3, seed=0, device="cuda", precision=precision))
    assert next(model.parameters()).is_cuda
    assert top1(model, data.test) > 60


@cuda
def test_distillation_moves_the_teacher_with_the_student(tmp_path):
    from compress import Checkpoint, save

    teacher = save(Checkpoint.create("resnet", arch_args=SLIM_RESNET, seed=0), tmp_path / "t.pt")
    js = tmp_path / "d.json"
    assert main(["distill", "--teacher", str(teacher), "--student", "vit", "--method", "ofa", "--epochs", "1",
                 "--no-baselines", "--device", "cuda", "--precision", "bf16", "--out", str(tmp_path / "s.pt"),
                 "--json", str(js)]) == 0
    assert main(["eval", str(tmp_path / "s.pt"), "--device", "cuda", "--latency-runs", "3"]) == 0


@cuda
def test_a_distiller_accepts_a_teacher_already_on_the_gpu():
    from distill import DistillConfig, Distiller

    spec = InputSpec(size=32)
    teacher = create_model("resnet", num_classes=10, **SLIM_RESNET).cuda().eval()
    d = Distiller(create_model("vit", num_classes=10), teacher, DistillConfig("ofa"), spec, spec, 10).cuda()
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    assert torch.isfinite(d(x, y)) and d(x).is_cuda


@cuda
def test_quantization_calibrates_on_the_gpu_like_on_the_cpu(tmp_path):
    """Q-HyViT on the GPU (search, Hessian gradients, bridge reconstruction) gives the CPU's quantized model up
    to float rounding; the checkpoint it writes evaluates on the CPU."""
    import json

    from compress import Checkpoint, load, save

    src = save(Checkpoint.create("mobilevit", seed=0), tmp_path / "m.pt")
    size = load(src).input.size
    logits = {}
    for device in ("cpu", "cuda"):
        out, js = tmp_path / f"q-{device}.pt", tmp_path / f"q-{device}.json"
        assert main(["quantize", str(src), "--method", "qhyvit", "--calib", "8", "--recon-iters", "20",
                     "--device", device, "--out", str(out), "--json", str(js)]) == 0
        r = json.loads(js.read_text())
        assert r["device"].startswith(device) and r["bridge_blocks"]
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits[device] = load(out).build().eval()(x)
    noise = (logits["cpu"] - logits["cuda"]).pow(2).sum() / logits["cpu"].pow(2).sum()
    assert float(noise) < 1e-2  # -20 dB: the same quantizers, chosen on two devices' float rounding
