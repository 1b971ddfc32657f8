"""Cost of deriving the alignment (spaces + blocks) for every registered alias.

Run: .venv/bin/python bench/alignment_cost.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import ARCHS, align, create_model  # noqa: E402
from compress.registry import default_img_size  # noqa: E402

print("| model | spaces | residual | coverage | blocks (bridge) | spaces s | blocks s |\n|---|---|---|---|---|---|---|")
for name in ARCHS.names():
    model = create_model(name).eval()
    al = align(model, default_img_size(name))
    t = time.perf_counter()
    sg = al.spaces
    t_spaces = time.perf_counter() - t
    t = time.perf_counter()
    blocks = al.blocks
    t_blocks = time.perf_counter() - t
    bridges = sum(b.kind == "bridge" for b in blocks)
    print(f"| {name} | {len(sg.spaces)} | {sum(s.residual for s in sg.spaces)} | "
          f"{sg.coverage(model.state_dict()):.1%} | {len(blocks)} ({bridges}) | {t_spaces:.2f} | {t_blocks:.2f} |")
