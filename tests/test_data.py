"""Embedded data and user folders."""

import re

import numpy as np
import pytest
import torch

from compress import CompressError, InputSpec
from compress.data import load_data


def test_digits_split_is_fixed_and_disjoint():
    a = load_data("digits", InputSpec(size=32))
    b = load_data("digits", InputSpec(size=16))
    assert (len(a.train), len(a.val), len(a.test)) == (1300, 100, 397)
    assert a.train.tensors[0].shape[1:] == (3, 32, 32) and b.train.tensors[0].shape[1:] == (3, 16, 16)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])  # same split at any size
    assert len(a.train) + len(a.val) + len(a.test) == 1797  # every sklearn digit used exactly once
    assert set(a.test.tensors[1].tolist()) == set(range(10))


def test_digit_scenes_masks():
    d = load_data("digit-scenes", InputSpec(size=48))
    x, y = d.train.tensors
    assert d.task == "segmentation" and d.num_classes == 11
    assert x.shape[1:] == (3, 48, 48) and y.shape[1:] == (48, 48)
    assert y.min() == 0 and 5 < y.max() <= 10
    fg = (y > 0).float().mean().item()
    assert 0.02 < fg < 0.5  # digits cover part of the canvas, background the rest
    ink = x[:, 0] > x[:, 0].min() + 1e-3
    assert ((y > 0) <= ink).all()  # every labelled pixel carries ink


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", InputSpec(size=16))
    assert d.num_classes == 2 and len(d.train) == 6
    x, y = d.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CompressError, match="does not exist") as e:
        load_data(str(tmp_path / "nope"), InputSpec(size=32))
    assert "expected" in str(e.value)


def _rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.tensors[0]}


def test_a_class_subset_keeps_exactly_what_it_names():
    from compress.data import as_data

    full = load_data("digits", InputSpec(size=16))
    d = as_data("digits", InputSpec(size=16), subset="classes=0-4,others=0.1,seed=3")
    labels, all_labels = d.train.tensors[1], full.train.tensors[1]
    for c in range(5):  # every image of the named classes
        assert (labels == c).sum() == (all_labels == c).sum()
    others = int((all_labels >= 5).sum())
    assert int((labels >= 5).sum()) == round(0.1 * others) and all(n > 0 for n in d.train_counts)
    assert _rows(d.train) <= _rows(full.train)  # images of the training split, nothing else
    assert len(d.test) == len(full.test) and torch.equal(d.test.tensors[1], full.test.tensors[1])  # test: whole
    again = as_data("digits", InputSpec(size=16), subset="classes=0-4,others=0.1,seed=3")
    assert torch.equal(again.train.tensors[0], d.train.tensors[0])  # seeded: the same images every time


def test_shards_partition_the_training_split():
    from compress.data import as_data

    full = load_data("digits", InputSpec(size=16))
    shards = [as_data("digits", InputSpec(size=16), subset=f"shard={i}/4,seed=1").train for i in range(1, 5)]
    rows = [_rows(s) for s in shards]
    assert sum(len(s) for s in shards) == len(full.train) and set().union(*rows) == _rows(full.train)
    assert all(not (a & b) for i, a in enumerate(rows) for b in rows[i + 1:])  # disjoint
    tenth = as_data("digits", InputSpec(size=16), subset="fraction=0.1").train_counts
    assert all(12 <= n <= 15 for n in tenth)  # 10% of every class


def test_segmentation_data_takes_shards_and_fractions_by_image():
    """digit-scenes has no class per image: a shard or fraction is taken image by image (scenes and their masks
    together), and a class subset is refused with what would work instead."""
    from compress.data import as_data

    full = load_data("digit-scenes", InputSpec(size=16))
    shards = [as_data("digit-scenes", InputSpec(size=16), subset=f"shard={i}/3").train for i in range(1, 4)]
    rows = [_rows(s) for s in shards]
    assert sum(len(s) for s in shards) == len(full.train) and set().union(*rows) == _rows(full.train)
    assert all(not (a & b) for i, a in enumerate(rows) for b in rows[i + 1:])
    quarter = as_data("digit-scenes", InputSpec(size=16), subset="fraction=0.25")
    x, y = quarter.train.tensors
    assert len(x) == round(0.25 * len(full.train)) and y.shape[1:] == full.train.tensors[1].shape[1:]
    i = next(i for i in range(len(full.train)) if full.train.tensors[0][i].equal(x[0]))
    assert full.train.tensors[1][i].equal(y[0])  # each scene keeps its own mask
    with pytest.raises(CompressError, match="expected shard=I/K or fraction=F"):
        as_data("digit-scenes", InputSpec(size=16), subset="classes=0-4")


@pytest.mark.parametrize("spec,message", [
    ("classes=3-12", "classes the data does not have: [10, 11, 12]"),
    ("classes=0-4", "leaves classes [5, 6, 7, 8, 9] with no training image"),
    ("classes=0-4,shard=1/2", "cannot parse --subset"),
    ("shard=5/4", "cannot parse --subset"),
])
def test_bad_subsets_are_refused(spec, message):
    from compress.data import as_data

    with pytest.raises(CompressError, match=re.escape(message)):
        as_data("digits", InputSpec(size=16), subset=spec)
