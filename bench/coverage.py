"""Coverage of timm's architecture families (issue 16): does the alignment layer, and every pipeline built on
it, work on each family, or fail with a clear message? One representative model per timm module, at a tiny
size, random (perturbed) weights.

Checks per family (a cell is `OK`, `n/a: why`, or `FAIL: the one-line reason`):

- build: timm builds it and it runs at the input size;
- align: stages, spaces and blocks (with kinds) are found;
- permute: a random permutation of every space keeps the logits (< 1e-4 relative to the logit scale) and
  moves most tensors: the check that catches a wrong space (a silently wrong fusion / pruning);
- spaces: share of parameter elements on a free axis (>= 80% passes; unknown ops are listed);
- self-fuse: fusing with a permuted copy of itself returns the same function (< 1e-4);
- fuse: two different inits fuse with the family default and the result runs;
- width: width pruning at ratio 0.5 leaves fewer parameters, runs, and its checkpoint reloads to the same
  logits;
- depth: depth pruning of a quarter of the blocks runs with fewer parameters;
- minmax / qhyvit: W8A8 logit SQNR (dB) on 16 held-out images after calibration on 8 (Q-HyViT with a
  21-point range grid and 50 rounding steps per bridge block, for time; where that falls more than 1 dB
  below min-max, both are calibrated again at the library's defaults, 32 images, and compared there);
  min-max must reach 10 dB, Q-HyViT must not be more than 1 dB below min-max;
- ofa: one OFA step with the model as student (a slim ResNet teacher) updates the student;
- transkd: one TransKD step, the family as the backbone of a segmentation student and of a teacher of the
  same shape, where it is hierarchical (n/a otherwise).

Run: .venv/bin/python bench/coverage.py [--families resnet vit ...] [--timeout 150]
     (each family in its own process, 2 threads; results in bench/results/coverage/, table in docs/COVERAGE.md)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "coverage"
TABLE = ROOT / "docs" / "COVERAGE.md"

# One representative per timm module (timm 1.0.31): its smallest model (parameters counted on the meta device),
# shrunk further through builder kwargs where the builder takes them; the input size it runs at.
FAMILIES: dict[str, tuple[str, dict, int]] = json.loads((Path(__file__).parent / "coverage_models.json").read_text())

CHECKS = ("build", "align", "permute", "spaces", "self-fuse", "fuse", "width", "depth", "minmax", "qhyvit", "ofa",
          "transkd")


class NotApplicable(Exception):
    """The check does not apply to this family (the message says why)."""


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg}"[:160]


def check_family(family: str) -> dict:
    import torch

    from compress import align
    from compress.checkpoint import Checkpoint, InputSpec, load, save
    from compress.registry import create_model
    from tests.helpers import perturb_

    torch.set_num_threads(2)
    name, kwargs, size = FAMILIES[family]
    cells: dict[str, str] = {}
    info: dict = {"model": name, "kwargs": kwargs, "size": size}

    def build(seed: int = 0):
        torch.manual_seed(seed)
        m = create_model(name, num_classes=10, **kwargs).eval()
        perturb_(m, seed)
        return m

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, size, size, generator=g)
    held = torch.randn(16, 3, size, size, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    state: dict = {}

    def scale_of(ref):
        return max(1.0, ref.abs().max().item())

    def c_build():
        state["model"] = model = build()
        with torch.no_grad():
            state["ref"] = model(held)
        info["params"] = sum(p.numel() for p in model.parameters())
        return "OK"

    def c_align():
        al = align(state["model"], size)
        st, sg, bl = al.stages, al.spaces, al.blocks
        state["sg"] = sg
        info.update(stages=len(st), spaces=len(sg.spaces), blocks=len(bl), unknown_ops=sg.unknown_ops,
                    kinds=sorted({b.kind for b in bl}))
        if not st:
            raise RuntimeError("no stages found")
        if not bl:
            raise RuntimeError("no blocks found")
        return "OK"

    def c_permute():  # the spaces as the rules derive them, before the library's own invariance check drops any
        from compress.alignment.spaces import find_spaces

        model = state["model"]
        sg = find_spaces(model, held[:1], verify=False)
        if not sg.spaces:
            raise RuntimeError("no free space: nothing can be permuted (fusion and width pruning have nothing to do)")
        st = model.state_dict()
        perm = sg.permute_state(st, sg.random_permutations(torch.Generator().manual_seed(1)))
        twin = build()
        twin.load_state_dict(perm)
        with torch.no_grad():
            err = (twin(held) - state["ref"]).abs().max().item() / scale_of(state["ref"])
        info["permute_error"] = err
        if not err < 1e-4:
            raise RuntimeError(f"a permutation of the spaces changes the logits by {err:.1e} (a wrong space)")
        return "OK"

    def c_spaces():
        cov = state["sg"].coverage(state["model"].state_dict())
        info["coverage"] = round(cov, 3)
        unknown, rejected = state["sg"].unknown_ops, state["sg"].rejected
        tail = f"; ops without a rule: {', '.join(unknown)}" if unknown else ""
        if rejected:
            info["rejected_spaces"] = rejected
            tail += f"; {len(rejected)} spaces dropped by the invariance check"
        if cov < 0.8:
            raise RuntimeError(f"{cov:.0%} of parameters on a free axis{tail}")
        return f"OK {cov:.0%}{tail}"

    def c_self_fuse():
        from fuse import FuseConfig, fuse_models

        sg, model = state["sg"], state["model"]
        twin = build()
        twin.load_state_dict(sg.permute_state(model.state_dict(), sg.random_permutations(torch.Generator().manual_seed(5))))
        fused, report = fuse_models([twin, model], x, FuseConfig(ground="acts", solver="hungarian", calib=32,
                                                                  batch_size=16, repair=False, merge="mean"))
        other = build()
        other.load_state_dict(fused)
        with torch.no_grad():
            err = (other(held) - state["ref"]).abs().max().item() / scale_of(state["ref"])
        info["self_fuse_error"] = err
        if not err < 1e-4:
            raise RuntimeError(f"fusion with a permuted copy changes the logits by {err:.1e}")
        return "OK"

    def c_fuse():
        from fuse import FuseConfig, fuse_models

        a, b = build(1), build(2)
        fused, report = fuse_models([a, b], x, FuseConfig(calib=32, batch_size=16))
        m = build()
        m.load_state_dict(fused)
        with torch.no_grad():
            out = m(held)
        if not torch.isfinite(out).all():
            raise RuntimeError("the fused model outputs non-finite logits")
        return "OK" + (f" ({len(report.notes)} notes)" if getattr(report, "notes", None) else "")

    def c_width():
        from prune import PruneConfig, prune

        m = copy.deepcopy(state["model"])
        before = sum(p.numel() for p in m.parameters())
        pr = prune(m, x, y, PruneConfig(method="width", ratio=0.5, importance="magnitude"))
        after = sum(p.numel() for p in pr.model.parameters())
        if not after < before:
            raise RuntimeError(f"width pruning removed nothing ({before} parameters before and after)")
        with torch.no_grad():
            out = pr.model.eval()(held)
        ckpt = Checkpoint(name, kwargs, 10, input=InputSpec(size), structure=[pr.op],
                          state_dict={k: v.detach() for k, v in pr.model.state_dict().items()})
        with tempfile.TemporaryDirectory() as tmp:
            save(ckpt, Path(tmp) / "p.pt")
            again = load(Path(tmp) / "p.pt").build()
        with torch.no_grad():
            err = (again(held) - out).abs().max().item()
        if not err < 1e-5:
            raise RuntimeError(f"the pruned checkpoint reloads to different logits ({err:.1e})")
        return f"OK {after / before:.0%} params"

    def c_depth():
        from compress.errors import CompressError
        from prune import PruneConfig, prune

        m = copy.deepcopy(state["model"])
        before = sum(p.numel() for p in m.parameters())
        try:
            pr = prune(m, x, y, PruneConfig(method="depth", ratio=0.25))
        except CompressError as e:
            # no residual unit to remove, or too few for a quarter of them to be one: depth pruning does not apply
            if "keep their input's shape" in str(e) or "would remove no unit" in str(e):
                raise NotApplicable(" ".join(str(e).split())[:120]) from e
            raise
        after = sum(p.numel() for p in pr.model.parameters())
        with torch.no_grad():
            out = pr.model.eval()(held)
        if not (after < before and torch.isfinite(out).all()):
            raise RuntimeError(f"depth pruning: {before} -> {after} parameters, finite={bool(torch.isfinite(out).all())}")
        return f"OK {after / before:.0%} params"

    def quant(method, full=False):
        from quantize import QuantConfig, calibrate, sqnr
        from quantize.config import SearchConfig

        m = copy.deepcopy(state["model"])
        if full:  # the library's defaults: 32 images, the 101-point grid, 200 rounding steps
            qm, _ = calibrate(m, x, QuantConfig(method=method, bits="w8a8"))
        else:  # a short calibration keeps the sweep within its time: 8 images, a 21-point grid, 50 rounding steps
            cfg = QuantConfig(method=method, bits="w8a8", search=SearchConfig(points=20), recon_iters=50)
            qm, _ = calibrate(m, x[:8], cfg)
        with torch.no_grad():
            db = sqnr(state["ref"], qm(held))
        info[f"{method}_sqnr" + ("_full" if full else "")] = round(db, 2)
        return db

    def c_minmax():
        db = quant("minmax")
        if not db >= 10:
            raise RuntimeError(f"W8A8 min-max logit SQNR {db:.1f} dB (< 10 dB)")
        return f"OK {db:.1f} dB"

    def c_qhyvit():
        db = quant("qhyvit")
        base = info.get("minmax_sqnr", -math.inf)
        if db >= base - 1:
            return f"OK {db:.1f} dB"
        # below min-max with the short calibration: judge the method at its defaults, beside min-max at its own
        db, base = quant("qhyvit", full=True), quant("minmax", full=True)
        if not db >= base - 1:
            raise RuntimeError(f"Q-HyViT W8A8 logit SQNR {db:.1f} dB, more than 1 dB below min-max ({base:.1f} dB) "
                               "with the default calibration")
        return f"OK {db:.1f} dB (default calibration; min-max {base:.1f})"

    def distill_step(method):
        from compress.errors import CompressError
        from distill import DistillConfig, Distiller

        torch.manual_seed(0)
        if method == "transkd":  # segmentation: the family as backbone of student and (same shape) teacher
            from compress.segmentation import SegmentationNet

            student = SegmentationNet(name, 10, kwargs, size)
            teacher, t_size = SegmentationNet(name, 10, kwargs, size).eval(), size
            target = torch.randint(0, 10, (4, size, size), generator=g)
        else:
            student = build()
            teacher, t_size = create_model("resnet", num_classes=10, channels=(16, 32, 64, 128)).eval(), 32
            target = y[:4]
        try:
            d = Distiller(student, teacher, DistillConfig(method), InputSpec(size), InputSpec(t_size), 10)
        except CompressError as e:
            if method == "transkd" and "hierarchical" in str(e):
                raise NotApplicable(str(e).split("\n")[0]) from e
            raise
        d.train()
        params = [p for p in d.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in student.parameters()]
        loss = d(x[:4], target)
        loss.backward()
        torch.optim.SGD(params, lr=0.01).step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{method} loss is {loss.item()}")
        if not any(not torch.equal(a, b) for a, b in zip(before, student.parameters())):
            raise RuntimeError(f"one {method} step left the student unchanged")
        return "OK"

    steps = {"build": c_build, "align": c_align, "permute": c_permute, "spaces": c_spaces, "self-fuse": c_self_fuse,
             "fuse": c_fuse, "width": c_width, "depth": c_depth, "minmax": c_minmax, "qhyvit": c_qhyvit,
             "ofa": lambda: distill_step("ofa"), "transkd": lambda: distill_step("transkd")}
    needs = {"align": "build", "permute": "align", "spaces": "align", "self-fuse": "align"}
    for check in CHECKS:
        dep = needs.get(check, "build" if check != "build" else None)
        if dep and not cells.get(dep, "").startswith("OK"):
            cells[check] = f"n/a: {dep} failed"
            continue
        t0 = time.perf_counter()
        try:
            cells[check] = steps[check]()
        except NotApplicable as e:
            cells[check] = f"n/a: {' '.join(str(e).split())[:120]}"
        except Exception as e:  # noqa: BLE001 (every failure becomes its one-line reason in the table)
            cells[check] = f"FAIL: {one_line(e)}"
            info.setdefault("tracebacks", {})[check] = traceback.format_exc(limit=6)
        info.setdefault("seconds", {})[check] = round(time.perf_counter() - t0, 2)
        # so that a family over its time limit still reports the checks it finished
        (RESULTS / f"{family}.partial.json").write_text(json.dumps({"family": family, "cells": cells, **info}))
    return {"family": family, "cells": cells, **info}


def provenance() -> list[str]:
    """The hand-written paragraph of the current table between its summary line and the table (how and when
    its rows were run): a pass over some families keeps it, to be edited, rather than dropping it."""
    if not TABLE.exists():
        return []
    lines = TABLE.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("**") and "families pass" in line), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("| family |")), None)
    if start is None or end is None:
        return []
    return lines[start + 1:end]


def write_table(results: dict[str, dict]) -> None:
    ok = [f for f, r in results.items() if all(not c.startswith("FAIL") for c in r["cells"].values())]
    kept = provenance() or [""]
    lines = [
        "# Coverage of timm's architecture families",
        "",
        "Generated by `.venv/bin/python bench/coverage.py` (timm 1.0.31, 2 threads). One representative model per "
        "timm module, tiny, random perturbed weights. A cell is OK, n/a (the check does not apply, and why) or "
        "FAIL with its one-line reason; what each check asserts is in the script's docstring.",
        "",
        f"**{len(ok)} of {len(results)} families pass every check that applies to them** (the target is 90%: "
        f"{'met' if len(ok) >= 0.9 * len(results) else 'not met'}).",
        *kept,
        "| family | model | " + " | ".join(CHECKS) + " |",
        "|---|---|" + "---|" * len(CHECKS),
    ]
    for f in sorted(results):
        r = results[f]
        cells = [r["cells"].get(c, "not run").replace("|", "/") for c in CHECKS]
        lines.append(f"| {f} | {r['model']} | " + " | ".join(cells) + " |")
    missing = sorted(set(FAMILIES) - set(results))
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): " + ", ".join(missing) + "."]
    lines += ["", *READING]
    TABLE.write_text("\n".join(lines) + "\n")


READING = """## Reading the failures

- **permute** fails where a spaces rule is wrong for that family (the logits change under a permutation
  that should keep them). The library does not rely on this check being run: `find_spaces` repeats it on
  every model it is given and drops the spaces that change the function (the **spaces** cell counts them),
  so fusion and width pruning leave those axes alone instead of producing a wrong model (the fusion report
  names them).
- **self-fuse** fails where fusion cannot recover a permuted copy of the model: a space no rule should have
  derived, or neurons the activations cannot tell apart. The library breaks the second kind on the weights
  (fewer samples than neurons, constant neurons, correlations tied within 1e-4, spaces no activation
  carries) and names each such space in the fusion report; a remaining failure is a defect.
- **ran over N s**: the sweep gives each family `--timeout` seconds (default 150) on 2 cores; the check
  named ran past it (large families at their smallest published size, Q-HyViT's grid on many sites) and the
  checks after it did not run.
- Other FAIL cells carry the exception's first line: each is a case the alignment layer or a pipeline does
  not handle yet for that family.""".splitlines()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--families", nargs="*", default=sorted(FAMILIES))
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one family in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(check_family(args.one)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    for f in args.families:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", f], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            r = json.loads(last) if last.startswith("{") else {
                "family": f, "model": FAMILIES[f][0], "cells": {"build": "FAIL: crashed: " + " ".join(
                    proc.stderr.strip().splitlines()[-1:])[:160]}}
        except subprocess.TimeoutExpired:
            partial = RESULTS / f"{f}.partial.json"
            r = json.loads(partial.read_text()) if partial.exists() else {"family": f, "model": FAMILIES[f][0],
                                                                          "cells": {}}
            late = next((c for c in CHECKS if c not in r["cells"]), None)
            if late is not None:  # (None: every check finished just before the limit)
                r["cells"][late] = f"FAIL: the family's checks ran over {args.timeout} s here"
        (RESULTS / f"{f}.partial.json").unlink(missing_ok=True)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        (RESULTS / f"{f}.json").write_text(json.dumps(r, indent=1))
        bad = [f"{c}: {v}" for c, v in r["cells"].items() if v.startswith("FAIL")]
        print(f"{f:28s} {r['wall_s']:6.1f}s  " + ("all OK" if not bad else " | ".join(bad)), flush=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.stem in FAMILIES}
    for r in results.values():  # checks after the one that ran over time were not run
        for c in CHECKS:
            r["cells"].setdefault(c, "not run (time limit)")
    write_table(results)


if __name__ == "__main__":
    main()
