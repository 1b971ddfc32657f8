"""The training loop learns, and an interrupted run resumes to exactly the same weights."""

import pytest
import torch
import torch.nn.functional as F

from compress import InputSpec, create_model
from compress.data import load_data
from compress.errors import CompressError
from compress.measure import latency_ms, macs, miou, param_count, top1
from compress.segmentation import SegmentationNet
from compress.train import TrainConfig, train

from .helpers import SLIM_RESNET, SLIM_RESNET_ARGS, free_port


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", InputSpec(size=32))


def test_cnn_learns_digits(digits):
    model = create_model("resnet", num_classes=10, **SLIM_RESNET)
    train(model, digits.train, TrainConfig(epochs=3, seed=0))
    assert top1(model, digits.test) > 80.0  # chance is 10%


@pytest.mark.slow
def test_vit_learns_digits(digits):
    model = create_model("vit", num_classes=10, depth=2)
    train(model, digits.train, TrainConfig(epochs=10, seed=0))
    assert top1(model, digits.test) > 35.0  # 3.5x chance after 10 short epochs (98% after 40: docs)


@pytest.mark.slow
def test_segmentation_learns_scenes():
    d = load_data("digit-scenes", InputSpec(size=64))
    model = SegmentationNet("resnet", 11, SLIM_RESNET, img_size=64)
    before = miou(model, d.test, 11)
    train(model, d.train, TrainConfig(epochs=6, seed=0, label_smoothing=0.0, lr=3e-3))
    after = miou(model, d.test, 11)
    assert after > before + 10  # measured 19.5% from 0.3% (11 classes incl. background)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=2, seed=3, batch_size=128)
    small = torch.utils.data.Subset(digits.train, range(512))
    torch.manual_seed(0)
    ref = create_model("resmlp", num_classes=10, num_blocks=1)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    train(ref, small, cfg)

    model = create_model("resmlp", num_classes=10, num_blocks=1)
    model.load_state_dict(init)
    steps = []

    def flaky(m, x, y):
        steps.append(1)
        if len(steps) == 6:  # epoch 2 of 2 (4 steps per epoch)
            raise _Stop
        return F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing)

    state = tmp_path / "run.resume.pt"
    with pytest.raises(_Stop):
        train(model, small, cfg, loss_fn=flaky, state_path=state)
    assert state.exists()
    model = create_model("resmlp", num_classes=10, num_blocks=1)
    model.load_state_dict(init)
    train(model, small, cfg, state_path=state, resume=True)
    assert not state.exists()
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k], atol=1e-6), k


def test_measurements_are_physical():
    small, big = create_model("vit", depth=1), create_model("vit", depth=4)
    assert param_count(big) > 3 * param_count(small) * 0.8
    assert macs(big, 32) > 3 * macs(small, 32)
    assert latency_ms(big, 32, batch=32, runs=5) > latency_ms(big, 32, runs=5)  # 32 images cost more than one


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """Data-parallel training through torchrun with 2 processes on gloo produces one checkpoint."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__).resolve().parents[1] / "cli.py"), "train", "--arch", "resnet", "--arch-args",
           SLIM_RESNET_ARGS, "--epochs", "4", "--threads", "1", "--out", str(out), "--json", str(tmp_path / "d.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and json.loads((tmp_path / "d.json").read_text())["top1"] > 30


@pytest.mark.slow
def test_torchrun_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """Two gloo processes stopped after an epoch pick up from rank 0's state with `--resume`, each process
    with its own random streams (rank 0's for both: max weight difference 1.39), and end with the weights of a
    run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from compress import load

    root = Path(__file__).resolve().parents[1]

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(root / "cli.py"), "train", "--arch", "resnet", "--arch-args", SLIM_RESNET_ARGS, "--epochs", "3",
                "--threads", "1", "--out", str(out)]

    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    proc = subprocess.run(command(whole), capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = Path(f"{cut}.resume.pt")
    proc = subprocess.Popen(command(cut), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # a scheduler's preemption: SIGTERM to torchrun, which stops both workers mid-way through epoch 2
    # (SIGKILL would leave the workers running on as orphans, finishing the run behind the test's back)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(1)
    assert state.exists() and not cut.exists()
    assert torch.load(state, weights_only=True)["epoch"] < 3  # killed with epochs left to run
    proc = subprocess.run([*command(cut), "--resume"], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cut.exists() and not state.exists()
    a, b = load(whole).state_dict, load(cut).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def _bn_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_a_short_run_ends_with_batchnorm_statistics_of_its_final_weights():
    # 2 steps at a high rate: the running average would still hold 81% of the starting statistics
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8) * 3 + 1, torch.randint(0, 10, (32,))
    model = _bn_net()
    train(model, torch.utils.data.TensorDataset(x, y), TrainConfig(epochs=1, batch_size=16, lr=0.05, max_shift=0))
    with torch.no_grad():
        conv_out = model[0](x)
    assert torch.allclose(model[1].running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert model[1].momentum == 0.1  # the usual running average afterwards


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_last_good_state(tmp_path):
    """A NaN loss in epoch 2 (on one step) stops the run at that epoch's end, before its state replaces the
    state of epoch 1; a finite run is untouched by the check."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    calls = []

    def loss_fn(m, x, y):
        calls.append(1)
        loss = F.cross_entropy(m(x), y)
        return loss * float("nan") if len(calls) == 3 else loss  # the first step of epoch 2 (2 steps an epoch)

    cfg, state = TrainConfig(epochs=3, batch_size=16, max_shift=0), tmp_path / "run.resume.pt"
    with pytest.raises(CompressError, match=r"training diverged in epoch 2 of 3: expected a finite loss, found NaN"):
        train(_bn_net(), data, cfg, loss_fn=loss_fn, state_path=state)
    assert len(calls) == 4 and torch.load(state, weights_only=True)["epoch"] == 1
    model = train(_bn_net(), data, cfg, state_path=state)  # the same data and rate, finite: trains to the end
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not state.exists()


def test_batchnorm_reestimation_keeps_what_the_forward_does_not_reach():
    from compress.batchnorm import batchnorm_outlives, reestimate_batchnorm

    a, b = _bn_net(), _bn_net()
    b[1].running_mean.fill_(3.0)
    pair = torch.nn.ModuleDict({"a": a, "b": b}).train()
    x = torch.randn(16, 3, 8, 8) + 2
    assert reestimate_batchnorm(pair, [x], forward=pair["a"]) == 1
    assert torch.allclose(a[1].running_mean, a[0](x).mean((0, 2, 3)).detach(), atol=1e-5)
    assert torch.equal(b[1].running_mean, torch.full((8,), 3.0))  # not reached: kept, not reset to zero
    assert batchnorm_outlives(a, 16) and not batchnorm_outlives(a, 80)


def test_classifier_refit_fits_the_head_on_frozen_features_and_leaves_the_body_alone():
    from compress.errors import CompressError
    from compress.probe import pre_logits, refit_classifier

    torch.manual_seed(0)
    model = create_model("vit", num_classes=10, depth=1)
    x = torch.randn(60, 3, 32, 32)
    y = torch.arange(60) % 10
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    before = (model.eval()(x).argmax(1) == y).float().mean().item()
    refit_classifier(model, torch.utils.data.TensorDataset(x, y))
    assert (model(x).argmax(1) == y).float().mean().item() == 1.0 > before  # 60 points in 96 dims: separable
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())
    assert pre_logits(model, x).shape == (60, 96)
    distilled = create_model("efficientformerv2", num_classes=10)  # two heads, averaged at eval: the fitted map
    head = refit_classifier(distilled, torch.utils.data.TensorDataset(x, y)).get_classifier()[1]
    with torch.no_grad():
        assert torch.allclose(distilled.eval()(x), pre_logits(distilled, x) @ head.weight.T + head.bias, atol=1e-5)
    with pytest.raises(CompressError, match="Linear classifiers"):
        refit_classifier(torch.nn.Linear(4, 2), torch.utils.data.TensorDataset(torch.randn(4, 4), torch.zeros(4)))


def test_a_frozen_backbone_keeps_its_batchnorm_statistics_and_a_segmentation_head_trains_alone(digits):
    """A linear probe (only the classifier trains) leaves every other tensor as it was, BatchNorm running
    statistics included: training mode would have moved them toward the new data. A segmentation network's
    head trains on its frozen backbone alike."""
    from compress.train import only_classifier_trains

    sub = torch.utils.data.Subset(digits.train, range(256))
    model = create_model("resnet", num_classes=10, **SLIM_RESNET)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    only_classifier_trains(model)
    train(model, sub, TrainConfig(epochs=1, seed=0))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}
    seg = SegmentationNet("resnet", 11, SLIM_RESNET, img_size=32)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    only_classifier_trains(seg)
    scenes = load_data("digit-scenes", InputSpec(size=32)).train
    train(seg, torch.utils.data.Subset(scenes, range(128)), TrainConfig(epochs=1, seed=0))
    changed = {k.split(".")[0] for k, v in seg.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"lateral", "fuse", "classifier"}
