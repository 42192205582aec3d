"""`probe sweep` and label fractions: resume skips done cells, plots, class-balanced seeded subsets
disjoint from the held-out part, shots and id files, and the one-line errors."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.probe import linear as lin
from diffprobe.probe import protocol
from diffprobe.probe import sweep as sw
from diffprobe.probe.cli import probe_app
from diffprobe.probe.ledger import read_rows
from diffprobe.probe.subsets import SubsetError, choose_subset, subset_spec
from diffprobe.store.config import ProbeConfig
from diffprobe.store.errors import ConfigError, StoreError
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

runner = CliRunner()
K, C = 10, 8
BLOCKS, TS, POOLS = (23, 24), (90, 150), (1, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(n, seed, key, strength):
    d = C * key.pool * key.pool
    means = np.random.default_rng(key.block * 1000 + key.t).normal(size=(K, d))
    means *= strength / np.linalg.norm(means, axis=1, keepdims=True)
    y = np.arange(n) % K
    x = np.random.default_rng(seed).normal(size=(n, d)) + means[y]
    return x.reshape(n, C, key.pool, key.pool).astype(np.float16), y


def write_grid_store(path, n_train=300, n_val=100, keys=None, val_keys=None):
    """A store of several (t, block, pool) arrays with a planted signal whose strength varies by cell."""
    keys = keys or [FeatureKey(t, b, p) for b in BLOCKS for t in TS for p in POOLS]
    val_keys = keys if val_keys is None else val_keys
    blocks = [{"number": b, "module": f"m{b}", "channels": C, "spatial": 2} for b in range(1, 38)]
    y_tr, y_val = np.arange(n_train) % K, np.arange(n_val) % K
    strength = lambda k: 1.5 + (k.block - 23) + k.t / 150
    write_synthetic_store(
        path,
        {
            "train": {k: _features(n_train, 1, k, strength(k))[0] for k in keys},
            "val": {k: _features(n_val, 2, k, strength(k))[0] for k in val_keys},
        },
        {"train": y_tr, "val": y_val},
        class_names=[f"c{c}" for c in range(K)],
        ids={"train": [f"train/{i:05d}" for i in range(n_train)], "val": [f"val/{i:05d}" for i in range(n_val)]},
        blocks=blocks,
        chunk_images=512,
    )
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return write_grid_store(tmp_path_factory.mktemp("grid") / "s.zarr")


def _sweep(store, ledger, *args):
    r = runner.invoke(probe_app, ["sweep", "--store", str(store), "--ledger", str(ledger), "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _count_probes(monkeypatch):
    calls = []  # one (block, t, pool) per cell trained
    real = lin.linear_probes

    def counting(store, cells, *a, **kw):
        calls.extend(cells)
        return real(store, cells, *a, **kw)

    monkeypatch.setattr(lin, "linear_probes", counting)
    return calls


def test_sweep_trains_every_cell_once_resumes_and_plots(grid, tmp_path, monkeypatch):
    calls = _count_probes(monkeypatch)
    ledger = tmp_path / "ledger.csv"
    first = _sweep(grid, ledger)
    assert first["trained"] == len(first["cells"]) == len(calls) == 8 and first["skipped"] == 0
    assert {(c["block"], c["t"], c["pool"]) for c in first["cells"]} == {
        (b, t, p) for b in BLOCKS for t in TS for p in POOLS
    }
    best = first["best"]
    assert (best["block"], best["t"]) == (24, 150) and best["top1"] > 0.5  # the strongest planted signal
    assert len(first["plots"]["files"]) == 6  # heatmap, vs t, vs block, per pool
    for f in first["plots"]["files"]:
        data = open(f, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    calls.clear()
    second = _sweep(grid, ledger)
    assert second["trained"] == 0 and second["skipped"] == 8 and calls == []
    assert [c["top1"] for c in second["cells"]] == [c["top1"] for c in first["cells"]]
    assert second["plots"]["files"] == first["plots"]["files"]
    assert len(read_rows(ledger)) == 8

    # another seed or other training settings are other cells; a sub-grid of done cells trains nothing
    assert _sweep(grid, ledger, "--blocks", "24", "--t", "90", "--pool", "2", "--seed", "1")["trained"] == 1
    assert _sweep(grid, ledger, "--blocks", "23,24", "--t", "150")["trained"] == 0
    store = open_store(grid)
    cells, _ = sw.plan(store, blocks=[24], ts=[90], pools=[2])
    other = ProbeConfig(sgd_epochs=3)
    assert sw.sweep(store, cells, settings=other, ledger=ledger)["trained"] == 1
    assert sw.sweep(store, cells, settings=other, ledger=ledger)["trained"] == 0
    assert len(read_rows(ledger)) == 10 and len(calls) == 2


def test_sweep_table_output_names_the_plots(grid, tmp_path):
    r = runner.invoke(
        probe_app,
        [
            "sweep",
            "--store",
            str(grid),
            "--ledger",
            str(tmp_path / "l.csv"),
            "--blocks",
            "24",
            "--t",
            "90",
            "--pool",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "plots:" in r.stdout and "heatmap-pool2.png" in r.stdout and "best val top-1" in r.stdout


def test_plan_capped_pools_and_ragged_stores(tmp_path):
    # block 24's map is 2x2 here; pool 4 is the pool-2 array: one cell, not two
    store = open_store(
        write_grid_store(
            tmp_path / "g.zarr",
            n_train=40,
            n_val=20,
            keys=[FeatureKey(90, 24, 2), FeatureKey(150, 24, 2), FeatureKey(90, 23, 2)],
            val_keys=[FeatureKey(90, 24, 2), FeatureKey(90, 23, 2)],
        )
    )
    cells, grid = sw.plan(store, pools=[2, 4])
    assert cells == [FeatureKey(90, 23, 2), FeatureKey(90, 24, 2)] and len(grid) == 4
    # by default, t 150 (train only) is not a cell; asked for, it is an error naming the holdings
    assert sw.plan(store)[0] == cells
    with pytest.raises(StoreError, match=r"no complete features for block 24, t 150, pool 2 in val; it holds"):
        sw.plan(store, blocks=[24], ts=[150], pools=[2])
    holds = "block 23 at t 90, pool 2; block 24 at t 90,150, pool 2"
    with pytest.raises(StoreError, match=rf"no complete features for t 150 in train and val; it holds {holds}"):
        sw.plan(store, ts=[150])
    # block 23 lacks t 150 (in val too): a block left to its default only combines with what is held
    store = open_store(
        write_grid_store(
            tmp_path / "h.zarr",
            n_train=40,
            n_val=20,
            keys=[FeatureKey(90, 24, 2), FeatureKey(150, 24, 2), FeatureKey(90, 23, 2)],
        )
    )
    assert sw.plan(store, ts=[150])[0] == [FeatureKey(150, 24, 2)]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--blocks", "19"],
            "no complete features for block 19 in train and val; it holds blocks 23-24 at t 90,150, pools 1-2",
        ),
        (
            ["--blocks", "24", "--t", "91", "--pool", "2"],
            "no complete features for block 24, t 91, pool 2 in train and val",
        ),
        (["--t", "91"], "no complete features for t 91 in train and val"),
        (["--blocks", "40"], "--blocks: 40 is not a block of this store; its model has blocks 1-37"),
        (["--blocks", "x"], "--blocks: cannot read 'x'"),
        (["--shots", "100"], "--shots 100: class 'c0' has only 27 train images to fit on"),
        (["--label-fraction", "1.5"], "--label-fraction: 1.5 is out of range"),
        (["--shots", "2", "--label-fraction", "0.1"], "--label-fraction and --shots: give at most one"),
        (["--subset", "/nonexistent/ids.txt"], "--subset: no such file"),
        (["--recipe", "adam"], "probe.recipe: 'adam' is not allowed"),
    ],
)
def test_sweep_errors_are_one_line_and_exit_2(grid, tmp_path, args, message):
    r = runner.invoke(probe_app, ["sweep", "--store", str(grid), "--ledger", str(tmp_path / "l.csv"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "l.csv").exists()


# ------------------------------------------------------------------ label subsets


def test_label_fraction_is_balanced_reproducible_seeded_and_disjoint_from_heldout(grid):
    store = open_store(grid)
    ids, y = store.ids("train"), store.labels("train")  # 30 per class
    sel = protocol.select(store, seed=0, subset="fraction:0.1")
    held = set(ids[sel.hold])
    assert len(sel.hold) == 30 and [int((y[sel.fit] == c).sum()) for c in range(K)] == [3] * K  # round(0.1*27)
    assert not held & set(sel.fit_ids)
    again = protocol.select(store, seed=0, subset="fraction:0.1")
    assert sel.subset_sha == again.subset_sha and (sel.fit == again.fit).all()
    other = protocol.select(store, seed=1, subset="fraction:0.1")
    assert set(other.fit_ids) != set(sel.fit_ids) and not set(ids[other.hold]) & set(other.fit_ids)
    # a fraction too small for a class still gives it one image; order-free like holdout_mask
    tiny = protocol.select(store, seed=0, subset="fraction:0.001")
    assert [int((y[tiny.fit] == c).sum()) for c in range(K)] == [1] * K
    perm = np.random.default_rng(0).permutation(len(ids))
    eligible = ~protocol.holdout_mask(ids, y, 0.1, 0)
    m = choose_subset("fraction:0.1", ids[perm], y[perm], eligible[perm], 0, store.class_names)
    assert set(ids[perm][m]) == set(sel.fit_ids)
    # "all" is the whole fitted part
    assert len(protocol.select(store, seed=0).fit) == 270


def test_shots_and_their_errors():
    ids = np.array([f"i{n}" for n in range(12)])
    y = np.array([0] * 5 + [1] * 5 + [2] * 2)
    names = ["cat", "dog", "eel"]
    m = choose_subset("shots:2", ids, y, np.ones(12, bool), 0, names)
    assert [int(m[y == c].sum()) for c in range(3)] == [2, 2, 2]
    with pytest.raises(SubsetError, match="--shots 3: class 'eel' has only 2 train images"):
        choose_subset("shots:3", ids, y, np.ones(12, bool), 0, names)
    with pytest.raises(SubsetError, match="--label-fraction 0.5: class 'eel' has no train images left"):
        choose_subset("fraction:0.5", ids, y, y != 2, 0, names)
    with pytest.raises(ConfigError, match="--shots: 0 is out of range"):
        subset_spec(shots=0)


def test_subset_file_and_label_fraction_through_probe_linear(grid, tmp_path):
    store = open_store(grid)
    ids = store.ids("train")
    held = set(ids[protocol.select(store, seed=0).hold])
    listed = [i for i in ids[:60] if i not in held][:40] + [next(iter(held))]  # a held-out id is left out
    f = tmp_path / "ids.txt"
    f.write_text(
        "# my subset\n" + "\n".join(i.rsplit("/", 1)[-1] if n % 2 else i for n, i in enumerate(listed)) + "\n\n"
    )
    ledger = tmp_path / "ledger.csv"
    base = ["linear", "--block", "24", "--t", "150", "--store", str(grid), "--ledger", str(ledger), "--json"]
    r = runner.invoke(probe_app, [*base, "--subset", str(f)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_train"] == 40 and out["subset"] == f"file:{f}"
    saved = open(out["subset_file"]).read().split()
    assert saved == sorted(listed[:40]) and out["subset_file"].endswith(f"subsets/{out['subset_sha']}.txt")

    r = runner.invoke(probe_app, [*base, "--label-fraction", "0.1"])
    assert r.exit_code == 0, r.output
    frac = json.loads(r.stdout)
    assert frac["n_train"] == 30 and frac["subset"] == "fraction:0.1"
    rows = read_rows(ledger)
    assert [(row["subset"], row["subset_sha"], row["n_train"]) for row in rows] == [
        (out["subset"], out["subset_sha"], 40),
        ("fraction:0.1", frac["subset_sha"], 30),
    ]

    # the ids saved reproduce the run: the same head, top-1 and sha
    r = runner.invoke(probe_app, [*base, "--subset", frac["subset_file"]])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["subset_sha"] == frac["subset_sha"] and again["top1"] == frac["top1"]

    f.write_text("train/00001\nnot-an-image\nalso-not\n")
    r = runner.invoke(probe_app, [*base, "--subset", str(f)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert f"id 'not-an-image' in {f} is not one of the 300 train image ids" in r.output


def test_many_feature_sets_in_one_pass_equal_each_trained_alone(grid):
    store = open_store(grid)
    cells = [(b, t, p) for b in BLOCKS for t in TS for p in POOLS]
    keys = [store.stored_key(*c) for c in cells]
    p = ProbeConfig(sgd_epochs=6)
    # same width (pool 1: 8 features, pool 2: 32) and within the budget: one pass per width
    assert lin.passes(store, keys, "sgd", p, 300) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lin.passes(store, keys, "lbfgs", p, 300) == [[i] for i in range(8)]
    # two pool-2 float16 train splits (fit + held-out: 300 rows)
    small = ProbeConfig(sgd_epochs=6, memory_mb=2 * 300 * 32 * 2 / 2**20)
    assert lin.passes(store, keys, "sgd", small, 300) == [[0, 2, 4, 6], [1, 3], [5, 7]]

    seen = []
    together = lin.linear_probes(store, cells, settings=p, seed=5, on_result=seen.append)
    assert [(r["block"], r["t"], r["pool"]) for r in together] == cells and len(seen) == 8
    for cell, r in zip(cells, together):
        alone = lin.linear_probe(store, *cell, settings=p, seed=5)
        assert r["top1"] == alone["top1"] and r["top5"] == alone["top5"], cell
        assert r["hyperparameters"] == alone["hyperparameters"] and r["per_class"] == alone["per_class"]
        for a, b in zip(r["grid"], alone["grid"]):
            assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-5, abs=1e-7)
    assert [r["top1"] for r in lin.linear_probes(store, cells, settings=small, seed=5)] == [r["top1"] for r in together]
