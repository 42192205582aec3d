"""The linear probe: planted signal vs shuffled labels, sgd vs lbfgs on a real store, the held-out
selection, determinism, the ledger, and `probe linear` through typer's runner."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.extract.run import run as extract_run
from diffprobe.probe.cli import probe_app
from diffprobe.probe.ledger import COLUMNS, LedgerError, append_row, read_rows
from diffprobe.probe.linear import linear_probe
from diffprobe.probe.protocol import holdout_mask
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import small_config

runner = CliRunner()
K, C, P = 10, 16, 2  # classes, channels, pool: 64 features per image


def _planted(n: int, seed: int, strength: float = 8.0):
    """Gaussian features plus a class mean of norm ``strength`` (the same means for every split)."""
    means = np.random.default_rng(0).normal(size=(K, C * P * P))
    means *= strength / np.linalg.norm(means, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = rng.normal(size=(n, C * P * P)) + means[y]
    return x.reshape(n, C, P, P).astype(np.float16), y


def write_store(path, train, val, *, class_names=None, skipped_train=(), skipped_val=(), block=24, t=90, chunk=64):
    """A store of one feature array (t, block, pool 2), through `write_synthetic_store`."""
    key = FeatureKey(t, block, P)
    data = {"train": train, "val": val}
    return write_synthetic_store(
        path,
        {name: {key: x} for name, (x, _) in data.items()},
        {name: y for name, (_, y) in data.items()},
        class_names=[str(c) for c in range(K)] if class_names is None else class_names,
        ids={name: [f"{name}/{i:05d}" for i in range(len(y))] for name, (_, y) in data.items()},
        skipped={"train": skipped_train, "val": skipped_val},
        chunk_images=chunk,
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("planted") / "s.zarr", _planted(400, 1), _planted(200, 2))


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    x, y = _planted(400, 1)
    y = np.random.default_rng(7).permutation(y)  # train labels carry nothing; val keeps the true ones
    return write_store(tmp_path_factory.mktemp("shuffled") / "s.zarr", (x, y), _planted(200, 2))


@pytest.mark.parametrize("recipe", ["sgd", "lbfgs"])
def test_planted_signal_is_found_and_shuffled_labels_give_chance(planted, shuffled, recipe):
    r = linear_probe(open_store(planted), 24, 90, 2, recipe=recipe)
    assert r["top1"] >= 0.97 and r["top5"] == 1.0 and r["heldout_top1"] >= 0.95
    assert r["n_train"] + r["n_heldout"] == 400 and r["n_val"] == 200 and r["dim"] == C * P * P
    assert set(r["per_class"]) == {str(c) for c in range(K)} and min(r["per_class"].values()) >= 0.85
    r = linear_probe(open_store(shuffled), 24, 90, 2, recipe=recipe)
    assert r["top1"] < 1 / K + 0.1 and r["top5"] < 5 / K + 0.15  # chance: 0.1 and 0.5


def test_same_seed_same_result_and_grid_heads_equal_lone_heads(planted):
    s = open_store(planted)
    a, b = (linear_probe(s, 24, 90, 2, recipe="sgd", seed=3) for _ in range(2))
    drop = ("timestamp", "seconds")
    assert {k: v for k, v in a.to_json().items() if k not in drop} == {
        k: v for k, v in b.to_json().items() if k not in drop
    }
    alone = linear_probe(s, 24, 90, 2, recipe="sgd", seed=3, settings=dataclasses.replace(ProbeConfig(), sgd_lr=(0.1,)))
    in_grid = next(g for g in a["grid"] if g["lr"] == 0.1)
    assert alone["grid"][0]["heldout_loss"] == pytest.approx(in_grid["heldout_loss"], rel=1e-4)


def test_holdout_is_stratified_reproducible_order_free_and_disjoint_from_val(planted):
    s = open_store(planted)
    ids, y = s.ids("train"), s.labels("train")
    m = holdout_mask(ids, y, 0.1, seed=0)
    assert m.sum() == 40 and all(m[y == c].sum() == 4 for c in range(K))
    assert (holdout_mask(ids, y, 0.1, seed=0) == m).all() and (holdout_mask(ids, y, 0.1, seed=1) != m).any()
    perm = np.random.default_rng(0).permutation(len(ids))
    assert set(ids[perm][holdout_mask(ids[perm], y[perm], 0.1, seed=0)]) == set(ids[m])
    assert not set(ids[m]) & set(s.ids("val"))
    # a class of one image keeps it for fitting; a class of two gives one
    assert holdout_mask(["a", "b", "c"], [0, 1, 1], 0.1, 0).tolist().count(True) == 1


def test_sgd_and_lbfgs_agree_on_the_embedded_default(tmp_path):
    # the embedded default's own block 24, t 90, pool 2 features (every digit; per-(image, t)
    # noise makes them the same bits as in the full default store), extracted alone: ~10 s
    cfg = small_config(
        tmp_path,
        **{
            "data.max_per_class": 0,
            "extract.blocks": "24",
            "extract.timesteps": [90],
            "extract.pools": [2],
            "extract.forward_batch": 32,
            "extract.batch_size": 64,
            "store.chunk_images": 512,
        },
    )
    extract_run(cfg)
    s = open_store(cfg.store.path)
    sgd, lbfgs = (linear_probe(s, 24, 90, 2, recipe=r) for r in ("sgd", "lbfgs"))
    assert sgd["n_train"] + sgd["n_heldout"] == 1437 and sgd["n_val"] == lbfgs["n_val"] == 360
    assert sgd["top1"] > 0.9 and lbfgs["top1"] > 0.9
    assert abs(sgd["top1"] - lbfgs["top1"]) <= 0.03, (sgd["top1"], lbfgs["top1"])


def test_cli_json_table_and_ledger(planted):
    r = runner.invoke(
        probe_app,
        ["linear", "--block", "24", "--t", "90", "--store", str(planted), "--recipe", "lbfgs", "--seed", "1", "--json"],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # exactly one JSON object
    assert {out[k] for k in ("block", "t", "pool", "recipe")} == {24, 90, 2, "lbfgs"}
    assert 0.97 <= out["top1"] <= out["top5"] <= 1 and set(out["hyperparameters"]) == {"l2"}
    r = runner.invoke(probe_app, ["linear", "--block", "24", "--t", "90", "--pool", "4", "--store", str(planted)])
    assert r.exit_code == 0, r.output
    assert "val top-1" in r.stdout and "stored at pool 2" in r.stdout and "per class" in r.stdout
    rows = read_rows(planted.parent / "probe-results.csv")
    assert [(row["recipe"], row["seed"], row["pool"], row["stored_pool"]) for row in rows] == [
        ("lbfgs", 1, 2, 2),
        ("sgd", 0, 4, 2),
    ]
    assert rows[0]["top1"] == pytest.approx(out["top1"]) and rows[0]["n_val"] == 200
    assert rows[0]["fingerprint"] == out["fingerprint"] and len(rows[0]["fingerprint"]) == 16
    assert rows[0]["hyperparameters"] == out["hyperparameters"] and len(rows[0]["per_class"]) == K


def test_a_foreign_csv_is_not_extended(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(LedgerError, match="not a diffprobe ledger"):
        append_row(p, dict.fromkeys(COLUMNS, 0))
    assert p.read_text() == "a,b\n1,2\n"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broken")
    x, y = _planted(40, 1)
    return {
        "empty": write_store(tmp / "empty.zarr", (x, y), (x, y), skipped_val=range(40)),
        "unlabelled": write_store(tmp / "unlabelled.zarr", (x, np.full(40, -1)), (x, np.full(40, -1)), class_names=[]),
    }


@pytest.mark.parametrize(
    "args,message",
    [
        (["--store", "/nonexistent/x.zarr"], "no diffprobe store here"),
        (
            ["--block", "19"],
            "no features for block 19, t 90, pool 2 in split 'train'; it holds block 24 at t 90, pool 2",
        ),
        (["--t", "150"], "no features for block 24, t 150, pool 2"),
        (["--block", "0"], "--block: 0 is not a block of this store; its model has blocks 1-37"),
        (["--block", "99"], "--block: 99 is not a block of this store; its model has blocks 1-37"),
        (["--recipe", "adam"], "probe.recipe: 'adam' is not allowed; allowed: 'sgd', 'lbfgs'"),
        (["--store", "empty"], "split 'val' is empty (40 images, all skipped)"),
        (["--store", "unlabelled"], "split 'train' has no labels"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(planted, broken, args, message):
    args = [broken.get(a, a) if i and args[i - 1] == "--store" else a for i, a in enumerate(args)]
    base = {"--block": "24", "--t": "90", "--store": str(planted)}
    base.update(zip(args[::2], map(str, args[1::2])))
    r = runner.invoke(probe_app, ["linear", *[v for kv in base.items() for v in kv]])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_all_finite_matches_numpy_on_every_float16():
    from diffprobe.store.finite import all_finite

    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65536 bit patterns
    finite = np.isfinite(every)
    assert not all_finite(every) and all_finite(every[finite]) and finite.sum() == 2**16 - 2 * 1024
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((5000, 3), np.float16)
        x[4321, 2] = bad
        assert not all_finite(x) and all_finite(x[:4321])
    assert all_finite(np.float16([65504, -65504, 6e-8])) and not all_finite(np.float32([1, np.nan]))
