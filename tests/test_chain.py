"""`compress run`: chains from Python and the CLI, resume after a crash or a kill, re-runs after a change,
recipe errors before any work, and the report."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import main
from compress import load
from compress.chain import load_recipe, run_recipe
from tests.helpers import SLIM_RESNET_ARGS

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "resnet", "arch-args": "channels=8x16x32x64"}


def recipe(tmp_path: Path, steps: list[dict], name: str = "r.yaml") -> Path:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump({"title": "test chain", "data": "digits", "steps": steps}, sort_keys=False))
    return path


def three_steps(tmp_path: Path, epochs: int = 2) -> Path:
    return recipe(tmp_path, [
        {"name": "base", "kind": "train", **TINY, "epochs": epochs},
        {"name": "thin", "kind": "prune", "method": "width", "ratio": 0.5, "calib": 64},
        {"name": "q", "kind": "quantize", "method": "minmax", "calib": 16},
    ])


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load(a).state_dict, load(b).state_dict
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_chain_from_python_runs_every_step_and_reports(tmp_path):
    summary = run_recipe(three_steps(tmp_path), tmp_path / "run")
    assert [s.name for s in summary.steps] == ["base", "thin", "q"]
    assert all(s.status == "ran" for s in summary.steps)
    base, thin, q = summary.rows
    assert base.score > 30 and thin.params < base.params and thin.macs < base.macs  # it learned; pruning is physical
    assert q.runtime == "simulated" and q.latency_ms is None and abs(q.score - thin.score) < 5  # 8-bit stays close
    for step in ("base", "thin", "q"):
        folder = tmp_path / "run" / step
        assert {"model.pt", "result.json", "settings.yaml", "done.json"} <= {p.name for p in folder.iterdir()}
    assert load(tmp_path / "run" / "q" / "model.pt").provenance["parents"] == [str(tmp_path / "run" / "thin" / "model.pt")]
    page = (tmp_path / "run" / "report.html").read_text()
    assert all(name in page for name in ("base", "thin", "q", "compress prune"))  # the table and the commands
    assert "models compared in the step" in page and "original" in page  # each step's own comparison
    sources = re.findall(r"""src=['"]([^'"]*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert "http" not in page and "<link" not in page
    assert (tmp_path / "run" / "report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"][1]["name"] == "thin"


def test_crash_resumes_skipping_finished_steps_with_the_same_result(tmp_path, monkeypatch):
    path = three_steps(tmp_path)
    clean = run_recipe(path, tmp_path / "clean", report=False)
    import prune.pipeline

    real = prune.pipeline.run

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in step 2")

    monkeypatch.setattr(prune.pipeline, "run", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(path, tmp_path / "run", report=False)
    first = (tmp_path / "run" / "base" / "model.pt").stat().st_mtime_ns
    assert not (tmp_path / "run" / "thin" / "done.json").exists()
    monkeypatch.setattr(prune.pipeline, "run", real)
    resumed = run_recipe(path, tmp_path / "run", report=False)
    assert [s.status for s in resumed.steps] == ["cached", "resumed", "ran"]  # the crashed step continues
    assert (tmp_path / "run" / "base" / "model.pt").stat().st_mtime_ns == first  # not re-run
    assert same_weights(tmp_path / "run" / "q" / "model.pt", tmp_path / "clean" / "q" / "model.pt")
    assert [r.score for r in resumed.rows] == [r.score for r in clean.rows]


def test_a_changed_setting_reruns_from_that_step(tmp_path):
    path = three_steps(tmp_path)
    run_recipe(path, tmp_path / "run", report=False)
    again = run_recipe(path, tmp_path / "run", report=False)
    assert [s.status for s in again.steps] == ["cached", "cached", "cached"]
    changed = run_recipe(path, tmp_path / "run", ["thin.ratio=0.25"], report=False)
    assert [s.status for s in changed.steps] == ["cached", "ran", "ran"]
    assert changed.rows[1].params > again.rows[1].params  # less was removed


@pytest.mark.slow
def test_kill_during_training_resumes_from_the_last_epoch(tmp_path):
    """kill -9 in the middle of a step: started again, the step continues from its resume file and ends
    with the weights of an uninterrupted run."""
    path = recipe(tmp_path, [{"name": "base", "kind": "train", **TINY, "epochs": 12, "subset": "fraction=0.25"}])
    run_recipe(path, tmp_path / "clean", report=False)
    # the killed run computes with as many threads as the clean one here: float sums differ across thread counts
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(path), "--out-dir", str(tmp_path / "run")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "base" / "model.pt.resume.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the step never wrote a resume file"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "base" / "done.json").exists()
    summary = run_recipe(path, tmp_path / "run", report=False)
    assert summary.steps[0].status == "resumed" and not state.exists()
    assert same_weights(tmp_path / "run" / "base" / "model.pt", tmp_path / "clean" / "base" / "model.pt")


@pytest.mark.parametrize("edit,message", [
    ({"kind": "squash"}, "step 'thin': unknown step kind 'squash'"),
    ({"ratios": 0.5}, "step 'thin': unknown key 'ratios'"),
    ({"ratio": "half"}, "step 'thin': key 'ratio' has the wrong type"),
    ({"from": "nowhere"}, "step 'thin': key 'from' names 'nowhere'"),
    ({"method": "shrink"}, "step 'thin': unknown pruning method 'shrink'"),
])
def test_recipe_errors_are_refused_before_any_work(tmp_path, capsys, edit, message):
    steps = [{"name": "base", "kind": "train", **TINY, "epochs": 1},
             {"name": "thin", "kind": "prune", "ratio": 0.5, **edit}]
    path = recipe(tmp_path, steps)
    assert main(["run", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing ran


def test_set_overrides_are_validated_like_the_recipe(tmp_path):
    path = three_steps(tmp_path)
    with pytest.raises(ValueError, match="step 'q': unknown key 'bitz'"):
        load_recipe(path, overrides=["q.bitz=w4a4"])
    with pytest.raises(ValueError, match="names step 'nope'"):
        load_recipe(path, overrides=["nope.epochs=3"])
    plan = load_recipe(path, overrides=["q.bits=w6a6"])
    assert plan.steps[-1].config.w_bits == 6


def test_cli_run_and_shipped_recipes_validate(tmp_path):
    assert main(["run", str(three_steps(tmp_path, epochs=1)), "--out-dir", str(tmp_path / "run"), "--json",
                 str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert [row["name"] for row in r["rows"]] == ["base", "thin", "q"]
    assert r["steps"][1]["command"].startswith("compress prune ")
    for shipped in ("demo", "chain-vit-to-mobile", "chain-cnn"):
        plan = load_recipe(ROOT / "recipes" / f"{shipped}.yaml")
        assert plan.steps[0].step.kind == "train" and plan.steps[-1].step.kind == "quantize"
    split = load_recipe(ROOT / "recipes" / "fuse-split.yaml").steps
    assert [s.config.subset for s in split] == ["classes=0-4,others=0.1", "classes=5-9,others=0.1", "fraction=0.1"]
    assert split[-1].sources == ["vit-0to4", "vit-5to9"] and split[-1].config.baselines
    hybrid = load_recipe(ROOT / "recipes" / "hybrid-vit.yaml").steps
    assert hybrid[1].config.objective == "mim" and hybrid[2].config.method == "hybrid"
    assert hybrid[2].sources == ["supervised"] and hybrid[2].refs == {"mim_teacher": "mae"}
    (peers,) = load_recipe(ROOT / "recipes" / "collab-scenes.yaml").steps
    assert peers.config.method == "collab" and peers.sources == [] and peers.data == "digit-scenes"


@pytest.mark.slow
def test_a_second_checkpoint_names_an_earlier_step(tmp_path):
    """Hybrid's `mim-teacher` may name the step that trained the MIM teacher: it reads that step's output, and
    when that output changes the hybrid step re-runs; a name that is neither a step nor a file is refused."""
    vit = {"arch": "vit", "arch-args": "depth=2", "subset": "fraction=0.1"}
    steps = [{"name": "sup", "kind": "train", **vit, "epochs": 1},
             {"name": "mae", "kind": "train", **vit, "objective": "mim", "epochs": 1},
             {"name": "hyb", "kind": "distill", "from": "sup", "method": "hybrid", "mim-teacher": "mae",
              "student": "vit", "student-args": "depth=2", "subset": "fraction=0.1", "epochs": 1,
              "baselines": False}]
    path = recipe(tmp_path, steps)
    plan = load_recipe(path, tmp_path / "run")
    assert plan.steps[2].refs == {"mim_teacher": "mae"}
    first = run_recipe(path, tmp_path / "run", report=False)
    assert [s.status for s in first.steps] == ["ran"] * 3
    import yaml

    settings = yaml.safe_load((tmp_path / "run" / "hyb" / "settings.yaml").read_text())
    assert settings["settings"]["mim-teacher"] == str(tmp_path / "run" / "mae" / "model.pt")
    assert "--mim-teacher" in settings["command"]
    again = run_recipe(path, tmp_path / "run", report=False, overrides=["mae.seed=1"])
    assert [s.status for s in again.steps] == ["cached", "ran", "ran"]  # a new MIM teacher: hybrid again
    steps[2]["mim-teacher"] = "nowhere"
    with pytest.raises(ValueError, match="step 'hyb': key 'mim-teacher' names 'nowhere'"):
        load_recipe(recipe(tmp_path, steps, "bad.yaml"))


@pytest.mark.slow
def test_a_collab_peer_names_the_step_that_pretrained_it(tmp_path):
    """A collab peer (or student) may be an architecture, a file or an earlier step's output: `peer: mae` starts
    the ViT peer from the MAE that step trained; a name that is both a step and an architecture is refused."""
    part = {"subset": "fraction=0.1", "epochs": 1}
    steps = [{"name": "mae", "kind": "train", "arch": "vit", "arch-args": "depth=2", "objective": "mim", **part},
             {"name": "peers", "kind": "distill", "method": "collab", "student": "resnet",
              "student-args": SLIM_RESNET_ARGS, "peer": "mae", "baselines": False, **part}]
    path = recipe(tmp_path, steps)
    plan = load_recipe(path, tmp_path / "run")
    assert plan.steps[1].refs == {"peer": "mae"}  # the student, an architecture, names no step
    done = run_recipe(path, tmp_path / "run", report=False)
    assert [s.status for s in done.steps] == ["ran", "ran"]
    mae = str(tmp_path / "run" / "mae" / "model.pt")
    peer = load(tmp_path / "run" / "peers" / "model.peer.pt")
    assert peer.arch == "vit" and peer.provenance["parents"] == [mae]
    steps[0]["name"], steps[1]["peer"] = "vit", "vit"
    with pytest.raises(ValueError, match="key 'peer' names 'vit', both an earlier step and an architecture"):
        load_recipe(recipe(tmp_path, steps, "bad.yaml"))


def test_a_deployed_onnx_program_is_timed_beside_its_own_float_onnx_model(tmp_path):
    """The end-of-run table times an ONNX int8 program beside the float ONNX model its step wrote, on the same
    runtime; before, the step's input checkpoint was timed eager under the label "fp32 program, onnxruntime"."""
    path = recipe(tmp_path, [{"name": "base", "kind": "train", **TINY, "epochs": 1},
                             {"name": "q", "kind": "quantize", "method": "minmax", "calib": 16,
                              "deploy": "model.int8.onnx"}])
    summary = run_recipe(path, tmp_path / "run")
    rows = {r.name: r for r in summary.rows}
    program, fp32 = rows["q int8 program"], rows["q fp32 program"]
    assert program.runtime == fp32.runtime == "onnxruntime" and fp32.latency_ms > 0
    assert fp32.size_bytes == (tmp_path / "run" / "q" / "model.int8.fp32.onnx").stat().st_size
