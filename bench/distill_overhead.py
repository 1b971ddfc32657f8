"""Cost of one distillation step against (one student training step + one teacher forward), measured side
by side: the same batch, interleaved rounds, median step time; 2 threads.

Run: .venv/bin/python bench/distill_overhead.py   (writes bench/results/distill_overhead.json)
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import InputSpec, create_model  # noqa: E402
from distill import DistillConfig, Distiller  # noqa: E402

PAIRS = [("resnet", "vit"), ("vit", "resnet")]  # teacher, student


def step_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> dict:
    torch.set_num_threads(2)
    out = {}
    for teacher_name, student_name in PAIRS:
        torch.manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        teacher = create_model(teacher_name, num_classes=10).eval()
        runs = {m: Distiller(create_model(student_name, num_classes=10), teacher, DistillConfig(m.split("+")[0]),
                             InputSpec(32), InputSpec(32), 10, cache_teacher=m.endswith("+cache")).train()
                for m in ("scratch", "kd", "fitnet", "ofa", "kd+cache")}  # the cache is warm after the warm-up
        opts = {m: torch.optim.AdamW([p for p in d.parameters() if p.requires_grad]) for m, d in runs.items()}

        def train_step(d, opt, x=x, y=y):
            def step():
                opt.zero_grad()
                d(x, y).backward()
                opt.step()
            return step

        def teacher_forward(teacher=teacher, x=x):
            with torch.no_grad():
                teacher(x)

        fns = {**{m: train_step(d, opts[m]) for m, d in runs.items()}, "teacher_forward": teacher_forward}
        for fn in fns.values():  # warm-up
            fn()
        samples = {k: [] for k in fns}
        for _ in range(5):  # interleaved rounds, so load on the machine hits every variant alike
            for k, fn in fns.items():
                samples[k].append(step_time(fn, 3))
        ms = {k: statistics.median(v) for k, v in samples.items()}
        base = ms["scratch"] + ms["teacher_forward"]
        out[f"{teacher_name} -> {student_name}"] = {
            "ms": ms, **{f"{m}_vs_student_step_plus_teacher_forward": ms[m] / base for m in ("kd", "fitnet", "ofa")},
            "kd_cached_vs_student_step": ms["kd+cache"] / ms["scratch"]}
        print(f"{teacher_name} -> {student_name}", json.dumps(out[f"{teacher_name} -> {student_name}"]))
    return out


if __name__ == "__main__":
    Path("bench/results/distill_overhead.json").write_text(json.dumps(main(), indent=1))
