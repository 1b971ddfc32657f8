"""The command line, as a user runs it: results, --json, recipes, and one-line errors."""

import json
from pathlib import Path

import pytest

from cli import main
from compress import Checkpoint, load, save
from compress.measure import macs, param_count

from .helpers import SLIM_RESNET_ARGS

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_every_alias(tmp_path):
    assert main(["models", "--json", str(tmp_path / "m.json")]) == 0
    names = {m["name"] for m in json.loads((tmp_path / "m.json").read_text())["models"]}
    assert {"vit", "deit", "swin", "resnet", "convnext", "mobilevit", "mobilevitv2", "efficientformer",
            "efficientformerv2", "mixer", "resmlp", "pvt"} <= names


def test_train_eval_inspect_with_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"arch: resnet\narch-args: {SLIM_RESNET_ARGS}\nepochs: 50\nbatch-size: 64\n")
    out = tmp_path / "m.safetensors"
    assert main(["train", "--recipe", str(recipe), "--epochs", "2", "--out", str(out),
                 "--json", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["epochs"] == 2 and t["top1"] > 50  # flag beat the recipe; the model learned
    assert "epochs: 2" in (tmp_path / "m.safetensors.yaml").read_text()  # resolved settings saved
    assert main(["eval", str(out), "--data", "digits", "--latency-runs", "3", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert abs(e["top1"] - t["top1"]) < 1e-6
    model = load(out).build()
    assert e["params"] == param_count(model) and e["macs"] == macs(model, 32) and e["size_bytes"] == out.stat().st_size
    assert e["latency_ms_batch32"] > e["latency_ms"]  # 32 images cost more than one
    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    i = json.loads((tmp_path / "i.json").read_text())
    assert i["arch"] == "resnet" and i["spaces"] and {b["kind"] for b in i["blocks"]} == {"conv"}
    assert i["provenance"]["command"].startswith("compress train")


@pytest.mark.slow
def test_arch_args_and_custom_builder(tmp_path):
    out = tmp_path / "c.pt"
    assert main(["train", "--arch", "tests.tiny_arch:tiny_cnn", "--arch-args", "width=8", "--epochs", "1",
                 "--out", str(out)]) == 0
    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    i = json.loads((tmp_path / "i.json").read_text())
    assert i["arch"] == "tests.tiny_arch:tiny_cnn" and i["arch_args"] == {"width": 8}
    assert [s["channels"] for s in i["stages"]] == [8, 8] and i["params"] == param_count(load(out).build())


@pytest.mark.parametrize("argv,message", [
    (["train", "--arch", "mobilevitt", "--out", "x.pt"], "unknown architecture 'mobilevitt'"),
    (["train", "--arch", "vit", "--data", "/no/such/folder", "--out", "x.pt"], "does not exist"),
    (["eval", "/no/such.pt"], "not found"),
    (["quantize", "/no/such.pt", "--bits", "w8a8"], "quantize needs --out"),  # nothing to write: refused first
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "expected" in err


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("arch: vit\nepoch: 3\n")
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: unknown key 'epoch'" in err and "epochs" in err and len(err.strip().splitlines()) == 1


def test_output_equal_to_input_is_refused_and_input_kept(tmp_path, capsys):
    path = save(Checkpoint.create("resmlp", seed=0), tmp_path / "m.pt")
    before = path.read_bytes()
    assert main(["train", "--init", str(path), "--epochs", "1", "--out", str(path)]) == 2
    assert main(["eval", str(path), "--json", str(path)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.slow
def test_demo_is_the_shipped_chain(tmp_path):
    """`compress demo` is `compress run recipes/demo.yaml` (here shrunk with --set so the test is quick; the
    full demo is timed in docs/BENCHMARKS.md)."""
    shrink = ["vit-a.epochs=1", "vit-b.epochs=1", "fused.finetune-epochs=0", "student.epochs=1",
              *(f"{step}.subset=fraction=0.25" for step in ("vit-a", "vit-b", "student")),
              "pruned.finetune-epochs=0", "pruned.target-macs=0", "pruned.ratio=0.3", "pruned.calib=16",
              "quantized.method=minmax", "quantized.calib=8", "quantized.deploy=false"]
    argv = ["demo", "--out-dir", str(tmp_path / "demo"), "--json", str(tmp_path / "d.json")]
    assert main([*argv, *[x for item in shrink for x in ("--set", item)]]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert [s["name"] for s in d["steps"]] == ["vit-a", "vit-b", "fused", "student", "pruned", "quantized"]
    rows = {r["name"]: r for r in d["rows"]}
    assert rows["pruned"]["macs"] < rows["student"]["macs"] < rows["fused"]["macs"]
    assert (tmp_path / "demo" / "report.html").exists() and (tmp_path / "demo" / "report.md").exists()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, cli\n"
            "for argv in (['--help'], ['fuse', '--help'], ['distill', '--help'], ['run', '--help']):\n"
            "    try:\n        cli.build_parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_registered_criterion_is_a_cli_choice_at_once(tmp_path):
    """Registries feed the flags: a new importance criterion works from the command line unedited."""
    import torch

    from prune import CRITERIA

    @CRITERIA.register("reverse-index")
    def reverse_index(model, sg, spaces, x, y, batch_size=64):
        return {s.id: torch.arange(s.size, 0, -1, dtype=torch.float) for s in spaces}  # keeps the first units

    try:
        src = save(Checkpoint.create("vit", num_classes=10, seed=0), tmp_path / "v.pt")
        out = tmp_path / "p.pt"
        assert main(["prune", str(src), "--importance", "reverse-index", "--ratio", "0.5", "--calib", "8",
                     "--out", str(out)]) == 0
        kept = load(out).state_dict["blocks.0.mlp.fc1.weight"]
        assert torch.equal(kept, load(src).state_dict["blocks.0.mlp.fc1.weight"][:192])
    finally:
        CRITERIA._items.pop("reverse-index")


def test_inspect_an_architecture_reports_what_the_alignment_did_not_understand(tmp_path, capsys):
    """`compress inspect NAME` needs no checkpoint and says what fusion / pruning would leave alone."""
    js = tmp_path / "i.json"
    assert main(["inspect", "vit", "--json", str(js)]) == 0
    gaps = json.loads(js.read_text())["gaps"]
    assert gaps["unknown_ops"] == [] and gaps["stages_without_blocks"] == [] and gaps["coverage"] > 0.9
    assert 0 <= gaps["pinned_share"] < 0.1  # the patch embedding's input channels and the classifier rows
    out = capsys.readouterr().out
    assert "ops without a rule: none" in out and "stages where no block was found: none" in out


def test_durations_read_as_people_write_them():
    from compress.report import seconds

    assert [seconds(v) for v in (None, 3.14, 119.94, 120, 239.7, 3599.6)] == \
        ["-", "3.1 s", "119.9 s", "2 min 00 s", "4 min 00 s", "60 min 00 s"]
