"""A store in a read-only place stays readable: `extract status`, probes with --ledger
elsewhere, `analyze cka --out`; what would write beside it is refused before any work, in
one line naming the way out. (tests/places.py says how the folder is made read-only.)"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.analyze.cli import analyze_app
from diffprobe.extract.cli import app as extract_app
from diffprobe.probe.cli import probe_app
from diffprobe.store.feature_store import FeatureKey
from diffprobe.store.synthetic import write_synthetic_store

from .places import read_only_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def ro_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ro")
    rng = np.random.default_rng(0)
    y = {"train": np.arange(60) % 3, "val": np.arange(30) % 3}
    feats = {
        s: {FeatureKey(90, b, 2): (rng.normal(size=(len(y[s]), 8, 2, 2)) + y[s][:, None, None, None]) for b in (19, 24)}
        for s in y
    }
    path = write_synthetic_store(folder / "store.zarr", feats, y, chunk_images=16)
    with read_only_folder(folder):
        yield path


def test_status_of_a_read_only_store(ro_store):
    r = runner.invoke(extract_app, ["status", "--store", str(ro_store), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["splits"]["train"]["complete_arrays"] == 2


def test_probe_linear_refuses_a_read_only_ledger_folder_before_training_and_takes_another(ro_store, tmp_path):
    args = ["linear", "--block", "24", "--t", "90", "--store", str(ro_store), "--recipe", "lbfgs"]
    r = runner.invoke(probe_app, args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "is read-only); pass --ledger PATH" in r.stderr and "Traceback" not in r.output
    ledger = tmp_path / "ledger.csv"
    r = runner.invoke(probe_app, [*args, "--ledger", str(ledger), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ledger"] == str(ledger) and ledger.is_file()


def test_analyze_cka_on_a_read_only_store(ro_store, tmp_path):
    r = runner.invoke(analyze_app, ["cka", "--t", "90", "--store", str(ro_store)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "pass --out DIR (or --no-plots)" in r.stderr
    out = tmp_path / "cka"
    r = runner.invoke(analyze_app, ["cka", "--t", "90", "--store", str(ro_store), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.suffix for p in out.iterdir()) == [".csv", ".png"]
    assert not list(out.glob("*.partial"))
    r = runner.invoke(analyze_app, ["cka", "--t", "90", "--store", str(ro_store), "--no-plots", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["files"] == [] and res["folder"] is None and len(res["matrix"]) == 2
