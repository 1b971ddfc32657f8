"""Distillation: loss values by hand, projectors for every family, one step for every family pair, the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import main
from compress import Checkpoint, InputSpec, load, save
from compress.errors import CompressError
from compress.registry import create_model, default_img_size
from distill import DistillConfig, Distiller, linear_cka, ofa_loss
from tests.helpers import FAMILIES, SLIM_RESNET, SLIM_RESNET_ARGS, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_ofa_loss_by_hand():
    z = torch.zeros(1, 2)  # teacher and student both uniform over two classes, target class 0
    y = torch.tensor([0])
    # code form, gamma 2: weights (0.5 + 1)^2 - 1 = 1.25 and 0.5^2 = 0.25 on -log 0.5
    assert ofa_loss(z, z, y, gamma=2.0).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    # paper form, gamma 2: (1 + 0.5)^2 = 2.25 on the target, 0.5 (not powered) elsewhere
    assert ofa_loss(z, z, y, gamma=2.0, paper_form=True).item() == pytest.approx(2.75 * math.log(2), rel=1e-6)


def test_ofa_gamma_one_is_ce_plus_kd():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    kd = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()  # KD as cross-entropy to the teacher
    ce = F.cross_entropy(s, y)
    assert ofa_loss(s, t, y, gamma=1.0).item() == pytest.approx(kd.item(), rel=1e-5)  # CE is added by the method
    assert ofa_loss(s, t, y, gamma=1.0, paper_form=True).item() == pytest.approx((ce + kd).item(), rel=1e-5)


def _distiller(student: str, teacher: str, method: str = "ofa") -> tuple[Distiller, int]:
    size = default_img_size(student)
    d = Distiller(create_model(student, num_classes=10), create_model(teacher, num_classes=10), DistillConfig(method),
                  InputSpec(size), InputSpec(default_img_size(teacher)), 10)
    return d, size


@pytest.mark.parametrize("student", [f for f in FAMILIES if f != "deit"])
def test_every_projector_outputs_num_classes(student):
    d, size = _distiller(student, "resnet")
    x = torch.randn(2, 3, size, size)
    _, feats, _ = d.student_taps(d.student.eval(), x)
    assert len(feats) == len(d.helpers) >= 3
    for i, f in enumerate(feats):
        assert d.helpers[f"exit{i}"].eval()(f, feats.prefix[i]).shape == (2, 10)


def test_ofa_branches_follow_the_reference():
    """A ViT student's token branches read its CLS token (the reference's TokenFilter), a CNN's last-stage
    branch is a bare 1x1 conv, and --stage-gammas sets each branch's gamma."""
    from distill.projectors import ConvBranch, TokenBranch

    torch.manual_seed(0)
    d, size = _distiller("vit", "resnet")
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    _, feats, _ = d.student_taps(d.student.eval(), x)
    assert d.shapes.student_prefix == [1] * len(feats)
    branch = d.helpers["exit0"].eval()
    assert isinstance(branch, TokenBranch) and branch.prefix == 1
    cls, patches = feats.prefix[0], feats[0]
    assert cls.shape == (2, 1, feats[0].shape[1])
    out = branch(patches, cls)
    assert not torch.allclose(branch(patches, cls + 1.0), out)  # the CLS token is read
    t = branch.blocks(torch.cat([branch.prefix_proj(cls), branch.proj(branch.merge(patches).flatten(2).transpose(1, 2))],
                                1))
    assert torch.allclose(out, branch.head(t[:, 0]), atol=1e-6)  # the CLS output, no norm before the head
    with pytest.raises(CompressError, match="CLS token"):  # built to read it: no silent fallback to patch means
        branch(patches, None)
    cnn, _ = _distiller("resnet", "vit")
    last = cnn.helpers[f"exit{len(cnn.shapes.student) - 1}"]
    assert isinstance(last, ConvBranch) and isinstance(last.body, torch.nn.Conv2d)
    assert cnn.shapes.student_prefix == [0] * len(cnn.shapes.student)
    # per-stage gammas: all equal to gamma is the single-gamma loss; another value changes it; a wrong count is refused
    n = len(feats)
    d.train()
    with torch.no_grad():
        torch.manual_seed(1)
        base = d(x, y)
        d.cfg.stage_gammas = [1.0] * n
        torch.manual_seed(1)
        assert torch.allclose(d(x, y), base)
        d.cfg.stage_gammas = [1.0] * (n - 1) + [3.0]
        torch.manual_seed(1)
        assert not torch.allclose(d(x, y), base)
    with pytest.raises(CompressError, match="one gamma per exit branch"):
        Distiller(create_model("vit", num_classes=10), create_model("resnet", num_classes=10),
                  DistillConfig("ofa", stage_gammas=[1.0, 2.0]), InputSpec(size), InputSpec(32), 10)


@pytest.mark.parametrize("teacher", ["resnet", "vit", "mixer", "mobilevit"])  # CNN, transformer, MLP, hybrid
@pytest.mark.parametrize("student", ["resnet", "swin", "resmlp", "efficientformerv2"])
def test_one_step_for_each_family_pair(teacher, student):
    torch.manual_seed(0)
    d, size = _distiller(student, teacher, "ofa" if teacher != "mixer" else "fitnet")
    d.train()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    loss = d(torch.randn(4, 3, size, size), torch.randint(0, 10, (4,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in d.teacher.state_dict().items())  # frozen, eval
    assert not any(k.startswith("teacher") for k in d.state_dict())


def test_teacher_input_is_reconciled_and_checked():
    d, _ = _distiller("vit", "efficientformer", "kd")  # 32 px student, 64 px teacher
    assert any("32 -> 64" in c for c in d.teacher_input.changes)
    assert d.teacher_input(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 64, 64)
    with pytest.raises(CompressError, match="cannot see"):
        Distiller(create_model("vit", num_classes=10), create_model("resnet", num_classes=10), DistillConfig("kd"),
                  InputSpec(32), InputSpec(32, mean=(0.5,), std=(0.5,)), 10)
    with pytest.raises(CompressError, match="different classes"):
        Distiller(create_model("vit", num_classes=10), create_model("resnet", num_classes=7), DistillConfig("kd"),
                  InputSpec(32), InputSpec(32), 10)


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(128, 16, generator=g)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    assert linear_cka(a, 3 * a @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(a, torch.randn(128, 16, generator=g)) < 0.3
    assert linear_cka(torch.randn(8, 100, generator=g), torch.randn(8, 50, generator=g)) <= 1.0  # Gram form


def test_cli_distill_learns_and_strips_helpers(tmp_path):
    out, js = tmp_path / "s.pt", tmp_path / "s.json"
    assert main(["distill", "--teacher", "resnet", "--train-teacher", "--teacher-epochs", "2", "--teacher-args",
                 SLIM_RESNET_ARGS, "--student", "resnet", "--student-args", SLIM_RESNET_ARGS, "--epochs", "2", "--method", "ofa", "--out", str(out), "--json", str(js), "--no-baselines",
                 "--cka-plot", str(tmp_path / "cka.png")]) == 0
    r = json.loads(js.read_text())
    assert {"teacher", "student", "method", "top1", "seconds"} <= set(r) and r["top1"] > 50  # chance is 10
    assert r["extra_parameters"] > 0 and len(r["cka"]) == 4 and (tmp_path / "cka.png").exists()
    assert set(load(out).state_dict) == set(create_model("resnet", num_classes=10, **SLIM_RESNET).state_dict())
    assert main(["eval", str(out), "--latency-runs", "2"]) == 0


def test_distill_says_when_a_baseline_of_its_run_beats_the_student():
    """Each baseline above the distilled student, as printed, gets a note naming it and its --method; level or
    below, none."""
    from distill.pipeline import below_baselines

    v = {"top1": 80.0, "scratch_top1": 82.5, "kd_top1": 80.004, "fd_top1": 81.0}
    notes = below_baselines(v, "top1", "hybrid", ["scratch", "kd", "fd"])
    assert [n.split(": --method ")[1] for n in notes] == ["scratch gives the better student here",
                                                          "fd gives the better student here"]
    assert notes[0].startswith("the student distilled by hybrid (80.00) ends below the same student trained alone")
    assert "features only (81.00)" in notes[1]
    assert below_baselines(v, "top1", "ofa", []) == []  # --no-baselines: nothing measured, nothing said


def test_cli_distill_bad_input(tmp_path, capsys):
    assert main(["distill", "--teacher", "swin", "--student", "vit", "--out", str(tmp_path / "s.pt")]) == 2
    assert "--train-teacher" in capsys.readouterr().err
    teacher = tmp_path / "t.pt"
    save(Checkpoint.create("resnet", num_classes=7, seed=0), teacher)
    assert main(["distill", "--teacher", str(teacher), "--student", "vit", "--out", str(tmp_path / "s.pt")]) == 2
    assert "different classes" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
    assert main(["distill", "--teacher", str(teacher), "--teacher-args", "depth=2", "--student", "vit",
                 "--out", str(tmp_path / "s.pt")]) == 2
    assert "--teacher-args" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_distill_two_cpu_processes(tmp_path):
    teacher = tmp_path / "t.pt"
    save(Checkpoint.create("resnet", num_classes=10, arch_args=SLIM_RESNET, seed=0), teacher)
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "cli.py"), "distill", "--teacher", str(teacher), "--student", "resnet", "--student-args",
           SLIM_RESNET_ARGS, "--method", "ofa",
           "--epochs", "1", "--no-baselines", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and "student" not in "".join(load(out).state_dict)


def test_teacher_logit_cache_is_exact_and_computes_once():
    torch.manual_seed(0)
    teacher = create_model("resnet", num_classes=10).eval()
    calls = []
    teacher.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    d = Distiller(create_model("vit", num_classes=10), teacher, DistillConfig("kd"), InputSpec(32), InputSpec(32), 10,
                  cache_teacher=True)
    calls.clear()  # construction probes the teacher once
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        first = d._cached_logits(x[:4])
        again = d._cached_logits(x[2:])  # two cached, two new
        assert torch.allclose(first, teacher(x[:4])) and torch.allclose(again, teacher(x[2:]), atol=1e-6)
    assert calls[:2] == [4, 2]  # the cached images were not run through the teacher again
    with pytest.raises(CompressError, match="cache-teacher"):
        Distiller(create_model("vit", num_classes=10), teacher, DistillConfig("fitnet"), InputSpec(32), InputSpec(32),
                  10, cache_teacher=True)


def test_hcl_loss_by_hand():
    from distill.transkd import hcl_loss

    s, t = torch.zeros(1, 2, 8, 8), torch.ones(1, 2, 8, 8)
    assert hcl_loss(s, t).item() == pytest.approx(1.0)  # every level's MSE is 1
    t = torch.zeros(1, 1, 8, 8)
    t[..., :4, :4] = 2.0  # full-res MSE 1; 4x4 pool MSE 1; 2x2 pool MSE 1; 1x1 pool MSE 0.25
    expected = (1 + 0.5 * 1 + 0.25 * 1 + 0.125 * 0.25) / (1 + 0.5 + 0.25 + 0.125)
    assert hcl_loss(torch.zeros(1, 1, 8, 8), t).item() == pytest.approx(expected)
    # a 4 x 8 map: its height (4) decides, as in the reference, so only the 2x2 and 1x1 pools are taken
    t = torch.zeros(1, 1, 4, 8)
    t[..., :, :2] = 4.0  # full-res MSE 4; 2x2 pool: cells (2x4) of means 2, 0 -> MSE 2; 1x1: mean 1 -> MSE 1
    expected = (4 + 0.5 * 2 + 0.25 * 1) / (1 + 0.5 + 0.25)
    assert hcl_loss(torch.zeros(1, 1, 4, 8), t).item() == pytest.approx(expected)


def test_embedding_assistant_normalises_each_token():
    """TransKD's EA embeddings are LayerNormed per token (SegFormer's OverlapPatchEmbed), not over the map."""
    from distill.transkd import OverlapEmbed

    torch.manual_seed(0)
    e = OverlapEmbed(3, 16, 7, 4)(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert e.shape == (2, 16, 8, 8)
    assert e.mean(1).abs().max() < 1e-5 and (e.var(1, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("student,teacher,variant", [("efficientformer", "resnet", "base"),
                                                     ("mobilevit", "convnext", "gl"), ("convnext", "resnet", "ea")])
def test_transkd_one_step(student, teacher, variant):
    from compress.segmentation import SegmentationNet

    torch.manual_seed(0)
    d = Distiller(SegmentationNet(student, 11, img_size=64), SegmentationNet(teacher, 11, img_size=64).eval(),
                  DistillConfig("transkd", transkd_variant=variant), InputSpec(64), InputSpec(64), 11).train()
    assert len(d.shapes.student_embeds) == len(d.shapes.teacher_embeds) == 4
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    loss = d(torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))
    loss.backward()
    torch.optim.SGD(d.parameters(), lr=0.01).step()
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    assert not any(k.startswith("helpers") for k in d.student.state_dict())


def test_transkd_refuses_non_hierarchical_and_classifiers():
    from compress.segmentation import SegmentationNet

    with pytest.raises(CompressError, match="hierarchical"):
        Distiller(SegmentationNet("vit", 11, img_size=32), SegmentationNet("resnet", 11, img_size=32),
                  DistillConfig("transkd"), InputSpec(32), InputSpec(32), 11)
    with pytest.raises(CompressError, match="does not apply to classification"):
        Distiller(create_model("resnet", num_classes=10), create_model("resnet", num_classes=10),
                  DistillConfig("transkd"), InputSpec(32), InputSpec(32), 10)


@pytest.mark.slow
def test_cli_transkd_on_digit_scenes(tmp_path):
    js = tmp_path / "t.json"
    # the paper's pairing, one family at two sizes: the teacher at EfficientFormer-L3's widths, half its depth;
    # a quarter of the training scenes (the suite's time)
    assert main(["distill", "--teacher", "efficientformer", "--train-teacher", "--teacher-epochs", "1",
                 "--teacher-args", "depths=2x2x6x3,embed_dims=64x128x320x512", "--student", "efficientformer",
                 "--data", "digit-scenes", "--subset", "fraction=0.25", "--method", "transkd", "--epochs", "1",
                 "--out", str(tmp_path / "s.pt"), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["metric"] == "miou" and {"miou", "scratch_miou", "teacher_miou"} <= set(r)
    assert r["student_macs"] <= 0.15 * r["teacher_macs"]
    assert load(tmp_path / "s.pt").task == "segmentation"
