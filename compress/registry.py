"""One small `Registry` reused everywhere, and the architecture registry built on it.

This module imports neither torch nor timm: the command line lists registry names (its `choices`) and
answers `--help` without them. Entries can be declared lazily (the module that registers them is
imported on first use) or arrive through a package entry-point group (plugins, and the pipelines'
checkpoint structure ops, which the core must not import).

An architecture is resolved in this order: a registered builder (our CPU-sized aliases, or the user's own
via `@register_arch` or a `package.module:function` spec), then any timm model name.

Example:
    >>> model = create_model("vit", num_classes=10)                         # small alias
    >>> model = create_model("resnet18", num_classes=10)                    # any timm name
    >>> model = create_model("vit", num_classes=10, embed_dim=64, depth=2)  # architecture kwargs
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import CompressError

if TYPE_CHECKING:
    from torch import nn


class Registry:
    """A name -> object table with a decorator, overwrite warnings and did-you-mean errors.

    `lazy` declares entries without importing them: name -> the module that registers the name on import,
    or "module:attribute" for the object itself. `group` names a package entry-point group whose entries
    ("module:attribute") join the table when first looked up.

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("kd")
        ... def kd_loss(s, t): ...
        >>> LOSSES.get("kd") is kd_loss
        True
        >>> Registry("method", lazy={"ofa": "distill.methods"}).names()  # no import yet
        ['ofa']
    """

    def __init__(self, kind: str, lazy: dict[str, str] | None = None, group: str | None = None):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._lazy: dict[str, str] = dict(lazy or {})
        self._group = group

    def register(self, name: str | None = None) -> Callable:
        def deco(obj):
            key = name or obj.__name__
            if key in self._items:
                warnings.warn(f"{self.kind} '{key}' is registered again; the new one replaces it", stacklevel=2)
            self._items[key] = obj
            self._lazy.pop(key, None)  # a declared entry has arrived
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            self._load_group()
            if name not in self._lazy:
                raise CompressError(f"unknown {self.kind} '{name}'", expected=f"one of {', '.join(self.names())}")
            module, _, attr = self._lazy[name].partition(":")
            loaded = importlib.import_module(module)
            if attr:
                self._items[name] = getattr(loaded, attr)
            if name not in self._items:
                raise CompressError(f"{self.kind} '{name}' was declared in {module} but not registered there")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load_group()
        return name in self._items or name in self._lazy

    def names(self) -> list[str]:
        self._load_group()
        return sorted({*self._items, *self._lazy})

    def _load_group(self) -> None:
        if not self._group:
            return
        from importlib.metadata import entry_points

        for ep in entry_points(group=self._group):
            if ep.name not in self._items:
                self._lazy.setdefault(ep.name, ep.value)
        self._group = None  # read once


ARCHS = Registry("architecture")


def register_arch(name: str | None = None, img_size: int = 32) -> Callable:
    """Register a model builder `fn(num_classes, **kwargs) -> nn.Module` under `name`.

    `img_size` is the input resolution the builder is meant for; it is stored in checkpoints so data is
    resized to match.

    Example:
        >>> @register_arch("tiny_cnn")
        ... def tiny_cnn(num_classes=10, width=16):
        ...     return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                          nn.Linear(width, num_classes))
    """

    def deco(fn):
        fn.default_img_size = img_size
        return ARCHS.register(name)(fn)

    return deco


def _timm():
    import timm  # imported lazily: `compress --help` should not pay for it

    return timm


def resolve_builder(arch: str) -> Callable[..., nn.Module]:
    """The builder for `arch`: a registered name, a `module:function` spec, or a timm model name."""
    if arch in ARCHS:
        return ARCHS.get(arch)
    if ":" in arch:
        module, _, fn = arch.partition(":")
        try:
            builder = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise CompressError(f"cannot import architecture builder '{arch}'",
                                expected="an importable package.module:function", found=str(e)) from None
        return builder
    timm = _timm()
    if timm.is_model(arch):
        return lambda num_classes=1000, **kw: timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)
    close = difflib.get_close_matches(arch, ARCHS.names() + timm.list_models(), n=5, cutoff=0.6)
    raise CompressError(f"unknown architecture '{arch}'",
                        expected="a registered alias (compress models), a timm model name, or package.module:function",
                        hint=f"did you mean {', '.join(close)}?" if close else None)


def is_architecture(name: str) -> bool:
    """Whether `name` names an architecture (an alias, a `module:function` spec or a timm model)."""
    return name in ARCHS or ":" in name or _timm().is_model(name)


def default_img_size(arch: str, kwargs: dict | None = None) -> int:
    """Input resolution for `arch`: an explicit img_size kwarg, the builder's, or timm's pretrained cfg."""
    if kwargs and "img_size" in kwargs:
        size = kwargs["img_size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    builder = resolve_builder(arch)
    if hasattr(builder, "default_img_size"):
        return builder.default_img_size
    try:
        return int(_timm().get_pretrained_cfg(arch).input_size[-1])
    except Exception:  # noqa: BLE001 - models without a pretrained cfg
        return 224


def create_model(arch: str, num_classes: int = 10, pretrained: bool | str = False, **kwargs) -> nn.Module:
    """Build `arch` with `num_classes` outputs; kwargs override the architecture's defaults. `pretrained`
    (True: timm's published weights, from the hub; a path: the same weights from a local file) loads weights
    through timm's own path (safetensors, or `torch.load(weights_only=True)`), which re-initialises the
    classifier when `num_classes` differs from the weights'.

    Example:
        >>> create_model("swin", num_classes=10, embed_dim=32).__class__.__name__
        'SwinTransformer'
        >>> create_model("deit_tiny_patch16_224", num_classes=10, pretrained="deit_tiny.safetensors")
    """
    if pretrained:
        return _pretrained(arch, num_classes, pretrained, kwargs)
    builder = resolve_builder(arch)
    try:
        return builder(num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise CompressError(f"architecture '{arch}' rejected its arguments",
                            expected="keyword arguments its builder accepts", found=str(e)) from None


def _check_timm_name(arch: str) -> None:
    if arch in ARCHS or ":" in arch or not _timm().is_model(arch):
        raise CompressError(f"pretrained weights come with timm model names, not '{arch}'",
                            expected="a timm name such as deit_tiny_patch16_224 (the aliases are CPU-sized variants "
                                     "without published weights)")


def _pretrained(arch: str, num_classes: int, source: bool | str, kwargs: dict) -> nn.Module:
    timm = _timm()
    _check_timm_name(arch)
    overlay = None
    if isinstance(source, str):
        from pathlib import Path

        if not Path(source).is_file():
            raise CompressError(f"pretrained file '{source}' not found", expected="an existing .safetensors or .pth file")
        overlay = {"file": str(source)}
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except Exception as e:  # noqa: BLE001 - hub, network and state-dict errors all reach the user as one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if overlay:
            raise CompressError(f"the weights in '{source}' do not fit '{arch}'", expected=f"{arch}'s state_dict",
                                found=first) from None
        raise CompressError(f"cannot fetch timm's pretrained weights for '{arch}'", found=first,
                            hint="offline? download them elsewhere and pass --pretrained-file PATH") from None


def pretrained_input(arch: str) -> tuple[int, tuple, tuple, int]:
    """(input size, mean, std, classes) of a timm model's published weights."""
    _check_timm_name(arch)
    cfg = _timm().get_pretrained_cfg(arch)
    if cfg is None:
        raise CompressError(f"timm has no pretrained configuration for '{arch}'")
    return int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std), int(cfg.num_classes)


def parse_arch_args(text: str | dict | None) -> dict[str, Any]:
    """Parse `img_size=32,embed_dim=96,depths=2x2x2` into typed kwargs (tuples written with `x` or `/`);
    a dict (a recipe's mapping) passes through.

    Example:
        >>> parse_arch_args("img_size=32,depths=2x2x6x2,drop_rate=0.1,act=gelu")
        {'img_size': 32, 'depths': (2, 2, 6, 2), 'drop_rate': 0.1, 'act': 'gelu'}
    """
    if isinstance(text, dict):
        return dict(text)
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompressError(f"cannot parse architecture argument '{item}'", expected="key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_value(v: str) -> Any:
    for sep in ("x", "/"):
        parts = v.split(sep)
        if len(parts) > 1 and all(p.strip().lstrip("-").isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


from . import archs  # noqa: E402,F401  (registers the CPU-sized aliases; imports neither torch nor timm)
