"""A segmentation network started from a classifier's backbone (a model trained on labels, an MAE encoder,
timm's published weights): the backbone computes exactly the classifier's features, a size-bound backbone is
resampled to a new size, the head starts fresh, and every command that starts a segmentation model from a
checkpoint takes one."""

import json

import pytest
import torch

from cli import main
from compress import Checkpoint, CompressError, load, save
from compress.checkpoint import for_task
from compress.segmentation import segmenter_from

from .helpers import SLIM_RESNET, perturb_


@pytest.mark.parametrize("arch, args", [("resnet", SLIM_RESNET), ("vit", {"depth": 2}), ("swin", {})])
def test_the_backbone_computes_exactly_the_classifiers_features(arch, args):
    cls = Checkpoint.create(arch, num_classes=10, arch_args=args, seed=0)
    model = cls.build()
    perturb_(model)  # a fresh init's zero biases and unit norms would hide a tensor left behind
    cls.state_dict = model.state_dict()
    seg = segmenter_from(cls, num_classes=11)
    assert (seg.task, seg.num_classes, seg.input) == ("segmentation", 11, cls.input)
    net = seg.build()
    model.reset_classifier(0)
    x = torch.randn(2, 3, cls.input.size, cls.input.size)
    with torch.no_grad():
        assert torch.equal(net.backbone(x), model(x))
        assert net(x).shape == (2, 11, cls.input.size, cls.input.size)


def test_a_size_bound_backbone_is_resampled_and_a_cnn_taken_as_it_is():
    vit = Checkpoint.create("vit", num_classes=10, arch_args={"depth": 2}, seed=0)  # 32 px, patches of 4: 8x8 grid
    seg = segmenter_from(vit, num_classes=11, size=64)
    assert seg.arch_args["img_size"] == 64 and seg.input.size == 64
    state = seg.build().backbone.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 16 * 16, 96)  # the class token's + a 16x16 grid
    assert torch.equal(state["pos_embed"][:, 0], vit.state_dict["pos_embed"][:, 0])
    assert all(torch.equal(v, vit.state_dict[k]) for k, v in state.items() if k != "pos_embed")
    cnn = Checkpoint.create("resnet", num_classes=10, arch_args=SLIM_RESNET, seed=0)
    seg = segmenter_from(cnn, num_classes=11, size=64)
    assert seg.arch_args == cnn.arch_args and seg.build()(torch.randn(1, 3, 64, 64)).shape == (1, 11, 64, 64)
    with pytest.raises(CompressError, match="cannot resize the weights of mixer from 32 to 64 px"):
        segmenter_from(Checkpoint.create("mixer", num_classes=10, seed=0), num_classes=11, size=64)


def test_what_cannot_start_a_segmentation_network_is_refused(tmp_path):
    cls_file = tmp_path / "vit.pt"
    save(Checkpoint.create("vit", arch_args={"depth": 2}, seed=0), cls_file)
    seg = segmenter_from(Checkpoint.create("resnet", arch_args=SLIM_RESNET, seed=0), num_classes=11)
    with pytest.raises(CompressError, match="is a segmentation model"):
        segmenter_from(seg, num_classes=11)
    with pytest.raises(CompressError, match="predicts another number of classes"):
        for_task(seg, "segmentation", 5)
    import distill
    from distill.config import DistillRun

    with pytest.raises(CompressError, match="--student-args shape a new model"):  # once silently ignored
        distill.run("teacher.pt", "digits", DistillRun(student=str(cls_file), student_args={"depth": 2}, method="kd"))
    pruned = Checkpoint.create("resnet", arch_args=SLIM_RESNET, seed=0)
    pruned.structure = [{"op": "width"}]
    with pytest.raises(CompressError, match="pruned classifier"):
        segmenter_from(pruned, num_classes=11)


@pytest.mark.slow
def test_train_and_collab_start_segmentation_models_from_a_classifier(tmp_path):
    cls = tmp_path / "cnn.pt"
    save(Checkpoint.create("resnet", num_classes=10, arch_args=SLIM_RESNET, seed=0), cls)
    out, js = tmp_path / "seg.pt", tmp_path / "seg.json"
    assert main(["train", "--init", str(cls), "--data", "digit-scenes", "--epochs", "1", "--subset", "fraction=0.1",
                 "--out", str(out), "--json", str(js)]) == 0
    r, seg = json.loads(js.read_text()), load(out)
    assert seg.task == "segmentation" and seg.provenance["parents"] == [str(cls)] and r["metric"] == "miou"
    assert any(f"started from the backbone of the classifier {cls}" in n for n in r["notes"])

    js = tmp_path / "c.json"  # the 32 px classifier as the student beside a 64 px ViT: it moves to 64 px
    assert main(["distill", "--method", "collab", "--student", str(cls), "--peer", "vit", "--peer-args",
                 "img_size=64,depth=2", "--data", "digit-scenes", "--epochs", "1", "--no-baselines", "--subset",
                 "fraction=0.1", "--out", str(tmp_path / "c.pt"), "--json", str(js)]) == 0
    r, student = json.loads(js.read_text()), load(tmp_path / "c.pt")
    assert any("resized from 32 to 64 px" in n for n in r["notes"])
    assert (student.task, student.input.size, student.provenance["parents"]) == ("segmentation", 64, [str(cls)])
    vit = tmp_path / "vit.pt"
    save(Checkpoint.create("vit", num_classes=10, arch_args={"depth": 2}, seed=0), vit)
    seg_peer = tmp_path / "seg-vit.pt"
    save(segmenter_from(load(vit), num_classes=11), seg_peer)
    assert main(["distill", "--method", "collab", "--student", "resnet", "--peer", str(seg_peer), "--data", "digits",
                 "--out", str(tmp_path / "x.pt")]) == 2  # a segmentation network cannot start a classifier


@pytest.mark.slow
def test_mim_pretrains_a_segmentation_backbone_on_the_scenes_and_leaves_its_head(tmp_path):
    """MAE pretraining on a segmentation data set's images trains the backbone only; the result starts a
    segmentation run (or a collab peer) as it is."""
    out, js = tmp_path / "mae.pt", tmp_path / "mae.json"
    args = ["--arch", "vit", "--arch-args", "depth=2,img_size=64", "--data", "digit-scenes", "--subset",
            "fraction=0.2", "--seed", "3"]
    assert main(["train", *args, "--objective", "mim", "--epochs", "1", "--out", str(out), "--json", str(js)]) == 0
    r, mae = json.loads(js.read_text()), load(out)
    assert mae.task == "segmentation" and r["mim_loss"] > 0 and "segmentation head is untrained" in r["notes"][-1]
    fresh = Checkpoint.create("vit", 11, "segmentation", {"depth": 2, "img_size": 64}, seed=3).state_dict
    head = [k for k in fresh if not k.startswith("backbone.")]
    assert all(torch.equal(mae.state_dict[k], fresh[k]) for k in head)
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(mae.state_dict[qkv], fresh[qkv])  # the backbone did train
    assert main(["train", "--init", str(out), "--data", "digit-scenes", "--subset", "fraction=0.1", "--epochs", "1",
                 "--out", str(tmp_path / "seg.pt")]) == 0
