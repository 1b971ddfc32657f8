"""compress: fuse, distill, prune and quantize vision models, on one layer-alignment core.

Example:
    >>> from compress import create_model, align
    >>> al = align(create_model("swin", num_classes=10), input_size=32)
    >>> [b.kind for b in al.blocks][:2]
    ['attention', 'attention']
"""

__version__ = "0.1.0"

from . import archs  # noqa: E402,F401  (registers the CPU-sized aliases)
from .alignment import Alignment, align  # noqa: E402
from .checkpoint import Checkpoint, InputSpec, load, save  # noqa: E402
from .errors import CompressError  # noqa: E402
from .registry import ARCHS, Registry, create_model, register_arch  # noqa: E402

__all__ = ["__version__", "Alignment", "align", "Checkpoint", "InputSpec", "load", "save", "CompressError", "ARCHS",
           "Registry", "create_model", "register_arch"]
