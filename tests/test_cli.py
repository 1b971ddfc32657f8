"""The command line, as a user runs it: results, --json, recipes, and one-line errors."""

import json

import pytest

from cli import main
from compress import Checkpoint, save


def test_models_lists_every_alias(tmp_path):
    assert main(["models", "--json", str(tmp_path / "m.json")]) == 0
    names = {m["name"] for m in json.loads((tmp_path / "m.json").read_text())["models"]}
    assert {"vit", "deit", "swin", "resnet", "convnext", "mobilevit", "mobilevitv2", "efficientformer",
            "efficientformerv2", "mixer", "resmlp"} <= names


def test_train_eval_inspect_with_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("arch: resnet\narch-args: drop_rate=0.0\nepochs: 50\nbatch-size: 64\n")
    out = tmp_path / "m.safetensors"
    assert main(["train", "--recipe", str(recipe), "--epochs", "2", "--out", str(out),
                 "--json", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["epochs"] == 2 and t["top1"] > 50  # flag beat the recipe; the model learned
    assert "epochs: 2" in (tmp_path / "m.safetensors.yaml").read_text()  # resolved settings saved
    assert main(["eval", str(out), "--data", "digits", "--latency-runs", "3", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert abs(e["top1"] - t["top1"]) < 1e-6
    assert e["params"] > 0 and e["macs"] > 0 and e["size_bytes"] == out.stat().st_size and e["latency_ms"] > 0
    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    i = json.loads((tmp_path / "i.json").read_text())
    assert i["arch"] == "resnet" and i["spaces"] and {b["kind"] for b in i["blocks"]} == {"conv"}
    assert i["provenance"]["command"].startswith("compress train")


def test_arch_args_and_custom_builder(tmp_path):
    out = tmp_path / "c.pt"
    assert main(["train", "--arch", "tests.tiny_arch:tiny_cnn", "--arch-args", "width=8", "--epochs", "1",
                 "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "--arch", "mobilevitt", "--out", "x.pt"], "unknown architecture 'mobilevitt'"),
    (["train", "--arch", "vit", "--data", "/no/such/folder", "--out", "x.pt"], "does not exist"),
    (["eval", "/no/such.pt"], "not found"),
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
    assert "unknown recipe key 'epoch'" in err and "epochs" in err


def test_output_equal_to_input_is_refused_and_input_kept(tmp_path, capsys):
    path = save(Checkpoint.create("resmlp", seed=0), tmp_path / "m.pt")
    before = path.read_bytes()
    assert main(["train", "--init", str(path), "--epochs", "1", "--out", str(path)]) == 2
    assert main(["eval", str(path), "--json", str(path)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--vit-epochs", "1", "--cnn-epochs", "1", "--json",
                 str(tmp_path / "d.json")]) == 0
    models = json.loads((tmp_path / "d.json").read_text())["models"]
    assert [m["arch"] for m in models] == ["vit", "resnet"]
    assert all(m["params"] > 0 and m["latency_ms"] > 0 and 0 <= m["top1"] <= 100 for m in models)
    assert (out / "vit-digits.pt").exists() and (out / "resnet-digits.pt").exists()
