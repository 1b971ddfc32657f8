"""Post-training quantization: a fake-quant simulation engine for the research methods, and a real int8
deployment path (PT2E, x86 Inductor) measured against FP32.

    engine.py       sites (every conv / linear / attention matmul / softmax / GELU / norm call) and the
                    QuantizedModel that runs a model with quantizers at them
    quantizers.py   uniform (sym / asym, tensor / channel / head), twin-uniform, log2 / log-sqrt2
    search.py       min-max, percentile and Hessian-guided range search for one site
    methods.py      minmax, percentile, ptq4vit, repq, qhyvit (METHODS registry)
    reparam.py      RepQ-ViT's LayerNorm scale reparameterisation
    reconstruct.py  block reconstruction with learned rounding (Q-HyViT's bridge blocks)
    calibrate.py    the driver: parallel calibration, sequential bridge blocks, sensitivity
    deploy.py       the int8 artifact, timed against FP32 on the same backend

Example:
    >>> qm, info = calibrate(model, images, QuantConfig(method="qhyvit", bits="w6a6"), align(model).blocks)
    >>> top1(qm, data.test)
"""

from .calibrate import QuantConfig, calibrate, parse_bits, sensitivity, sqnr
from .engine import QuantizedModel, Site, discover
from .methods import METHODS

__all__ = ["METHODS", "QuantConfig", "QuantizedModel", "Site", "calibrate", "discover", "parse_bits",
           "sensitivity", "sqnr"]
