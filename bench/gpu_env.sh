# Set up a bare GPU machine that has torch but not this package (bench/gpu_check.py, tests/test_device.py):
# carried wheels (timm) into /tmp/site, and the package's entry points declared there, read from
# pyproject.toml, so the code runs from the checkout without an install.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 - <<'PY'
import pathlib, tomllib
meta = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/site/compress_checkout-0.dist-info")
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: compress-checkout\nVersion: 0\n")
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in meta["entry-points"].items()))
PY
export PYTHONPATH=/tmp/site:$PWD
set +e
