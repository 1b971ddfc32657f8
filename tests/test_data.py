"""Embedded data and user folders."""

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
