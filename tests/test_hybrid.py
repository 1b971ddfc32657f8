"""Hybrid Distill, MIM pretraining and CNN-ViT collaborative learning: losses and masks by hand, the token
masking's schedule, one step for several family pairs, bad input, the CLI end to end."""

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
from compress.alignment import attention_maps, keep_tokens, token_layout
from compress.alignment.taps import hooked_outputs
from compress.errors import CompressError
from compress.mim import MaskedAutoencoder, patchify, reconstruction_loss
from compress.registry import create_model, default_img_size
from distill import DistillConfig, Distiller
from distill.collab import Peers, pixel_kl, region_teachers, reliable
from distill.config import DistillRun
from distill.hybrid import (
    attention_nmi,
    auto_relation_layers,
    kept_count,
    layer_ratios,
    least_attended_dropped,
    mask_ratio,
    masking_flops_saving,
    match_heads,
    mean_attention_distance,
    relation_loss,
    select_relations,
)
from tests.helpers import SLIM_RESNET, SLIM_RESNET_ARGS, free_port

VIT2 = {"depth": 2}


def test_relation_loss_is_zero_for_equal_maps_and_positive_otherwise():
    a = torch.softmax(torch.randn(2, 3, 9, 9), -1)
    b = torch.softmax(torch.randn(2, 3, 9, 9), -1)
    assert relation_loss(a, a).abs().item() < 1e-6
    assert relation_loss(a, b).item() > 0.01
    t6 = torch.softmax(torch.randn(2, 6, 9, 9), -1)  # 6 teacher heads onto 3 student heads: pairs averaged
    grouped, _ = match_heads(t6, a)
    assert torch.allclose(grouped[:, 1], (t6[:, 2] + t6[:, 3]) / 2)
    assert relation_loss(t6, grouped).abs().item() < 1e-6  # a student equal to the grouped teacher: zero
    assert relation_loss(t6, a).item() > 0.01


def test_relations_of_kept_tokens_are_renormalised_rows_and_columns():
    a = torch.softmax(torch.randn(1, 2, 5, 5), -1)  # 1 prefix + 4 patches
    keep = torch.tensor([[1, 3]])
    sel = select_relations(a, keep, prefix=1)
    idx = [0, 2, 4]
    ref = a[:, :, idx][:, :, :, idx]
    assert torch.allclose(sel, ref / ref.sum(-1, keepdim=True)) and torch.allclose(sel.sum(-1), torch.ones(1, 2, 3))


def test_masking_schedule_keeps_cls_and_removes_exactly_the_scheduled_tokens():
    assert [mask_ratio(e, 5, 0.5) for e in range(5)] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert [kept_count(64, mask_ratio(e, 5, 0.5)) for e in range(5)] == [64, 56, 48, 40, 32]
    assert [kept_count(64, mask_ratio(e, 6, 0.5, 1 / 3)) for e in range(6)] == [64, 53, 43, 32, 64, 64]
    assert least_attended_dropped(torch.tensor([[0.1, 0.5, 0.2, 0.3]]), 2).tolist() == [[1, 3]]
    assert auto_relation_layers(12) == [8, 9, 10, 11] and auto_relation_layers(4) == [3]
    torch.manual_seed(0)
    d = _hybrid_distiller()
    seen = []
    d.student.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for epoch in range(5):
        d.set_epoch(epoch, 5)
        d.train()
        with torch.no_grad():
            d(x, y)
        assert seen[-1] == 1 + kept_count(64, mask_ratio(epoch, 5, 0.5, 0.2))  # CLS + the kept patches
    assert seen == [65, 54, 44, 33, 65]
    assert type(d.student.patch_drop).__name__ != "_Keep"  # the student is left as it was
    # the kept sequence is the CLS token followed by exactly the chosen patches, with their positions
    m = d.student.eval()
    with hooked_outputs(m, ["patch_drop"]) as full:
        m(x)
    keep = torch.tensor([[0, 7, 63]] * 4)
    with keep_tokens(m, keep), hooked_outputs(m, ["patch_drop"]) as short:
        m(x)
    assert torch.equal(short["patch_drop"], full["patch_drop"][:, [0, 1, 8, 64]])


def test_layer_schedule_prunes_tokens_block_by_block():
    """--mask-schedule layer: before each block of a 4-block student, the patches the teacher's CLS attends
    most, 0 to 50% removed across the blocks (64, 53, 43, 32 patches), the CLS token always first; each block's
    patches among the previous block's; the last epochs (mask_full_share) on every token."""
    from compress.alignment import keep_tokens_from

    assert layer_ratios(4, 0.5) == [0.0, 0.5 / 3, 1 / 3, 0.5]
    torch.manual_seed(0)
    s = create_model("vit", num_classes=10)  # 4 blocks
    t, mim = (create_model("vit", num_classes=10, **VIT2).eval() for _ in range(2))
    d = Distiller(s, t, DistillConfig("hybrid", mask_schedule="layer"), InputSpec(32), InputSpec(32), 10,
                  mim_teacher=mim, mim_spec=InputSpec(32))
    seen = {i: [] for i in range(4)}
    for i, blk in enumerate(s.blocks):  # what each block computes on (its pruning runs at its own input)
        blk.norm1.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0]))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for epoch, want in [(0, [65, 54, 44, 33]), (4, [65] * 4)]:
        d.set_epoch(epoch, 5)
        d.train()
        loss = d(x, y)
        assert torch.isfinite(loss) and [seen[i][-1].shape[1] for i in range(4)] == want
    loss.backward()  # the relation and feature terms reach the student through the shortened sequences
    assert all(p.grad is not None for p in s.blocks[3].parameters())
    with torch.no_grad():  # the CLS token is kept, and block 2 sees exactly the patches it was given
        ref = s.eval()
        full = {}
        hooks = [blk.norm1.register_forward_pre_hook(lambda m, a, i=i: full.__setitem__(i, a[0]))
                 for i, blk in enumerate(ref.blocks)]
        keep2, keep3 = torch.tensor([[1, 5, 9, 30]]), torch.tensor([[5, 30]])
        with keep_tokens_from(ref, {"blocks.2": keep2, "blocks.3": keep3}):
            ref(x[:1])
        pruned = dict(full)
        ref(x[:1])
        for h in hooks:
            h.remove()
    assert pruned[2].shape[1] == 5 and torch.allclose(pruned[2], full[2][:, [0, 2, 6, 10, 31]], atol=1e-6)
    with pytest.raises(CompressError, match="not among the sequence's"):
        with keep_tokens_from(ref, {"blocks.2": keep2, "blocks.3": torch.tensor([[5, 31]])}):
            ref(x[:1])
    assert masking_flops_saving(s, token_layout(s), 32, 3, 5, 0.5, 0.2, [f"blocks.{i}" for i in range(4)]) > 0.1


def test_attention_maps_unfuse_only_what_they_read_and_keep_gradients():
    m = create_model("vit", **VIT2).train()
    with attention_maps(m, only=["blocks.1.attn"], detach=False) as maps:
        assert m.blocks[0].attn.fused_attn and not m.blocks[1].attn.fused_attn
        m(torch.randn(2, 3, 32, 32))
    assert set(maps) == {"blocks.1.attn"} and maps["blocks.1.attn"].requires_grad
    assert m.blocks[1].attn.fused_attn
    with pytest.raises(CompressError, match="no readable attention"):
        with attention_maps(m, only=["blocks.9.attn"]):
            pass


def test_mean_attention_distance_by_hand():
    a = torch.zeros(1, 1, 5, 5)
    a[0, 0, 1:, 1] = 1.0  # every patch of a 2x2 grid attends to patch (0, 0)
    d = mean_attention_distance(a, (2, 2), prefix=1)
    assert torch.allclose(d, torch.tensor([(0 + 1 + 1 + 2 ** 0.5) / 4]))


def test_attention_nmi_by_hand():
    """Query-key NMI: 1 when each patch attends only to itself, 0 when every query attends alike, and by hand
    for two patches that attend 3:1 to themselves (I = 0.75 ln 1.5 + 0.25 ln 0.5, H(Q) = H(K) = ln 2)."""
    assert attention_nmi(torch.eye(5).expand(2, 3, 5, 5), 1).tolist() == pytest.approx([1.0] * 3)
    assert attention_nmi(torch.full((1, 1, 5, 5), 0.2), 1).tolist() == pytest.approx([0.0], abs=1e-7)
    a = torch.zeros(1, 1, 3, 3)
    a[0, 0, 1:, 1:] = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / math.log(2)
    assert attention_nmi(a, 1).item() == pytest.approx(expected, rel=1e-5)


def _hybrid_distiller(method="hybrid", teacher="vit", student="vit", mim_args=None, **cfg):
    t_args = SLIM_RESNET if teacher == "resnet" else VIT2
    t = create_model(teacher, num_classes=10, **t_args).eval()
    mim = create_model("vit", num_classes=10, **{**VIT2, **(mim_args or {})}).eval()
    s = create_model(student, num_classes=10, **(VIT2 if student in ("vit", "deit") else {}))
    size = default_img_size(student)
    return Distiller(s, t, DistillConfig(method, **cfg), InputSpec(size), InputSpec(default_img_size(teacher)), 10,
                     mim_teacher=mim if method == "hybrid" else None, mim_spec=InputSpec(32))


@pytest.mark.parametrize("method,teacher,student", [("hybrid", "vit", "vit"), ("hybrid", "resnet", "deit"),
                                                    ("fd", "resnet", "vit"), ("hybrid", "vit", "deit")])
def test_hybrid_one_step(method, teacher, student):
    torch.manual_seed(0)
    d = _hybrid_distiller(method, teacher, student)
    d.set_epoch(3, 4)
    d.train()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.05)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    loss = d(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    assert not any(k.startswith(("teacher.", "mim_teacher.")) for k in d.state_dict())
    if method == "hybrid":
        assert d.method.score_from == ("teacher" if teacher == "vit" else "mim")


def test_hybrid_bad_input():
    with pytest.raises(CompressError, match="no readable token attention"):
        _hybrid_distiller("hybrid", "vit", "resnet")
    with pytest.raises(CompressError, match="token grid cannot be matched"):
        _hybrid_distiller("hybrid", "vit", "vit", mim_args={"patch_size": 8})
    with pytest.raises(CompressError, match="--mim-teacher"):
        DistillRun(student="vit", method="hybrid")
    with pytest.raises(CompressError, match="relation layer out of range"):
        _hybrid_distiller("hybrid", relation_layers=[7])


def test_mim_pretraining_learns_to_reconstruct():
    assert patchify(torch.arange(16.).view(1, 1, 4, 4), 2)[0, 1].tolist() == [2, 3, 6, 7]
    from compress.data import load_data
    from compress.train import TrainConfig, train

    d = load_data("digits", InputSpec(32))
    torch.manual_seed(0)
    mae = MaskedAutoencoder(create_model("vit", num_classes=10, **VIT2))
    assert mae.kept() == 16  # 25% of 64 patches reach the encoder
    before = reconstruction_loss(mae, d.test)
    train(mae, d.train, TrainConfig(epochs=3, lr=2e-3), loss_fn=lambda net, x, y: net(x))
    after = reconstruction_loss(mae, d.test)
    assert after < 0.8 * before, (before, after)
    with pytest.raises(CompressError, match="readable token attention"):
        MaskedAutoencoder(create_model("resnet", num_classes=10, **SLIM_RESNET))


def test_bsd_masks_by_hand():
    e_a = torch.tensor([[[0.2, 0.9], [0.5, 0.5]]])
    e_b = torch.tensor([[[0.4, 0.1], [0.5, 0.7]]])
    a_teaches, b_teaches = region_teachers(e_a, e_b)
    assert a_teaches.tolist() == [[[True, False], [False, True]]]
    assert b_teaches.tolist() == [[[False, True], [False, False]]]
    # per pixel: (B=1, C=3, H=1, W=4); labels with one ignored pixel
    p_t = torch.tensor([[0.7, 0.2, 0.6, 0.1], [0.2, 0.7, 0.3, 0.1], [0.1, 0.1, 0.1, 0.8]]).view(1, 3, 1, 4)
    p_l = torch.tensor([[0.5, 0.1, 0.8, 0.3], [0.3, 0.8, 0.1, 0.3], [0.2, 0.1, 0.1, 0.4]]).view(1, 3, 1, 4)
    y = torch.tensor([[[0, 1, 0, 255]]])
    assert reliable(p_t, p_l, y, "correct_and_confident").tolist() == [[[True, False, False, False]]]
    assert reliable(p_t, p_l, y, "correct").tolist() == [[[True, True, True, False]]]
    assert reliable(p_t, p_l, y, "confident").tolist() == [[[True, False, False, False]]]
    assert reliable(p_t, p_l, y, "where_wrong").tolist() == [[[False, False, False, False]]]  # the learner is right
    # per sample: teacher right / learner wrong, both right, both wrong, teacher wrong / learner right, and teacher
    # right / learner wrong but more confident in the label than the teacher
    p_t = torch.tensor([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0], [0.4, 0.3, 0.3]])
    p_l = torch.tensor([[0.4, 0.6, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.7, 0.3, 0.0], [0.45, 0.55, 0.0]])
    mask = reliable(p_t, p_l, torch.zeros(5, dtype=torch.long), "where_wrong")
    assert mask.tolist() == [True, False, False, False, False]
    z = torch.randn(2, 5)
    assert pixel_kl(z, z, torch.ones(2)).abs().item() < 1e-6
    assert pixel_kl(z, torch.randn(2, 5), torch.zeros(2)).item() == 0


def test_pixel_kl_at_a_temperature_is_tau_squared_times_the_kl_of_the_softened_predictions():
    """`--pixel-temperature` (collab's and DML's KL alike): tau^2 * mean over positions of the mask times
    KL(softmax(z_t / tau) || softmax(z_l / tau)), by hand; tau <= 0 is refused before training."""
    torch.manual_seed(0)
    z_l, z_t, mask = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3) * 5, (torch.rand(6, 3, 3) > 0.5).float()
    for tau in (1.0, 4.0):
        p_t, p_l = (z_t / tau).softmax(1), (z_l / tau).softmax(1)
        by_hand = tau ** 2 * ((p_t * (p_t.log() - p_l.log())).sum(1) * mask).mean()
        assert torch.allclose(pixel_kl(z_l, z_t, mask, tau), by_hand, atol=1e-5)
    with pytest.raises(CompressError, match="pixel_temperature=0"):
        DistillRun(student="resnet", peer="vit", method="collab", pixel_temperature=0)
    # the DML baseline's loss takes the same tau: both cross-entropies plus the two KLs at tau, by hand
    a_ck = Checkpoint("resnet", dict(SLIM_RESNET), 10, "classification", InputSpec(32))
    b_ck = Checkpoint("vit", {"depth": 2}, 10, "classification", InputSpec(32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    peers = Peers(a_ck.instantiate(), b_ck.instantiate(), a_ck.input, b_ck.input,
                  DistillRun(student="resnet", peer="vit", method="dml", pixel_temperature=4.0), 10,
                  "classification").eval()
    with torch.no_grad():
        za, zb = peers.a(x), peers.b(peers.b_input(x))
        every = torch.ones(4)
        by_hand = (F.cross_entropy(za, y) + F.cross_entropy(zb, y) + pixel_kl(za, zb, every, 4.0)
                   + pixel_kl(zb, za, every, 4.0))
        assert torch.allclose(peers(x, y), by_hand, atol=1e-5)
        assert not torch.allclose(by_hand, F.cross_entropy(za, y) + F.cross_entropy(zb, y) + pixel_kl(za, zb, every)
                                  + pixel_kl(zb, za, every), atol=1e-3)


@pytest.mark.parametrize("task,student,peer,features", [("classification", "resnet", "vit", None),
                                                        ("classification", "convnext", "swin", None),
                                                        ("segmentation", "resnet", "vit", None),
                                                        ("segmentation", "resnet", "vit", 1.0),
                                                        ("segmentation", "resnet", "pvt", 1.0)])
@pytest.mark.parametrize("method", ["collab", "dml"])
def test_peers_one_step(task, student, peer, features, method):
    torch.manual_seed(0)
    cfg = DistillRun(student=student, peer=peer, method=method, region_metric="cell" if peer == "swin" else "auto",
                     hfd_weight=features, region_weight=features)
    size = 32
    classes = 11 if task == "segmentation" else 10
    a_ck = Checkpoint(student, dict(SLIM_RESNET) if student == "resnet" else {}, classes, task, InputSpec(size))
    b_ck = Checkpoint(peer, {"depth": 2} if peer == "vit" else {}, classes, task, InputSpec(size))
    peers = Peers(a_ck.instantiate(), b_ck.instantiate(), a_ck.input, b_ck.input, cfg, classes, task).train()
    groups = peers.param_groups(1e-3)
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(list(peers.parameters()))
    opt = torch.optim.AdamW(groups)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (peers.a, peers.b)]
    y = torch.randint(0, classes, (4, size, size) if task == "segmentation" else (4,))
    loss = peers(torch.randn(4, 3, size, size), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for m, b in zip((peers.a, peers.b), before):
        assert any(not torch.equal(b[k], v) for k, v in m.state_dict().items())
    if method == "collab":
        peers.record(0)
        h = peers.history[-1]
        if task == "segmentation" and features is None:  # the feature terms are off: no adapters, no region shares
            assert "regions_a_to_b" not in h and len(peers.a_side) == len(peers.b_side) == 0
        else:
            assert 0 <= h["regions_a_to_b"] + h["regions_b_to_a"] <= 1 and "region" in peers.a_side


def test_collab_transfer_history_survives_a_resume(tmp_path):
    """The resumable state (the module's state dict, read back without pickled code) carries the transfer history
    and the open epoch's counts: a resumed run reports every epoch, the one it was stopped after included."""
    torch.manual_seed(0)
    cfg = DistillRun(student="resnet", peer="vit", method="collab")

    def peers():
        a = Checkpoint("resnet", dict(SLIM_RESNET), 10, "classification", InputSpec(32)).instantiate()
        return Peers(a, create_model("vit", num_classes=10, **VIT2), InputSpec(32), InputSpec(32), cfg, 10,
                     "classification").train()

    first = peers()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    first(x, y)
    first.set_epoch(1, 2)  # epoch 1 closed
    first(x, y)  # epoch 2 under way: its counts are open when the state is saved
    torch.save(first.state_dict(), tmp_path / "s.pt")
    again = peers()
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert again.history == first.history and len(again.history) == 1
    assert torch.equal(again.counts, first.counts) and again.counts.sum() > 0
    again.record(1)
    first.record(1)
    assert again.history == first.history and [h["epoch"] for h in again.history] == [1, 2]


def test_peers_gradients_stay_with_their_own_peer():
    """Every cross term detaches its target: the student's loss alone never reaches the peer."""
    torch.manual_seed(0)
    cfg = DistillRun(student="resnet", peer="vit", method="collab")
    a = Checkpoint("resnet", dict(SLIM_RESNET), 10, "classification", InputSpec(32)).instantiate()
    b = create_model("vit", num_classes=10, **VIT2)
    peers = Peers(a, b, InputSpec(32), InputSpec(32), cfg, 10, "classification").train()
    peers.a.requires_grad_(False)  # only the peer's parameters collect gradients
    loss = peers(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    loss.backward()
    zb = peers.b(torch.randn(1, 3, 32, 32))
    assert zb.shape == (1, 10) and all(p.grad is None for p in peers.a.parameters())


def test_collab_bad_input(tmp_path, capsys):
    with pytest.raises(CompressError, match="--peer"):
        DistillRun(student="resnet", method="collab")
    with pytest.raises(CompressError, match="--peer"):
        DistillRun(student="resnet", peer="vit", method="ofa")
    from tests.tiny_arch import tiny_cnn

    one_stage = tiny_cnn()
    one_stage.feature_info = one_stage.feature_info[:1]
    with pytest.raises(CompressError, match="cannot be paired"):
        Peers(one_stage, create_model("vit", **VIT2), InputSpec(32), InputSpec(32),
              DistillRun(student="tests.tiny_arch:tiny_cnn", peer="vit", method="collab"), 10, "classification")
    assert main(["distill", "--teacher", "x.pt", "--method", "collab", "--student", "resnet", "--peer", "vit",
                 "--out", str(tmp_path / "c.pt")]) == 2
    assert "takes no teacher" in capsys.readouterr().err


def test_collab_peers_start_from_checkpoints(tmp_path):
    """A peer given as a checkpoint starts from its weights in every row (here at a learning rate of ~0 the
    peer ends where its checkpoint scores); a checkpoint with architecture args, of another task (a segmentation
    network for digits) or other classes is refused."""
    from compress.measure import score
    from compress.segmentation import segmenter_from
    from distill.collab import run_collab

    peer = tmp_path / "vit.pt"
    save(Checkpoint.create("vit", num_classes=10, arch_args={"depth": 2}, seed=5), peer)
    cfg = DistillRun(student="resnet", student_args=dict(SLIM_RESNET), peer=str(peer), method="collab", epochs=1,
                     peer_lr=1e-12, subset="fraction=0.15", seed=0, peer_out=str(tmp_path / "out.peer.pt"))
    ckpt, r = run_collab(None, "digits", cfg)
    from compress.data import load_data

    own = score(load(peer).build(), load_data("digits", InputSpec(32)).test, 10, "classification")
    assert math.isclose(r["peer_top1"], own, abs_tol=1e-9) and math.isclose(r["peer_solo_top1"], own, abs_tol=1e-9)
    assert {row.name for row in r.rows} >= {"peer vit: collab", "peer vit: alone", "peer vit: dml"}
    assert ckpt.arch == "resnet" and ckpt.provenance["parents"] == []  # the student started fresh
    assert load(tmp_path / "out.peer.pt").provenance["parents"] == [str(peer)]
    with pytest.raises(CompressError, match="--peer-args shape a new model"):
        run_collab(None, "digits", DistillRun(student="resnet", peer=str(peer), peer_args={"depth": 2},
                                              method="collab"))
    seg = tmp_path / "seg.pt"  # (a classifier starts a segmentation peer: tests/test_backbone_start.py)
    save(segmenter_from(load(peer), num_classes=11), seg)
    with pytest.raises(CompressError, match="is a segmentation model"):
        run_collab(None, "digits", DistillRun(student="resnet", peer=str(seg), method="collab"))
    other = tmp_path / "vit5.pt"
    save(Checkpoint.create("vit", num_classes=5, arch_args={"depth": 2}, seed=5), other)
    with pytest.raises(CompressError, match="another number of classes"):
        run_collab(None, "digits", DistillRun(student="resnet", peer=str(other), method="collab"))


@pytest.mark.slow
def test_cli_mim_then_hybrid_then_collab(tmp_path):
    sup, mim, out, js = (tmp_path / n for n in ("sup.pt", "mim.pt", "h.pt", "h.json"))
    part = ["--subset", "fraction=0.3"]  # what runs is asserted here, not how well (the suite's time)
    assert main(["train", "--arch", "vit", "--arch-args", "depth=2", "--epochs", "2", *part, "--out", str(sup)]) == 0
    assert main(["train", "--arch", "vit", "--arch-args", "depth=2", "--objective", "mim", "--epochs", "1", *part,
                 "--out", str(mim), "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["metric"] == "mim_loss" and m["score"] > 0 and load(mim).arch == "vit"
    assert main(["distill", "--teacher", str(sup), "--mim-teacher", str(mim), "--student", "vit", "--student-args",
                 "depth=2", "--method", "hybrid", "--epochs", "2", *part, "--out", str(out), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert {"top1", "fd_top1", "scratch_top1", "kd_top1"} <= set(r)
    below = [m for m in ("scratch", "kd", "fd") if round(r["top1"], 2) < round(r[f"{m}_top1"], 2)]
    assert [n.split("--method ")[1].split()[0] for n in r["notes"] if "ends below" in n] == below
    assert 0 < r["masking_flops_saving"] < 0.5 and r["mask_score"] == "teacher"
    assert set(r["attention_distance"]) == set(r["attention_nmi"]) == {"student", "fd_student", "mim_teacher"}
    assert all(0 <= v <= 1 for layer in r["attention_nmi"]["student"].values() for v in layer)
    assert set(load(out).state_dict) == set(create_model("vit", num_classes=10, **VIT2).state_dict())
    out, js = tmp_path / "c.pt", tmp_path / "c.json"
    assert main(["distill", "--method", "collab", "--student", "resnet", "--student-args", SLIM_RESNET_ARGS,
                 "--peer", "vit", "--peer-args", "depth=2", "--epochs", "2", "--out", str(out), "--json",
                 str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["top1"] > 30 and {"peer_top1", "solo_top1", "peer_solo_top1", "dml_top1", "peer_dml_top1"} <= set(r)
    assert len(r["transfers"]) == 2 and (tmp_path / "c.peer.pt").exists()
    assert load(tmp_path / "c.peer.pt").arch == "vit" and load(out).arch == "resnet"
    assert main(["eval", str(tmp_path / "c.peer.pt"), "--latency-runs", "2"]) == 0


@pytest.mark.slow
def test_torchrun_collab_and_hybrid_two_cpu_processes(tmp_path):
    """Both methods data-parallel under torchrun (2 processes, gloo): collab saves both peers and reports one
    transfer row per epoch, its counts summed over the processes; hybrid masks the student's tokens."""
    part = ["--subset", "fraction=0.3", "--no-baselines", "--threads", "1"]
    sup, mim = tmp_path / "sup.pt", tmp_path / "mim.pt"
    assert main(["train", "--arch", "vit", "--arch-args", "depth=2", "--epochs", "1", *part[:2],
                 "--out", str(sup)]) == 0
    assert main(["train", "--arch", "vit", "--arch-args", "depth=2", "--objective", "mim", "--epochs", "1", *part[:2],
                 "--out", str(mim)]) == 0
    runs = {"c": ["--method", "collab", "--student", "resnet", "--student-args", SLIM_RESNET_ARGS, "--peer", "vit",
                  "--peer-args", "depth=2"],
            "h": ["--method", "hybrid", "--teacher", str(sup), "--mim-teacher", str(mim), "--student", "vit",
                  "--student-args", "depth=2"]}
    root = Path(__file__).resolve().parents[1]
    for name, args in runs.items():
        out, js = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(root / "cli.py"), "distill", *args, "--epochs", "2", *part, "--out", str(out), "--json", str(js)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "strides" not in proc.stderr  # DDP's warning for non-contiguous gradients (the adapters' once)
        r = json.loads(js.read_text())
        if name == "c":
            assert [t["epoch"] for t in r["transfers"]] == [1, 2]
            assert all(0 <= v <= 1 for t in r["transfers"] for k, v in t.items() if k != "epoch")
            assert load(tmp_path / "c.peer.pt").arch == "vit" and load(out).arch == "resnet"
        else:
            assert 0 < r["masking_flops_saving"] < 0.5 and load(out).arch == "vit"


def test_collab_says_which_terms_its_defaults_turn_off():
    from distill.collab import defaults_off

    run = lambda **kw: DistillRun(student="resnet", peer="vit", method="collab", **kw)  # noqa: E731
    both, = defaults_off(run(), "segmentation")
    assert both.startswith("segmentation: the HFD and region feature terms are off by default")
    assert both.endswith("--hfd-weight 1 --region-weight 1 turns them on")
    one, = defaults_off(run(hfd_weight=0.5), "segmentation")  # asked for: on, and not reported as off
    assert one.startswith("segmentation: the region feature term is off") and "HFD" not in one
    assert defaults_off(run(), "classification") == defaults_off(run(hfd_weight=0.0, region_weight=0.0),
                                                                 "segmentation") == []


def test_token_layout_and_keep_tokens_errors():
    lay = token_layout(create_model("vit", **VIT2))
    assert lay.grid == (8, 8) and lay.prefix == 1 and lay.droppable and len(lay.attention) == 2
    with pytest.raises(CompressError, match="out of range"):
        with keep_tokens(create_model("vit", **VIT2), torch.tensor([[64]])):
            pass
    x = torch.randn(2, 3, 32, 32)
    m = create_model("vit", **VIT2).eval()
    with keep_tokens(m, torch.arange(64).expand(2, -1)):
        same = m(x)
    assert torch.allclose(same, m(x), atol=1e-5)  # keeping every patch is the plain forward
    assert F.mse_loss(same, m(x)) < 1e-10


def test_a_collab_step_in_a_recipe_takes_no_input(tmp_path):
    from compress.chain import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - kind: train\n    arch: vit\n  - kind: distill\n    method: collab\n"
                    "    student: resnet\n    peer: vit\n")
    plan = load_recipe(path)
    assert plan.steps[1].sources == [] and plan.steps[1].config.peer == "vit"
    path.write_text(path.read_text() + "    from: train\n")
    with pytest.raises(CompressError, match="'from' is not for this step"):
        load_recipe(path)


def test_region_direction_by_whole_image_loss():
    torch.manual_seed(0)
    cfg = DistillRun(student="resnet", peer="vit", method="collab", region_metric="sample")
    a = Checkpoint("resnet", dict(SLIM_RESNET), 10, "classification", InputSpec(32)).instantiate()
    peers = Peers(a, create_model("vit", **VIT2), InputSpec(32), InputSpec(32), cfg, 10, "classification")
    assert "probe" not in peers.a_side
    auto = Peers(a, create_model("vit", **VIT2), InputSpec(32), InputSpec(32),
                 DistillRun(student="resnet", peer="vit", method="collab"), 10, "classification").cfg
    assert (auto.region_metric, auto.hfd_weight, auto.region_weight, auto.pixel_rule) == ("sample", 1, 1, "where_wrong")
    seg = DistillRun(student="resnet", peer="vit", method="collab").for_task("segmentation")
    assert (seg.hfd_weight, seg.region_weight, seg.region_metric) == (0, 0, "cell")
    assert DistillRun(student="resnet", peer="vit", method="collab", hfd_weight=0.5).for_task("segmentation").hfd_weight == 0.5
    za, zb, y = torch.randn(3, 10), torch.randn(3, 10), torch.tensor([1, 2, 3])
    e_a, e_b, extra = peers._region_losses(None, None, za, zb, y)
    ce_a = F.cross_entropy(za, y, reduction="none")
    assert extra == 0.0 and e_a.shape == (3, peers.grid, peers.grid)
    assert torch.allclose(e_a, ce_a.view(-1, 1, 1).expand_as(e_a))
    assert torch.equal(region_teachers(e_a, e_b)[0][:, 0, 0], ce_a < F.cross_entropy(zb, y, reduction="none"))


class _Fixed(torch.nn.Module):
    """A "model" whose outputs are given: image i (its first pixel holds i) gets outputs[i]."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.register_buffer("outputs", outputs)

    def forward(self, x):
        return self.outputs[x[:, 0, 0, 0].long()]


def test_complementarity_counts_what_only_each_model_gets_right():
    from compress.measure import complementarity

    idx = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2)
    y = torch.tensor([0, 1, 1, 0])
    a = _Fixed(F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float())  # right on images 0, 1
    b = _Fixed(F.one_hot(torch.tensor([1, 1, 1, 1]), 2).float())  # right on images 1, 2
    data = torch.utils.data.TensorDataset(idx, y)
    assert complementarity(a, b, data) == (25.0, 25.0)
    # per pixel, ignored pixels not counted: 2 x 2 maps, one pixel 255
    ys = torch.tensor([[[0, 1], [1, 255]]]).expand(4, 2, 2).contiguous()
    pa = F.one_hot(torch.tensor([[0, 1], [0, 0]]), 2).permute(2, 0, 1).float()  # right on pixels (0,0), (0,1)
    pb = F.one_hot(torch.tensor([[1, 1], [1, 1]]), 2).permute(2, 0, 1).float()  # right on (0,1), (1,0)
    seg = torch.utils.data.TensorDataset(idx, ys)
    only_a, only_b = complementarity(_Fixed(pa.expand(4, -1, -1, -1)), _Fixed(pb.expand(4, -1, -1, -1)), seg)
    assert (round(only_a, 4), round(only_b, 4)) == (33.3333, 33.3333)


def test_collab_measures_what_each_peer_alone_knows_that_the_other_lacks():
    """The baselines' ensemble and complementarity, with a peer at another input size than the student (its
    alone run was once scored on the student's 32 px images)."""
    from distill.collab import little_to_teach, peers_below_baselines, run_collab

    cfg = DistillRun(student="resnet", student_args=dict(SLIM_RESNET), peer="vit",
                     peer_args={"depth": 2, "img_size": 48}, method="collab", epochs=1, subset="fraction=0.15",
                     seed=0)
    _, r = run_collab(None, "digits", cfg)
    v = r.values
    # of one test set: accuracy(a) - accuracy(b) = only a right - only b right, exactly
    assert math.isclose(v["solo_top1"] - v["peer_solo_top1"], v["only_student_right"] - v["only_peer_right"],
                        abs_tol=1e-6)
    assert 0 <= v["solo_ensemble_top1"] <= 100 and v["only_student_right"] + v["only_peer_right"] <= 100
    assert little_to_teach(v, "top1") == [n for n in r.notes if n.startswith("trained alone")]
    shown = {row.name: row.score for row in r.rows}  # every model measured is in the report's table
    assert shown == {"student resnet: collab": v["top1"], "peer vit: collab": v["peer_top1"],
                     "student resnet: alone": v["solo_top1"], "peer vit: alone": v["peer_solo_top1"],
                     "student resnet: dml": v["dml_top1"], "peer vit: dml": v["peer_dml_top1"]}
    weak = {"solo_miou": 26.5, "peer_solo_miou": 14.5, "solo_ensemble_miou": 24.8, "only_student_right": 5.1,
            "only_peer_right": 0.4}
    note, = little_to_teach(weak, "miou")  # only the stronger peer is told: the ensemble lifts the weaker one
    assert "no better than the student alone (26.50)" in note and "right on 0.4%" in note
    assert little_to_teach({**weak, "solo_ensemble_miou": 27.0}, "miou") == []
    assert set(peers_below_baselines(v, "top1")) <= set(r.notes)


def test_collab_says_when_a_peer_ends_below_a_baseline_of_its_run():
    """Below itself alone or below the same pair trained by plain mutual learning, each peer is told; level or
    above as printed (two decimals), nothing."""
    from distill.collab import peers_below_baselines

    v = {"method": "collab", "top1": 99.16, "solo_top1": 98.82, "dml_top1": 99.24,
         "peer_top1": 95.55, "peer_solo_top1": 95.554, "peer_dml_top1": 96.64}
    student, peer = peers_below_baselines(v, "top1")
    assert student.startswith("the student trained by collab (99.16)") and "(99.24)" in student
    assert "--method dml gives the better student" in student
    assert peer.startswith("the peer trained by collab (95.55)") and "mutual learning (96.64)" in peer
    alone = peers_below_baselines({**v, "dml_top1": 99.0, "peer_dml_top1": 95.0, "solo_top1": 99.5}, "top1")
    assert alone == ["the student trained with its peer (99.16) ends below the same model trained alone (99.50)"]
    assert peers_below_baselines({"method": "collab", "miou": 26.0}, "miou") == []  # no baselines run: nothing to say


def test_collab_with_no_transfer_term_trains_each_peer_exactly_as_alone():
    """The baselines differ from collab by its terms only: with every transfer weight at 0 each peer ends
    exactly where it ends alone (same initial weights, batches and shifts). Before, the peer beside the student
    was drawn after it and started elsewhere than alone (here the peer ended at 10.83 against 8.31 alone)."""
    from distill.collab import run_collab

    cfg = DistillRun(student="resnet", student_args=dict(SLIM_RESNET), peer="vit", peer_args=VIT2, method="collab",
                     epochs=1, subset="fraction=0.15", seed=0, hfd_weight=0, region_weight=0, pixel_weight=0)
    _, r = run_collab(None, "digits", cfg)
    v = r.values
    assert v["top1"] == v["solo_top1"] and v["peer_top1"] == v["peer_solo_top1"]
