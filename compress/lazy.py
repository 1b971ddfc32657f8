"""Public names of a package imported on first use (PEP 562), so that importing a package, which the
command line does to build its flags, does not load torch.

Example:
    >>> __getattr__, __all__ = exports(__name__, {"run": "pipeline", "FuseRun": "config"})
"""

from __future__ import annotations

import importlib
import sys


def exports(package: str, names: dict[str, str]):
    """A module `__getattr__` serving `names` (public name -> submodule), and the matching `__all__`."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, list(names)
