"""Checkpoints: round trips, bare timm state_dicts, and every kind of bad file refused with a clear error."""

import pickle
import zipfile

import pytest
import torch

from compress import Checkpoint, CompressError, create_model, load, save


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_keeps_description_and_function(tmp_path, suffix):
    ckpt = Checkpoint.create("vit", num_classes=10, seed=0)
    ckpt.provenance = {"command": "test", "parents": ["a.pt"], "metrics": {"top1": 12.5}}
    path = save(ckpt, tmp_path / f"m{suffix}")
    back = load(path)
    assert (back.arch, back.num_classes, back.task, back.input.size) == ("vit", 10, "classification", 32)
    assert back.provenance["metrics"]["top1"] == 12.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.build()(x), back.build()(x))


def test_bare_timm_state_dict_with_arch(tmp_path):
    model = create_model("resnet18", num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CompressError, match="--arch"):
        load(tmp_path / "bare.pt")
    ckpt = load(tmp_path / "bare.pt", arch="resnet18")
    assert ckpt.num_classes == 7  # read from the classifier
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.build()(x), model(x))


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.target),))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CompressError, match="refused"):
        load(tmp_path / "evil.pt", arch="resnet18")
    assert not (tmp_path / "pwned").exists()


def test_raw_pickle_is_not_a_checkpoint(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CompressError, match="truncated or non-checkpoint"):
        load(tmp_path / "raw.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = save(Checkpoint.create("resmlp", seed=0), tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="cannot read") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_state_dict_that_does_not_match_its_arch(tmp_path):
    ckpt = Checkpoint.create("vit", seed=0)
    ckpt.arch_args = {"depth": 2}  # the weights are for depth 4
    save(ckpt, tmp_path / "m.pt")
    with pytest.raises(CompressError, match="does not match architecture 'vit'.*unexpected"):
        load(tmp_path / "m.pt").build()


def test_unknown_arch_suggests_close_names():
    with pytest.raises(CompressError, match="did you mean.*mobilevit") as e:
        create_model("mobilevitt")
    assert "expected" in str(e.value)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt = Checkpoint.create("resmlp", seed=0)
    target = tmp_path / "m.pt"
    save(ckpt, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save(ckpt, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert zipfile.is_zipfile(target)
