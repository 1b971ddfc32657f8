"""Datasets: embedded ones that need no download, and the user's own folders.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to the model's input size, with a
  fixed seeded split (train 1,300 / val 100 / test 397).
- `digit-scenes`: segmentation scenes composed from those digits: 2-4 digits pasted on a canvas, per-pixel
  masks (0 = background, 1 + digit otherwise). Scenes of each split use only that split's digits.
- `imagefolder:PATH` (or a bare folder path), `cifar10:PATH`, `cifar100:PATH` (torchvision's python
  version, already on disk), `masks:PATH` (PATH/images/*.png with PATH/masks/*.png of the same stem).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .checkpoint import InputSpec
from .config import SubsetSpec, parse_subset
from .errors import CompressError

DIGITS_SPLIT = (1300, 100, 397)  # train / val / test, from one fixed permutation (seed 0)
SCENES_SPLIT = (1000, 100, 300)


@dataclass
class Data:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    task: str
    name: str
    spec: str = ""  # what `load_data` was given: names the data in commands and provenance
    subset: str | None = None  # the training split is this subset of the data set's (see `take_subset`)
    train_counts: list[int] | None = None  # training images per class, when a subset was taken


def task_of(data: str | Data) -> str:
    """The task a data spec implies: segmentation for digit-scenes and masks: folders."""
    if isinstance(data, Data):
        return data.task
    return "segmentation" if data == "digit-scenes" or data.startswith("masks:") else "classification"


def as_data(data: str | Data, input: InputSpec, task: str | None = None, subset: str | None = None) -> Data:
    """`data` itself, or the data set a spec names, prepared for `input`; with `subset` (see
    `compress.config.parse_subset`) its training split is replaced by that subset.

    Example:
        >>> as_data("digits", InputSpec(size=32), subset="classes=0-4,others=0.1").train_counts
        [123, 130, 120, 144, 123, 15, 11, 14, 16, 10]
    """
    d = data if isinstance(data, Data) else load_data(data, input, task)
    if not subset:
        return d
    train, counts = take_subset(d.train, parse_subset(subset), d.num_classes, d.task)
    return replace(d, train=train, subset=subset, train_counts=counts)


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """Every sample's class, without loading the images (tensors, ImageFolder / CIFAR targets, subsets)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise CompressError(f"cannot read the classes of a {type(ds).__name__}", expected="a classification data set")
    return torch.as_tensor(targets)


def take_subset(ds: Dataset, spec: SubsetSpec, num_classes: int, task: str = "classification"
                ) -> tuple[Dataset, list[int] | None]:
    """The part of `ds` that `spec` names, and the images per class it keeps (None for segmentation, whose
    shards and fractions are taken image by image). Naming a class the data does not have, or leaving a class
    with no image, is an error (the model would never see it).

    Example:
        >>> train, counts = take_subset(d.train, parse_subset("shard=1/4"), 10)
    """
    if task != "classification":  # no class per image: shards and fractions are taken image by image
        if spec.classes:
            raise CompressError("--subset classes=... selects classes of classification data",
                                expected="shard=I/K or fraction=F for this data", found=f"task {task}")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(spec.seed))
        keep = (order.tensor_split(spec.shard[1])[spec.shard[0] - 1] if spec.shard
                else order[: max(1, round(spec.fraction * len(order)))]).sort().values
        return _rows_of(ds, keep), None
    labels = dataset_labels(ds)
    unknown = [c for c in spec.classes if not 0 <= c < num_classes]
    if unknown:
        raise CompressError(f"--subset names classes the data does not have: {unknown}",
                            expected=f"classes 0-{num_classes - 1}")
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(labels), generator=gen)
    if spec.shard:
        i, k = spec.shard
        keep = order.tensor_split(k)[i - 1]
    elif spec.fraction is not None:  # per class, so every class keeps its share
        keep = torch.cat([idx[: max(1, round(spec.fraction * len(idx)))]
                          for idx in (order[labels[order] == c] for c in range(num_classes)) if len(idx)])
    else:
        named = torch.isin(labels[order], torch.tensor(spec.classes))
        others = order[~named]
        keep = torch.cat([order[named], others[: round(spec.others * len(others))]])
    keep = keep.sort().values
    counts = torch.bincount(labels[keep], minlength=num_classes).tolist()
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise CompressError(f"--subset leaves classes {empty} with no training image",
                            expected="every class present (add others=F, or more of the data)")
    return _rows_of(ds, keep), counts


def _rows_of(ds: Dataset, keep: torch.Tensor) -> Dataset:
    """The samples `keep` of `ds`; a TensorDataset stays one (batches are slices, not image-by-image loads)."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[keep] for t in ds.tensors))
    return Subset(ds, keep.tolist())


def data_for(ckpt, data: str | Data, command: str, classifier: bool = False, subset: str | None = None) -> Data:
    """The data set a checkpoint is run on, prepared for its input; a segmentation checkpoint where a
    command needs a classifier, or a class count that differs from the data's, is a clear error.

    Example:
        >>> d = data_for(load("vit.pt"), "digits", "prune", classifier=True)
    """
    if classifier and ckpt.task != "classification":
        raise CompressError(f"compress {command} evaluates classifiers", expected="a classification checkpoint",
                            found=f"task {ckpt.task}")
    d = as_data(data, ckpt.input, ckpt.task, subset)
    if d.num_classes != ckpt.num_classes:
        raise CompressError(f"'{ckpt.source}' predicts {ckpt.num_classes} classes",
                            expected=f"{d.num_classes} for {d.name}")
    return d


def spec_of(data: str | Data) -> str:
    return data.spec or data.name if isinstance(data, Data) else data


def load_data(spec: str, input: InputSpec, task: str | None = None) -> Data:
    """Open the dataset named by `spec`, with images resized and normalised for `input`.

    Example:
        >>> d = load_data("digits", InputSpec(size=32))
        >>> len(d.train), len(d.test), d.num_classes
        (1300, 397, 10)
    """
    data = _open(spec, input)
    data.spec = spec
    if task is not None and data.task != task:
        raise CompressError(f"data '{spec}' is for {data.task}", expected=f"{task} data")
    return data


def _open(spec: str, input: InputSpec) -> Data:
    kind, _, path = spec.partition(":")
    if spec == "digits":
        return _digits(input)
    if spec == "digit-scenes":
        return _scenes(input)
    if kind in ("cifar10", "cifar100", "imagefolder", "masks"):
        root = Path(path)
    else:
        kind, root = "imagefolder", Path(spec)
    if not root.is_dir():
        raise CompressError(f"data folder '{root}' does not exist",
                            expected="digits, digit-scenes, or an existing folder (imagefolder:/cifar10:/cifar100:/masks:PATH)")
    if kind.startswith("cifar"):
        return _cifar(kind, root, input)
    if kind == "masks":
        return _mask_folder(root, input)
    return _image_folder(root, input)


# ---- digits -----------------------------------------------------------------------------------------

def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    return d.images[order].astype(np.float32) / 16.0, d.target[order].astype(np.int64)


def _split(x, y, sizes):
    a, b = sizes[0], sizes[0] + sizes[1]
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _normalise(images: torch.Tensor, input: InputSpec) -> torch.Tensor:
    mean = torch.tensor(input.mean).view(1, -1, 1, 1)
    std = torch.tensor(input.std).view(1, -1, 1, 1)
    return (images - mean) / std


def _gray_to_input(gray: np.ndarray, input: InputSpec) -> torch.Tensor:
    t = torch.from_numpy(gray).unsqueeze(1)
    t = F.interpolate(t, size=(input.size, input.size), mode="bilinear", align_corners=False).clamp(0, 1)
    return _normalise(t.expand(-1, len(input.mean), -1, -1), input).contiguous()


def _digits(input: InputSpec) -> Data:
    x, y = _digit_arrays()
    parts = [TensorDataset(_gray_to_input(px, input), torch.from_numpy(py)) for px, py in _split(x, y, DIGITS_SPLIT)]
    return Data(*parts, num_classes=10, task="classification", name="digits")


def compose_scenes(x: np.ndarray, y: np.ndarray, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` canvases of `size` px, each with 2-4 digits from (x, y) at random places; masks are 0 or 1 + digit."""
    rng = np.random.default_rng(seed)
    digit = max(size // 3, 8)
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    up = F.interpolate(torch.from_numpy(x).unsqueeze(1), size=(digit, digit), mode="bilinear",
                       align_corners=False).squeeze(1).clamp(0, 1).numpy()
    for i in range(n):
        for _ in range(rng.integers(2, 5)):
            j = rng.integers(len(y))
            r, c = rng.integers(0, size - digit + 1, size=2)
            patch = up[j]
            ink = patch > 0.35
            region = images[i, r:r + digit, c:c + digit]
            region[ink] = patch[ink]  # later digits occlude earlier ones, mask follows the visible ink
            masks[i, r:r + digit, c:c + digit][ink] = y[j] + 1
    return images, masks


def _scenes(input: InputSpec) -> Data:
    x, y = _digit_arrays()
    parts = []
    for k, ((px, py), n) in enumerate(zip(_split(x, y, DIGITS_SPLIT), SCENES_SPLIT)):
        images, masks = compose_scenes(px, py, n, input.size, seed=100 + k)
        t = torch.from_numpy(images).unsqueeze(1).expand(-1, len(input.mean), -1, -1)
        parts.append(TensorDataset(_normalise(t, input).contiguous(), torch.from_numpy(masks)))
    return Data(*parts, num_classes=11, task="segmentation", name="digit-scenes")


# ---- user folders -----------------------------------------------------------------------------------

def _transform(input: InputSpec):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((input.size, input.size)), transforms.ToTensor(),
                               transforms.Normalize(input.mean, input.std)])


def _holdout(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(len(ds) * fraction))
    return Subset(ds, order[k:]), Subset(ds, order[:k])


def _image_folder(root: Path, input: InputSpec) -> Data:
    from torchvision.datasets import ImageFolder

    tf = _transform(input)
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if {"train", "val"} <= subdirs or {"train", "test"} <= subdirs:
        train = ImageFolder(str(root / "train"), transform=tf)
        test = ImageFolder(str(root / ("test" if "test" in subdirs else "val")), transform=tf)
        val = ImageFolder(str(root / "val"), transform=tf) if "val" in subdirs else _holdout(train)[1]
        n = len(train.classes)
    else:
        full = ImageFolder(str(root), transform=tf)
        rest, test = _holdout(full, 0.2)
        train, val = _holdout(rest, 0.1)
        n = len(full.classes)
    return Data(train, val, test, num_classes=n, task="classification", name=str(root))


def _cifar(kind: str, root: Path, input: InputSpec) -> Data:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    tf = _transform(input)
    try:
        train_full = cls(str(root), train=True, transform=tf, download=False)
        test = cls(str(root), train=False, transform=tf, download=False)
    except RuntimeError as e:
        raise CompressError(f"no {kind} data in '{root}'", expected="the extracted python version (cifar-10-batches-py)",
                            found=str(e)) from None
    train, val = _holdout(train_full, 0.1)
    return Data(train, val, test, num_classes=10 if kind == "cifar10" else 100, task="classification", name=kind)


class MaskFolder(Dataset):
    """PATH/images/*.{png,jpg} with PATH/masks/<same stem>.png holding class indices per pixel."""

    def __init__(self, root: Path, input: InputSpec):
        self.images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        self.masks = [root / "masks" / f"{p.stem}.png" for p in self.images]
        missing = [m.name for m in self.masks if not m.exists()]
        if not self.images or missing:
            raise CompressError(f"mask folder '{root}' is incomplete", expected="images/*.png with masks/<stem>.png",
                                found=f"{len(self.images)} images, missing masks {missing[:3]}")
        self.tf, self.size = _transform(input), input.size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        image = self.tf(Image.open(self.images[i]).convert("RGB"))
        mask = Image.open(self.masks[i]).resize((self.size, self.size), Image.NEAREST)
        return image, torch.from_numpy(np.array(mask, dtype=np.int64))


def _mask_folder(root: Path, input: InputSpec) -> Data:
    if not (root / "images").is_dir() and (root / "train").is_dir():
        train = MaskFolder(root / "train", input)
        test = MaskFolder(root / ("test" if (root / "test").is_dir() else "val"), input)
        val = MaskFolder(root / "val", input) if (root / "val").is_dir() else _holdout(train)[1]
    else:
        full = MaskFolder(root, input)
        rest, test = _holdout(full, 0.2)
        train, val = _holdout(rest, 0.1)
    return Data(train, val, test, num_classes=_max_label(train) + 1, task="segmentation", name=str(root))


def _max_label(ds: Dataset) -> int:
    from PIL import Image

    folder = ds.dataset if hasattr(ds, "dataset") else ds
    return max(int(np.array(Image.open(m)).max()) for m in folder.masks)
