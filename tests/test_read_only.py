"""A store in a read-only place stays readable: `extract status`, probes with --ledger
elsewhere, `analyze cka --out`; what would write beside it is refused before any work, in
one line naming the way out. (tests/places.py says how the folder is made read-only.)"""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.analyze.cli import analyze_app
from diffprobe.extract.cli import app as extract_app
from diffprobe.probe.cli import probe_app
from diffprobe.store.feature_store import FeatureKey
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import small_config
from .places import read_only_folder

runner = CliRunner()


def _linked_ledger(folder, tmp_path_factory) -> None:
    """``folder/linked.csv``: an empty ledger that stays writable when ``folder`` is made read-only
    (a symlink to a file elsewhere, so that it holds on a read-only bind mount too): the ledger
    check passes and the pictures beside it cannot be written."""
    target = tmp_path_factory.mktemp("rw") / "ledger.csv"
    target.write_text("")
    (folder / "linked.csv").symlink_to(target)


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
    _linked_ledger(folder, tmp_path_factory)
    with read_only_folder(folder):
        yield path


@pytest.fixture(scope="module")
def ro_dense(tmp_path_factory, one_torch_thread):
    """A small store with masks (block 24 at t 150, pool 2) in a read-only folder; its config."""
    from diffprobe.extract.run import run as extract_run

    folder = tmp_path_factory.mktemp("ro-dense")
    overrides = {"data.masks": True, "extract.blocks": "24", "extract.timesteps": [150], "extract.pools": [2]}
    cfg = small_config(folder, **overrides)
    extract_run(cfg)
    _linked_ledger(folder, tmp_path_factory)
    with read_only_folder(folder):
        yield cfg


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


def _refused_before_training(r, ledger) -> None:
    """One line naming the picture folder and the way out, exit 2, and no ledger row written."""
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "cannot write there" in r.stderr and "pass --out DIR (or --no-plots)" in r.stderr
    assert "Traceback" not in r.output and ledger.read_text() == ""


def test_probe_sweep_on_a_read_only_store_writes_its_plots_to_out(ro_store, tmp_path):
    ledger = ro_store.parent / "linked.csv"
    args = ["sweep", "--store", str(ro_store), "--recipe", "lbfgs", "--ledger", str(ledger)]
    r = runner.invoke(probe_app, args)
    _refused_before_training(r, ledger)
    assert f"{ro_store.parent}/sweep-" in r.stderr
    r = runner.invoke(probe_app, [*args, "--head", "knn", "--k", "5"])
    _refused_before_training(r, ledger)
    plots = tmp_path / "plots"
    r = runner.invoke(probe_app, [*args, "--out", str(plots), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["plots"]["folder"] == str(plots) and res["trained"] == 2 and len(ledger.read_text().splitlines()) == 3
    assert sorted(p.name for p in plots.iterdir()) == sorted(Path(f).name for f in res["plots"]["files"])
    assert len(res["plots"]["files"]) == 3 and all(f.endswith(".png") for f in res["plots"]["files"])
    r = runner.invoke(probe_app, [*args, "--head", "knn", "--k", "5", "--out", str(tmp_path / "knn"), "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "knn" / "k5").iterdir())[0] == "heatmap-pool2.png"
    r = runner.invoke(probe_app, [*args, "--no-plots"])  # every cell in the ledger: nothing trains, no plots
    assert r.exit_code == 0 and "plots: none (--no-plots)" in r.stdout, r.output


def _dense_config(cfg, tmp_path, ledger, epochs: int) -> str:
    """The store and ledger of ``cfg`` with a short dense head (``epochs``: other settings, other rows)."""
    toml = tmp_path / "dense.toml"
    toml.write_text(
        f'[store]\npath = "{cfg.store.path}"\n[probe]\nledger = "{ledger}"\n'
        f"[segment]\nepochs = {epochs}\nexamples = 2\n"
    )
    return str(toml)


def test_probe_segment_on_a_read_only_store_writes_its_picture_to_out(ro_dense, tmp_path):
    ledger = Path(ro_dense.store.path).parent / "linked.csv"
    args = ["segment", "--config", _dense_config(ro_dense, tmp_path, ledger, 1), "--blocks", "24", "--t", "150"]
    _refused_before_training(runner.invoke(probe_app, args), ledger)
    r = runner.invoke(probe_app, [*args, "--out", str(tmp_path / "pics"), "--json"])
    assert r.exit_code == 0, r.output
    picture = json.loads(r.stdout)["picture"]
    assert picture.startswith(f"{tmp_path / 'pics'}/segment-") and [p.name for p in (tmp_path / "pics").iterdir()] == [
        picture.rsplit("/", 1)[1]
    ]
    assert len(ledger.read_text().splitlines()) == 2


def test_probe_sweep_head_segment_on_a_read_only_store_writes_its_heatmaps_to_out(ro_dense, tmp_path):
    ledger = Path(ro_dense.store.path).parent / "linked.csv"
    before = ledger.read_text()
    args = ["sweep", "--head", "segment", "--config", _dense_config(ro_dense, tmp_path, ledger, 2)]
    r = runner.invoke(probe_app, args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "pass --out DIR (or --no-plots)" in r.stderr
    assert ledger.read_text() == before  # refused before training: no row
    r = runner.invoke(probe_app, [*args, "--out", str(tmp_path / "maps"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["trained"] == 1 and res["plots"]["folder"] == str(tmp_path / "maps")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(Path(f).name for f in res["plots"]["files"])
    assert len(res["plots"]["files"]) == 3 and len(ledger.read_text().splitlines()) == len(before.splitlines()) + 1
