"""Post-training quantization: a fake-quant simulation engine for the research methods, and a real int8
deployment path (PT2E, x86 Inductor) measured against FP32.

    config.py       QuantConfig (what to calibrate), QuantizeRun (the whole command), METHODS, parse_bits
    pipeline.py     run(checkpoint, data, QuantizeRun) -> (Checkpoint, Result): calibrate, sensitivity, deploy
    engine.py       sites (every conv / linear / attention matmul / softmax / GELU / norm call) and the
                    QuantizedModel that runs a model with quantizers at them
    quantizers.py   uniform (sym / asym, tensor / channel / head), twin-uniform, log2 / log-sqrt2
    search.py       min-max, percentile and Hessian-guided range search for one site
    intgemm.py      a linear site's quantized output from integer codes (exact, oneDNN int8), for the search
    methods.py      minmax, percentile, ptq4vit, repq, qhyvit (registered in METHODS)
    reparam.py      RepQ-ViT's LayerNorm scale reparameterisation
    reconstruct.py  block reconstruction with learned rounding (Q-HyViT's bridge blocks)
    calibrate.py    the driver: parallel calibration, sequential bridge blocks, sensitivity
    deploy.py       the int8 artifact, timed against FP32 on the same backend

Example:
    >>> import quantize
    >>> ckpt, result = quantize.run("vit.pt", "digits", quantize.QuantizeRun(bits="w6a6"))
    >>> qm, info = quantize.calibrate(model, images, quantize.QuantConfig(method="qhyvit", bits="w6a6"))
"""

from compress.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "run": "pipeline", "QuantizeRun": "config", "QuantConfig": "config", "METHODS": "config",
    "parse_bits": "config", "calibrate": "calibrate", "sensitivity": "calibrate", "sqnr": "calibrate",
    "QuantizedModel": "engine", "Site": "engine", "discover": "engine",
})
