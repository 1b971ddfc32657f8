"""Cost of one distillation step against (one student training step + one teacher forward), measured side
by side: the same batch, interleaved rounds, median step time; 2 threads.

Two scales: `digits` (the 32 px CPU models of the digits benchmarks, batch 64) and `paper` (the paper's
ImageNet shapes at 224 px, random weights, batch 16: ResNet-50 -> DeiT-Ti and Swin-T -> ResNet-18). OFA's
exit branches are part of the method's compute, and their share depends on scale: token branches merge to
the stride-32 grid of the input (7x7 at 224 px, 2x2 at 32 px) before their transformer blocks, and are
sized by the student's width, so on the tiny 32 px models they are a larger part of a step.

Run: .venv/bin/python bench/distill_overhead.py [--scale digits|paper]
     (writes bench/results/distill_overhead[-paper].json)
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

SCALES = {  # teacher, student pairs; image size; batch
    "digits": ([("resnet", "vit"), ("vit", "resnet")], 32, 64),
    "paper": ([("resnet50", "deit_tiny_patch16_224"), ("swin_tiny_patch4_window7_224", "resnet18")], 224, 16),
}


def step_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(scale: str = "digits") -> dict:
    torch.set_num_threads(2)
    pairs, size, batch = SCALES[scale]
    classes = 10 if scale == "digits" else 1000
    out = {}
    for teacher_name, student_name in pairs:
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
        teacher = create_model(teacher_name, num_classes=classes).eval()
        runs = {m: Distiller(create_model(student_name, num_classes=classes), teacher,
                             DistillConfig(m.split("+")[0]), InputSpec(size), InputSpec(size), classes,
                             cache_teacher=m.endswith("+cache")).train()
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
    scale = sys.argv[sys.argv.index("--scale") + 1] if "--scale" in sys.argv else "digits"
    name = "distill_overhead" + ("" if scale == "digits" else f"-{scale}")
    Path(f"bench/results/{name}.json").write_text(json.dumps(main(scale), indent=1))
