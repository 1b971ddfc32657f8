"""compress: fuse, distill, prune and quantize vision models, on one layer-alignment core.

Names are imported on first use, so `import compress` (and `compress --help`) does not load torch.

Example:
    >>> from compress import create_model, align
    >>> al = align(create_model("swin", num_classes=10), input_size=32)
    >>> [b.kind for b in al.blocks][:2]
    ['attention', 'attention']
"""

__version__ = "0.2.0"

import importlib

_PUBLIC = {
    "Alignment": "alignment", "align": "alignment",
    "Checkpoint": "checkpoint", "InputSpec": "checkpoint", "load": "checkpoint", "save": "checkpoint",
    "CompressError": "errors",
    "ARCHS": "registry", "Registry": "registry", "create_model": "registry", "register_arch": "registry",
    "TrainConfig": "config", "TrainRun": "config",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute '{name}'")
