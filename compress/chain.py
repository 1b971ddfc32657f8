"""`compress run`: a recipe's steps chained (train -> fuse -> distill -> prune -> quantize -> eval), resumable,
ending in one report.

A recipe is YAML: `data` and `seed` (defaults for every step) and `steps`, an ordered list of mappings, each
with a `kind` (a registered step kind), an optional unique `name` (default: the kind), an optional `from`
(earlier step names or checkpoint files; default: the previous step's output, none for `train`) and the
same keys as that kind's command flags, validated by its config dataclass before any work.

Each step writes under `<out-dir>/<name>/`: `model.pt`, `result.json`, `settings.yaml` (the resolved
settings and the command that reproduces the step) and, last, `done.json` with a hash of its settings and
of its input files. Started again, a run skips every step whose `done.json` matches, resumes a step that was
interrupted from its own resume files (same hash), and re-runs a step whose settings or inputs changed, and
so everything after it (their inputs change).

Example:
    >>> summary = run_recipe("recipes/chain-cnn.yaml", out_dir="runs/cnn", overrides=["train.epochs=5"])
    >>> [r.name for r in summary.rows]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import digest, from_mapping, settings
from .errors import CompressError
from .registry import is_architecture
from .steps import STEPS, Step

RESERVED = ("kind", "name", "from", "data")


@dataclass
class PlannedStep:
    """A validated step: its kind, config, inputs (earlier step names or files) and folder."""

    name: str
    step: Step
    config: Any
    sources: list[str]  # earlier step names or checkpoint files
    data: str
    folder: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # config field -> the earlier step whose output it reads

    @property
    def output(self) -> Path:
        return self.folder / "model.pt"


@dataclass
class Plan:
    path: Path
    title: str
    steps: list[PlannedStep]
    out_dir: Path


def load_recipe(path: str | Path, out_dir: str | Path | None = None, overrides: list[str] = ()) -> Plan:
    """Read and validate a chain recipe (with `--set step.key=value` overrides); nothing runs.

    Every error names the file, the step and the key, in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe '{path}' not found", expected="an existing YAML file")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CompressError(f"recipe '{path}' is not valid YAML", found=str(e).splitlines()[0]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise CompressError(f"recipe '{path}' has no steps", expected="a mapping with a non-empty 'steps' list")
    unknown = sorted(set(doc) - {"steps", "data", "seed", "title"})
    if unknown:
        raise CompressError(f"{path}: unknown top-level key '{unknown[0]}'", expected="steps, data, seed, title")
    raw = [dict(s) if isinstance(s, dict) else s for s in doc["steps"]]
    for i, s in enumerate(raw):
        if not isinstance(s, dict):
            raise CompressError(f"{path}: step {i + 1} is not a mapping", expected="kind: ..., key: value lines")
        s.setdefault("name", s.get("kind"))
    _apply_overrides(path, raw, overrides)
    out_dir = Path(out_dir) if out_dir else Path("runs") / path.stem
    steps: list[PlannedStep] = []
    names = set()
    for i, s in enumerate(raw):
        name = str(s.get("name"))
        where = f"{path} step '{name}'"
        if "kind" not in s:
            raise CompressError(f"{path} step {i + 1}: no 'kind'", expected=f"one of {', '.join(STEPS.names())}")
        if s["kind"] not in STEPS:
            raise CompressError(f"{where}: unknown step kind '{s['kind']}'", expected=f"one of {', '.join(STEPS.names())}")
        if name in names or not name.replace("-", "").replace("_", "").isalnum():
            raise CompressError(f"{where}: key 'name' must be unique and plain", expected="letters, digits, - and _",
                                found=name)
        names.add(name)
        step = STEPS.get(s["kind"])
        folder = out_dir / name
        values = {k: v for k, v in s.items() if k not in RESERVED}
        if "seed" in doc and "seed" not in values and any(f.name == "seed" for f in dataclasses.fields(step.config)):
            values["seed"] = doc["seed"]
        artifacts = _artifacts(step, values, folder)
        config = from_mapping(step.config, values, where)
        if getattr(config, "train_teacher", False):
            raise CompressError(f"{where}: key 'train-teacher' is not for chains", expected="a train step for the "
                                "teacher, then distill from it")
        if getattr(config, "takes_input", lambda: True)():
            sources = _sources(s.get("from"), steps, step, where)
        elif s.get("from") is not None:  # collaborative peers train from scratch
            raise CompressError(f"{where}: key 'from' is not for this step", expected="no input: it trains from "
                                "scratch", found=f"from: {s['from']}")
        else:
            sources = []
        data = s.get("data", doc.get("data", "digits"))
        if not isinstance(data, str):
            raise CompressError(f"{where}: key 'data' has the wrong type", expected="a data spec such as digits")
        steps.append(PlannedStep(name, step, config, sources, data, folder, artifacts, _refs(config, steps, where)))
    return Plan(path, str(doc.get("title", path.stem)), steps, out_dir)


def _apply_overrides(path: Path, raw: list[dict], overrides: list[str]) -> None:
    by_name = {str(s["name"]): s for s in raw}
    for item in overrides:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise CompressError(f"cannot parse --set '{item}'", expected="step.key=value")
        if name not in by_name:
            raise CompressError(f"{path}: --set names step '{name}', which the recipe does not have",
                                expected=f"one of {', '.join(by_name)}")
        by_name[name][key] = yaml.safe_load(value) if value else None


def _artifacts(step: Step, values: dict, folder: Path) -> dict[str, str]:
    """Side outputs (plots, int8 programs) go into the step's folder: `true` gives the default file name, a
    relative path is taken inside the folder."""
    out = {}
    for f in dataclasses.fields(step.config):
        default = f.metadata.get("artifact")
        key = next((k for k in values if str(k).replace("-", "_") == f.name), None)
        if not default or key is None:
            continue
        v = values[key]
        if v is True:
            v = default
        if v in (False, None):
            values[key] = None
            continue
        values[key] = str(Path(v) if Path(str(v)).is_absolute() else folder / str(v))
        out[f.name] = values[key]
    return out


def _refs(config: Any, earlier: list[PlannedStep], where: str) -> dict[str, str]:
    """The checkpoint fields (`option(checkpoint=True)`) that name an earlier step; any other value must be a
    file. A field that may also be an architecture (`checkpoint="or-architecture"`: a collab peer, a student)
    names a step only when it matches one, and a value that is both is refused as ambiguous."""
    names = {p.name for p in earlier}
    refs = {}
    for f in dataclasses.fields(config):
        value, kind, key = getattr(config, f.name), f.metadata.get("checkpoint"), f.name.replace("_", "-")
        if not kind or value is None:
            continue
        if kind == "or-architecture":
            if str(value) in names:
                if is_architecture(str(value)):
                    raise CompressError(f"{where}: key '{key}' names '{value}', both an earlier step and an "
                                        "architecture", expected="a step name that is no architecture (rename it)")
                refs[f.name] = str(value)
        elif _is_step(value, names, where, key):
            refs[f.name] = str(value)
    return refs


def _is_step(value, names: set[str], where: str, key: str) -> bool:
    """Whether `value` names an earlier step (else it must be a file: refused when it is neither)."""
    if str(value) in names:
        return True
    if not Path(str(value)).is_file():
        raise CompressError(f"{where}: key '{key}' names '{value}', which is neither an earlier step nor a file",
                            expected=f"one of {', '.join(sorted(names)) or '(no earlier steps)'}")
    return False


def _sources(given, earlier: list[PlannedStep], step: Step, where: str) -> list[str]:
    names = {p.name for p in earlier}
    if given is None:
        if step.inputs == "optional":
            return []
        if step.inputs == "many":
            raise CompressError(f"{where}: key 'from' is missing", expected=f"the {step.kind} step's inputs: "
                                "a list of earlier steps (or checkpoint files)")
        if not earlier:
            raise CompressError(f"{where}: key 'from' is missing", expected="an input: the first step has no "
                                "previous step to read")
        return [earlier[-1].name]
    items = given if isinstance(given, list) else [given]
    for it in items:
        _is_step(it, names, where, "from")
    count = len(items)
    if (step.inputs == "one" and count != 1) or (step.inputs == "optional" and count > 1) or \
            (step.inputs == "many" and count < 2):
        want = {"one": "exactly one input", "optional": "at most one input", "many": "two or more inputs"}
        raise CompressError(f"{where}: key 'from' has {count} inputs", expected=want[step.inputs])
    return [str(it) for it in items]


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_recipe(path: str | Path, out_dir: str | Path | None = None, overrides: list[str] = (),
               report: bool = True):
    """Validate the recipe, then run its steps in order (skipping finished ones, resuming an interrupted
    one), then measure every stage side by side and write the report. Returns the `Summary`."""
    from .checkpoint import atomic_write, save
    from .report import console, run_progress, seconds

    plan = load_recipe(path, out_dir, overrides)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    records = []
    start = time.perf_counter()
    with run_progress() as bar:
        say = bar.console.print  # above the live display, not through it
        task = bar.add_task(f"{plan.title}", total=len(plan.steps), note="")
        for i, ps in enumerate(plan.steps, 1):
            bar.update(task, description=f"step {i}/{len(plan.steps)} {ps.step.kind} '{ps.name}'")
            inputs = [outputs[s] if s in outputs else Path(s) for s in ps.sources]
            for f, src in ps.refs.items():  # a second checkpoint named by its step: that step's output
                setattr(ps.config, f, str(outputs[src]))
            refs = [Path(getattr(ps.config, f)) for f in ps.refs]
            key = digest(ps.step.kind, ps.data, settings(ps.config), [file_hash(p) for p in inputs + refs])
            ps.folder.mkdir(parents=True, exist_ok=True)
            for tmp in ps.folder.glob(".*.tmp*"):  # a write cut short by a kill: never taken as done
                tmp.unlink(missing_ok=True)
            done = _read_json(ps.folder / "done.json")
            result_file = ps.folder / "result.json"
            out = ps.output if ps.step.writes else inputs[0]
            command = ps.step.command([str(p) for p in inputs], ps.data, ps.config, str(ps.output))
            if done and done.get("hash") == key and out.is_file() and result_file.is_file():
                status, seconds_taken = "cached", done.get("seconds")
                say(f"step {i}/{len(plan.steps)} {ps.name}: finished earlier with these settings and inputs, skipped")
            else:
                started = _read_json(ps.folder / "started.json")
                resume = bool(started and started.get("hash") == key)
                if not resume:
                    for stale in ps.folder.glob("*.resume.pt"):
                        stale.unlink()
                    for stale in ("done.json", "result.json"):
                        (ps.folder / stale).unlink(missing_ok=True)
                write_json_file(ps.folder / "started.json", {"hash": key})
                status = "resumed" if resume else "ran"
                t = time.perf_counter()
                ckpt, result = ps.step(inputs, ps.data, ps.config, state=str(ps.output), resume=resume)
                seconds_taken = time.perf_counter() - t
                if ps.step.writes:
                    save(ckpt, ps.output)
                resolved = {"kind": ps.step.kind, "inputs": [str(p) for p in inputs], "data": ps.data,
                            "settings": settings(ps.config), "command": command}
                atomic_write(ps.folder / "settings.yaml", lambda tmp, r=resolved: Path(tmp).write_text(
                    yaml.safe_dump(r, sort_keys=False)))
                write_json_file(result_file, result.to_dict())
                write_json_file(ps.folder / "done.json", {"hash": key, "seconds": round(seconds_taken, 2)})
                (ps.folder / "started.json").unlink(missing_ok=True)
                for note in result.notes:
                    say(f"[yellow]note[/] ({ps.name}): {note}")
                elapsed = time.perf_counter() - start
                say(f"step {i}/{len(plan.steps)} {ps.name} ({ps.step.kind}): {status} in {seconds(seconds_taken)}; "
                    f"{seconds(elapsed)} since the start")
            outputs[ps.name] = out
            saved = _read_json(result_file) or {}
            records.append((ps, inputs, status, seconds_taken, command, saved))
            bar.update(task, advance=1)
    summary = _summarise(plan, records)
    if report:
        from .report import rows_table
        from .summary import write_report

        for suffix in (".html", ".md", ".json"):
            write_report(summary, plan.out_dir / f"report{suffix}")
        console.print(rows_table(f"{plan.title}: every stage (test metric; latency side by side, "
                                 f"{summary.threads} threads)", summary.rows))
        for n in summary.notes:
            console.print(f"[yellow]note[/]: {n}")
        console.print(f"report: {plan.out_dir / 'report.html'} (also .md, .json; Pareto plot report.png)")
    return summary


def write_json_file(path: Path, value: dict) -> None:
    from .report import write_json

    write_json(path, value)


def deployed_float_model(saved: dict, inputs: list) -> str | None:
    """The float model a step's deployed int8 program is timed beside: the chosen backend's own float
    program where it wrote one (ONNX Runtime's `.fp32.onnx`), else the step's input checkpoint (PT2E's is
    compiled alike); None when nothing was deployed.

    Example:
        >>> deployed_float_model({"deploy": "q/model.int8.onnx", "deploy_backend": "onnxruntime",
        ...     "deployments": {"onnxruntime": {"fp32_path": "q/model.int8.fp32.onnx"}}}, ["pruned.pt"])
        'q/model.int8.fp32.onnx'
    """
    if not saved.get("deploy"):
        return None
    chosen = (saved.get("deployments") or {}).get(saved.get("deploy_backend") or "", {})
    return chosen.get("fp32_path") or str(inputs[0])


def _summarise(plan: Plan, records: list) -> Any:
    """Every stage measured side by side in this process: the output of each step that writes a model, and
    the int8 program of each quantize step that deployed one."""
    import torch

    from .report import row_dict
    from .result import Row
    from .stages import measure_stages
    from .summary import StepRecord, Summary

    steps, stages, notes = [], [], []
    for ps, inputs, status, secs, command, saved in records:
        compared = {"models compared in the step": [row_dict(Row(**r)) for r in saved.get("rows", [])]}
        steps.append(StepRecord(ps.name, ps.step.kind, [str(p) for p in inputs], settings(ps.config), command,
                                secs, status, str(ps.output) if ps.step.writes else None, saved.get("notes", []),
                                {**(compared if len(saved.get("rows", [])) > 1 else {}), **saved.get("tables", {})}))
        notes += [f"{ps.name}: {n}" for n in saved.get("notes", [])]
        if ps.step.writes:  # a deployed program is timed beside its float model on the same runtime
            program = saved.get("deploy")
            stages.append((ps.name, ps.output, ps.data, secs, program, deployed_float_model(saved, inputs)))
    rows = measure_stages(stages)
    return Summary(plan.title, rows, steps, notes, torch.get_num_threads())
