"""Self-describing checkpoints: `.pt` (read with weights_only=True only) and `.safetensors`.

A checkpoint carries everything needed to rebuild and feed the model: architecture + kwargs, num_classes,
task, input spec (size, mean, std) and provenance (command, parents, metrics). In a `.pt` the metadata is a
JSON string beside the state_dict, so the file holds only tensors and strings and loads without unpickling
any object; in a `.safetensors` it sits in the header's metadata. A bare timm state_dict plus an arch name
is accepted too. Writes are atomic: a temporary file in the target folder, then a rename.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import CompressError
from .registry import create_model, default_img_size

FORMAT = "compress-checkpoint/1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TASKS = ("classification", "segmentation")


@dataclass
class InputSpec:
    """What the model expects: square size in pixels, per-channel mean and std (on 0..1 images)."""

    size: int = 32
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if self.size < 8 or len(self.mean) != len(self.std):
            raise CompressError("invalid input spec", expected="size >= 8 and one mean/std per channel",
                                found=f"size={self.size}, {len(self.mean)} means, {len(self.std)} stds")


@dataclass
class Checkpoint:
    """A model and its description. `build()` returns the nn.Module with the weights loaded.

    Example:
        >>> ckpt = Checkpoint.create("vit", num_classes=10)
        >>> save(ckpt, "a.pt"); load("a.pt").build()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    arch: str
    arch_args: dict = field(default_factory=dict)
    num_classes: int = 10
    task: str = "classification"
    input: InputSpec = field(default_factory=InputSpec)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    provenance: dict = field(default_factory=dict)
    structure: list = field(default_factory=list)  # surgery ops (pruning) replayed on the fresh architecture
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was read from (not saved)

    def __post_init__(self):
        if self.task not in TASKS:
            raise CompressError(f"unknown task '{self.task}'", expected=" or ".join(TASKS))
        if isinstance(self.input, dict):
            self.input = InputSpec(**self.input)

    @classmethod
    def create(cls, arch: str, num_classes: int = 10, task: str = "classification", arch_args: dict | None = None,
               input: InputSpec | None = None, seed: int | None = None, pretrained: bool | str = False) -> Checkpoint:
        """A freshly initialised model (seeded) wrapped in a checkpoint; with `pretrained` (True: timm's hub; a
        path: a local file) the published weights, fed the way they were trained (their size, mean, std).

        Example:
            >>> Checkpoint.create("deit_tiny_patch16_224", num_classes=10, pretrained="deit_tiny.safetensors")
        """
        arch_args = dict(arch_args or {})
        if seed is not None:
            torch.manual_seed(seed)
        if pretrained:
            from .registry import pretrained_input

            size, mean, std, classes = pretrained_input(arch)
            spec = input or InputSpec(int(arch_args.get("img_size", size)), mean, std)
            if task == "segmentation":  # the published classifier's backbone, under a fresh head
                from .segmentation import segmenter_from

                model = create_model(arch, num_classes=classes, pretrained=pretrained, **arch_args)
                return segmenter_from(cls(arch, arch_args, classes, input=spec, state_dict=model.state_dict()),
                                      num_classes)
            model = create_model(arch, num_classes=num_classes, pretrained=pretrained, **arch_args)
            return cls(arch, arch_args, num_classes, task, spec, model.state_dict())
        spec = input or InputSpec(size=default_img_size(arch, arch_args))
        ckpt = cls(arch, arch_args, num_classes, task, spec)
        ckpt.state_dict = ckpt.instantiate().state_dict()
        return ckpt

    def instantiate(self) -> nn.Module:
        """The architecture with fresh weights, its recorded structure edits replayed (for a segmentation
        network too: the edits name its modules, backbone included)."""
        if self.task == "segmentation":
            from .segmentation import SegmentationNet

            model = SegmentationNet(self.arch, self.num_classes, self.arch_args, self.input.size)
        else:
            model = create_model(self.arch, num_classes=self.num_classes, **self.arch_args)
        if self.structure:
            from .alignment.surgery import apply_structure

            model = apply_structure(model, self.structure, self.input.size, len(self.input.mean))
        return model

    def build(self) -> nn.Module:
        """The architecture with this checkpoint's weights; a mismatch is a clear error."""
        model = self.instantiate()
        load_weights(model, self.state_dict, self.arch)
        return model.eval()

    def metadata(self) -> dict:
        meta = asdict(self)
        meta.pop("state_dict")
        meta.pop("source")
        meta["format"] = FORMAT
        return meta

    def derive(self, model: nn.Module, kind: str, inputs: list[Checkpoint] = (), data: str = "",
               config=None, metrics: dict | None = None, **changes) -> Checkpoint:
        """A new checkpoint for `model`, same description unless `changes` say otherwise, with provenance:
        the step kind, its parents (the inputs' files), the data, the resolved settings, the command that
        reproduces it and its metrics.

        Example:
            >>> out = ckpt.derive(pruned, "prune", [ckpt], "digits", PruneRun(ratio=0.3), {"top1": 97.5})
        """
        from .config import settings
        from .steps import STEPS

        parents = [c.source or "<in memory>" for c in inputs]
        prov = {"kind": kind, "parents": parents, "data": data, "metrics": _plain(metrics or {}),
                "settings": settings(config) if config is not None else {},
                "command": STEPS.get(kind).command(parents, data, config) if config is not None else kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "compress_version": __version__}
        kept = ("arch", "arch_args", "num_classes", "task", "input", "structure")
        fields = {**{k: getattr(self, k) for k in kept}, **changes}
        return Checkpoint(**fields, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                          provenance=prov)


def _plain(values: dict) -> dict:
    """Scalars only: provenance metrics stay small and JSON-able."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}


def as_checkpoints(inputs, at_most: int | None = None, at_least: int = 0) -> list[Checkpoint]:
    """Checkpoints from paths or `Checkpoint`s (None, one, or a list); a wrong count is a clear error.

    Example:
        >>> as_checkpoints(["a.pt", b_ckpt], at_least=2)
    """
    if inputs is None:
        items = []
    elif isinstance(inputs, (list, tuple)):
        items = list(inputs)
    else:
        items = [inputs]
    if len(items) < at_least or (at_most is not None and len(items) > at_most):
        want = (f"at least {at_least}" if at_most is None else str(at_least) if at_most == at_least
                else f"{at_least} to {at_most}")
        raise CompressError("wrong number of input checkpoints", expected=want, found=str(len(items)))
    return [c if isinstance(c, Checkpoint) else load(c) for c in items]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        found = "; ".join(filter(None, [
            f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})" if shapes else ""]))
        raise CompressError(f"state_dict does not match architecture '{arch}'",
                            expected=f"the {len(own)} tensors of {type(model).__name__}", found=found,
                            hint="pass the --arch and --arch-args the weights were trained with")
    model.load_state_dict(state)


def start_from(name: str, args: dict, task: str, flag: str) -> Checkpoint:
    """Where a model of a run starts: `name` an architecture (fresh weights, shaped by `args`) or a checkpoint
    (pretrained weights, an MAE encoder, a trained model). For a segmentation run a classifier's checkpoint is
    accepted as it is: `for_task` then takes its backbone once the data's classes are known.

    Example:
        >>> start_from("resnet", {"channels": [16, 32, 64, 128]}, "classification", "--student").state_dict
        {}
    """
    if not Path(name).is_file():
        return Checkpoint(name, args, task=task, input=InputSpec(size=default_img_size(name, args)))
    if args:
        raise CompressError(f"{flag}-args shape a new model, not a checkpoint's", expected=f"no {flag}-args with "
                            f"{flag} {name}", found=", ".join(f"{k}={v}" for k, v in args.items()))
    ckpt = load(name)
    if ckpt.task != task and not (ckpt.task, task) == ("classification", "segmentation"):
        raise CompressError(f"{flag} {name} is a {ckpt.task} model", expected=f"a {task} model for this data")
    return ckpt


def for_task(ckpt: Checkpoint, task: str, num_classes: int, size: int | None = None,
             seed: int | None = None) -> tuple[Checkpoint, list[str]]:
    """`ckpt` as the start of a `task` model predicting `num_classes`, and a note when it changed: a classifier
    starts a segmentation network with its backbone (`segmentation.segmenter_from`, at `size`, by default its
    own, the head seeded by `seed`); a checkpoint of the task (or an architecture's fresh start, which has no
    weights) is returned as it is, and one whose weights predict other classes is refused.

    Example:
        >>> seg, notes = for_task(load("vit-digits.pt"), "segmentation", 11, size=64)
    """
    if ckpt.task == task:
        if ckpt.state_dict and ckpt.num_classes != num_classes:
            raise CompressError(f"{ckpt.source or ckpt.arch} predicts another number of classes than the data",
                                expected=str(num_classes), found=str(ckpt.num_classes))
        return ckpt, []
    from .segmentation import segmenter_from

    seg = segmenter_from(ckpt, num_classes, size, seed)
    resized = f", resized from {ckpt.input.size} to {seg.input.size} px" if seg.input.size != ckpt.input.size else ""
    return seg, [backbone_note(ckpt.arch, f"the classifier {ckpt.source}{resized}")]


def backbone_note(arch: str, classifier: str) -> str:
    """The note of a segmentation network started from `classifier`'s backbone (a file, or published weights).

    Example:
        >>> backbone_note("resnet18", "timm's pretrained classifier")
        "resnet18 segmentation network started from the backbone of timm's pretrained classifier; its head starts fresh"
    """
    return f"{arch} segmentation network started from the backbone of {classifier}; its head starts fresh"


# ---- files ------------------------------------------------------------------------------------------

def save(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write `ckpt` atomically as `.pt` or `.safetensors` (by suffix)."""
    path = Path(path)
    meta = json.dumps(ckpt.metadata(), default=list)
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in state.items()}  # safetensors refuses shared storage
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"compress": meta}))
    if path.suffix != ".pt":
        raise CompressError(f"cannot write '{path}'", expected="a .pt or .safetensors path", found=path.suffix or "no suffix")
    return atomic_write(path, lambda tmp: torch.save({"compress": meta, "state_dict": state}, tmp))


def atomic_write(path: Path, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: writers that check it (torch.export wants .pt2) accept the temporary file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, arch: str | None = None, arch_args: dict | None = None,
         num_classes: int | None = None) -> Checkpoint:
    """Read a checkpoint; never executes code from the file.

    A bare state_dict (timm's, or {'state_dict': ...} / {'model': ...}) needs `arch`; num_classes is then
    read from the classifier's shape unless given.

    Example:
        >>> load("resnet18_weights.pth.pt", arch="resnet18").build()
    """
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"checkpoint '{path}' not found", expected="an existing .pt or .safetensors file")
    meta, state = (_read_safetensors if path.suffix == ".safetensors" else _read_pt)(path)
    if meta is None:
        if arch is None:
            raise CompressError(f"'{path}' is a bare state_dict with no description",
                                expected="a compress checkpoint, or --arch NAME for a bare (timm) state_dict")
        args = dict(arch_args or {})
        n = num_classes or _guess_classes(state)
        return Checkpoint(arch, args, n, "classification", InputSpec(size=default_img_size(arch, args)), state,
                          {"command": "import", "parents": [str(path)], "metrics": {}}, source=str(path))
    if meta.get("format") != FORMAT:
        raise CompressError(f"'{path}' has an unknown metadata format", expected=FORMAT, found=str(meta.get("format")))
    meta.pop("format")
    return Checkpoint(**meta, state_dict=state, source=str(path))


def _read_pt(path: Path):
    if not zipfile.is_zipfile(path):
        raise CompressError(f"cannot read '{path}'", expected="a torch zip checkpoint",
                            found="a truncated or non-checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CompressError(f"refused to load '{path}'", expected="tensors and plain containers only",
                            found=f"pickled objects that weights_only loading rejects ({str(e).splitlines()[0][:120]})",
                            hint="the file was not unpickled; no code from it ran") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CompressError(f"cannot read '{path}'", expected="a complete torch checkpoint",
                            found=f"a damaged or truncated file ({str(e).splitlines()[0][:120]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("compress"), str):
        return json.loads(obj["compress"]), obj["state_dict"]
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressError(f"cannot read '{path}'", expected="a state_dict of tensors", found=type(obj).__name__)
    return None, obj


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("compress")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CompressError(f"cannot read '{path}'", expected="a complete .safetensors file",
                            found=f"a damaged or truncated file ({str(e)[:120]})") from None
    return (json.loads(meta) if meta else None), state


def _guess_classes(state: dict[str, torch.Tensor]) -> int:
    for key in ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight", "head.l.weight"):
        if key in state:
            return int(state[key].shape[0])
    return 1000
