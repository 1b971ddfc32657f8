"""Cost of fusing two 12-layer, width-384 ViTs (patch 4, 32 px) with 256 calibration images on 2 cores.

Run: .venv/bin/python bench/fuse_cost.py [--repair]   (random weights: the cost does not depend on training;
     every token, as when docs/BENCHMARKS.md recorded it)
"""

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import create_model  # noqa: E402
from fuse import FuseConfig, fuse_models  # noqa: E402

torch.set_num_threads(2)
kw = dict(embed_dim=384, depth=12, num_heads=6)
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(create_model("vit", **kw).eval())
images = torch.randn(256, 3, 32, 32)
t = time.perf_counter()
state, report = fuse_models(models, images, FuseConfig(ground="acts", solver="emd", calib=256, batch_size=32,
                                                          tokens="all", merge="mean", repair="--repair" in sys.argv))
total = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print("| total s | trace s | statistics s | OT solve s | apply s | repair s | spaces | peak RSS GiB |\n"
      "|---|---|---|---|---|---|---|---|")
print(f"| {total:.1f} | {report.seconds_trace:.1f} | {report.seconds_stats:.1f} | {report.seconds_solve:.1f} | "
      f"{report.seconds_apply:.1f} | {report.seconds_repair:.1f} | {report.spaces} | {peak:.2f} |")
