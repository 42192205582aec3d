"""`probe knn`: equal to scikit-learn's KNeighborsClassifier on the same cached features (uniform
votes; cosine through normalised features, and l2), DINOv2's exp(sim / T) votes against a direct
implementation, streamed equal to in memory, label subsets, the ledger and --json, `probe sweep
--head knn`, and the one-line errors."""

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from typer.testing import CliRunner

from diffprobe.probe import knn as kn
from diffprobe.probe.cli import probe_app
from diffprobe.probe.data import FeatureData
from diffprobe.probe.ledger import COLUMNS, read_rows
from diffprobe.probe.protocol import select
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .test_probe_sweep import write_grid_store

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES, DIM = 6, 24
KS = (1, 5, 15)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(4)
    means = rng.normal(size=(CLASSES, DIM)) * 0.9 + 1.0  # off the origin: cosine and l2 disagree

    def split(n, seed):
        y = np.random.default_rng(seed).integers(0, CLASSES, n)
        x = means[y] + np.random.default_rng(seed + 1).normal(size=(n, DIM))
        return x.reshape(n, DIM, 1, 1).astype(np.float16), y

    (x_tr, y_tr), (x_val, y_val) = split(420, 10), split(150, 20)
    x_tr2 = x_tr + 0  # a second cell: block 19
    return write_synthetic_store(
        tmp_path_factory.mktemp("knn") / "s.zarr",
        {
            "train": {FeatureKey(90, 24, 1): x_tr, FeatureKey(90, 19, 1): x_tr2},
            "val": {FeatureKey(90, 24, 1): x_val, FeatureKey(90, 19, 1): x_val},
        },
        {"train": y_tr, "val": y_val},
        skipped={"train": [3, 77, 300], "val": [5]},
        chunk_images=64,
    )


def _features(store, split, usable, metric):
    x = store.features(split, 24, 90, 1).reshape(-1, DIM)[usable].astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x


def _assert_well_defined(x_db, queries, ks):
    """No query has its k-th and (k+1)-th nearest neighbours within 1e-6 of each other (in
    float64): the float32 products and scikit-learn's float64 distances pick the same sets."""
    for q in queries:
        d = np.sort(np.sqrt(((x_db[None] - q[:, None]) ** 2).sum(-1)), axis=1)
        for k in ks:
            assert (d[:, k] - d[:, k - 1]).min() > 1e-6, k


def _rate(hit) -> float:
    return int(np.sum(hit)) / len(hit)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_equals_scikit_learn_knn_exactly(store_path, metric):
    store = open_store(store_path)
    p = ProbeConfig(knn_k=KS, knn_weighting="uniform", knn_metric=metric)
    sel = select(store, 0, p)
    results = kn.knn_probe(store, 24, 90, 1, settings=p, selection=sel)
    x_tr = _features(store, "train", sel.usable, metric)
    x_db, y_db, x_held, y_held = x_tr[sel.fit], sel.y[sel.fit], x_tr[sel.hold], sel.y[sel.hold]
    x_val = _features(store, "val", sel.usable_val, metric)
    _assert_well_defined(x_db, [x_held, x_val], KS)
    classes = store.class_names
    for k, r in zip(KS, results):
        clf = KNeighborsClassifier(n_neighbors=k, weights="uniform", algorithm="brute").fit(x_db, y_db)
        pred, proba = clf.predict(x_val), clf.predict_proba(x_val)
        assert list(clf.classes_) == list(range(CLASSES))
        ranked = np.argsort(-proba, axis=1, kind="stable")  # ties: the smaller class, as argmax
        assert r["hyperparameters"] == {"k": k, "temperature": 0.07, "weighting": "uniform", "metric": metric}
        assert r["top1"] == _rate(pred == sel.y_val)
        assert r["top5"] == _rate((ranked[:, :5] == sel.y_val[:, None]).any(1))
        assert r["heldout_top1"] == _rate(clf.predict(x_held) == y_held)
        want = {
            name: (_rate(pred[sel.y_val == c] == c) if (sel.y_val == c).any() else None)
            for c, name in enumerate(classes)
        }
        assert r["per_class"] == want
        assert r["n_train"] == len(y_db) and r["n_val"] == len(x_val) and r["dim"] == DIM
    # the neighbours themselves, in scikit-learn's order
    rows = np.flatnonzero(sel.usable)[sel.fit]
    database = FeatureData(store, "train", [(24, 90, 1)], rows, None, sel.usable, memory_mb=64)
    val = FeatureData(store, "val", [(24, 90, 1)], np.flatnonzero(sel.usable_val), None, sel.usable_val, memory_mb=64)
    _, idx = kn.top_neighbours(val, database, 15, metric, 40, 100)
    want = KNeighborsClassifier(n_neighbors=15, algorithm="brute").fit(x_db, y_db).kneighbors(x_val)[1]
    assert np.array_equal(idx.numpy(), want)


def test_exp_votes_equal_dinov2s_formula(store_path):
    store = open_store(store_path)
    p = ProbeConfig(knn_k=KS, knn_temperature=0.1)
    sel = select(store, 0, p)
    results = kn.knn_probe(store, 24, 90, 1, settings=p, selection=sel)
    x_tr = _features(store, "train", sel.usable, "cosine")
    x_db, y_db = x_tr[sel.fit], sel.y[sel.fit]
    x_val = _features(store, "val", sel.usable_val, "cosine")
    # DINOv2 eval/knn.py: softmax(topk sims / T) over max k, one-hot labels summed over the first k
    sims = x_val @ x_db.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, : max(KS)]
    s = np.take_along_axis(sims, top, 1) / 0.1
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    onehot = np.eye(CLASSES)[y_db[top]]
    for k, r in zip(KS, results):
        probas = (onehot[:, :k] * w[:, :k, None]).sum(1)
        ranked = np.argsort(-probas, axis=1, kind="stable")
        assert r["top1"] == _rate(ranked[:, 0] == sel.y_val)
        assert r["top5"] == _rate((ranked[:, :5] == sel.y_val[:, None]).any(1))


def test_streamed_equals_in_memory_and_shots_use_the_subset(store_path):
    store = open_store(store_path)
    whole = kn.knn_probe(store, 24, 90, 1, ks=KS)
    small = kn.knn_probe(store, 24, 90, 1, ks=KS, settings=ProbeConfig(memory_mb=0.01))  # 10 KB: many blocks
    assert not whole[0]["streamed"] and small[0]["streamed"]
    for a, b in zip(whole, small):
        assert (a["top1"], a["top5"], a["heldout_top1"], a["per_class"]) == (
            b["top1"],
            b["top5"],
            b["heldout_top1"],
            b["per_class"],
        )
    # one k, or several: a k's row does not depend on the others asked for
    assert kn.knn_probe(store, 24, 90, 1, ks=(5,))[0]["top1"] == whole[1]["top1"]
    p = ProbeConfig(knn_k=(1, 3), knn_weighting="uniform")
    sel = select(store, 0, p, "shots:4")
    r = kn.knn_probe(store, 24, 90, 1, settings=p, selection=sel)
    assert r[0]["n_train"] == 4 * CLASSES and r[0]["subset"] == "shots:4"
    x_tr = _features(store, "train", sel.usable, "cosine")
    x_val = _features(store, "val", sel.usable_val, "cosine")
    clf = KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(x_tr[sel.fit], sel.y[sel.fit])
    assert r[1]["top1"] == _rate(clf.predict(x_val) == sel.y_val)


def test_cli_json_ledger_rows_per_k(store_path, tmp_path):
    ledger = tmp_path / "l.csv"
    res = runner.invoke(
        probe_app,
        ["knn", "--block", "24", "--t", "90", "--pool", "1", "--k", "5,1,15", "--store", str(store_path)]
        + ["--ledger", str(ledger), "--shots", "10", "--json"],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert set(COLUMNS) <= set(r) and {"grid", "ledger", "subset_file", "streamed", "per_k"} <= set(r)
    assert [x["hyperparameters"]["k"] for x in r["per_k"]] == [1, 5, 15]
    assert r == {**kn.best(r["per_k"]), "per_k": r["per_k"]}
    rows = read_rows(ledger)
    assert [(row["head"], row["hyperparameters"]["k"]) for row in rows] == [("knn", 1), ("knn", 5), ("knn", 15)]
    assert [row["top1"] for row in rows] == [x["top1"] for x in r["per_k"]] and rows[0]["subset"] == "shots:10"
    assert r["subset_file"] and (tmp_path / "subsets").is_dir()
    res = runner.invoke(
        probe_app,
        ["knn", "--block", "24", "--t", "90", "--pool", "1", "--store", str(store_path)] + ["--ledger", str(ledger)],
    )
    assert res.exit_code == 0, res.output
    assert "held-out top-1" in res.stdout and "(*: best held-out top-1)" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--k", "0"], "probe.knn_k: 0 is out of range"),
        (["--k", "10,0"], "probe.knn_k: 0 is out of range"),
        (["--k", "400"], "--k 400: k must be below the train images fitted on (376); allowed: 1..375"),
        (["--k", "18", "--shots", "3"], "--k 18: k must be below the train images fitted on (18); allowed: 1..17"),
        (["--temperature", "0"], "probe.knn_temperature: 0.0 is out of range"),
        (["--temperature", "-1"], "probe.knn_temperature: -1.0 is out of range"),
        (["--metric", "dot"], "probe.knn_metric: 'dot' is not allowed; allowed: 'cosine', 'l2'"),
        (["--weighting", "rank"], "probe.knn_weighting: 'rank' is not allowed; allowed: 'exp', 'uniform'"),
        (["--t", "91"], "no features for block 24, t 91, pool 1 in split 'train'"),
        (["--block", "23"], "no features for block 23, t 90, pool 1 in split 'train'"),
        (["--block", "40"], "--block: 40 is not a block of this store; its model has blocks 1-37"),
    ],
)
def test_errors_are_one_line_exit_2_nothing_written(store_path, tmp_path, args, message):
    base = {"--block": "24", "--t": "90", "--pool": "1"}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    flat = [v for kv in base.items() for v in kv]
    r = runner.invoke(probe_app, ["knn", *flat, *args, "--store", str(store_path), "--ledger", str(tmp_path / "l.csv")])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sweep_head_knn_resumes_and_plots(tmp_path):
    grid = write_grid_store(tmp_path / "g.zarr", n_train=120, n_val=40)
    ledger = tmp_path / "l.csv"
    args = ["sweep", "--head", "knn", "--k", "1,5", "--store", str(grid), "--ledger", str(ledger), "--json"]
    res = runner.invoke(probe_app, [*args, "--blocks", "24", "--t", "90"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["trained"] == 2 and r["skipped"] == 0 and len(r["cells"]) == 4  # 2 pools x 2 ks
    direct = kn.knn_probe(open_store(grid), 24, 90, 2, ks=(1, 5))
    assert [c["top1"] for c in r["cells"] if c["pool"] == 2] == [d["top1"] for d in direct]
    assert len(read_rows(ledger)) == 4 and len(r["plots"]["files"]) == 2 * 2 * 3
    assert all("/k1/" in f or "/k5/" in f for f in r["plots"]["files"])
    again = json.loads(runner.invoke(probe_app, [*args, "--blocks", "23,24", "--t", "90"]).stdout)
    assert again["trained"] == 2 and again["skipped"] == 2 and len(read_rows(ledger)) == 8
    assert again["best"]["top1"] == max(c["top1"] for c in again["cells"])
    res = runner.invoke(probe_app, [*args, "--blocks", "24", "--t", "90", "--k", "200"])
    assert res.exit_code == 2 and "--k 200: k must be below" in res.output and len(read_rows(ledger)) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_equals_cpu(store_path):
    store = open_store(store_path)
    p = ProbeConfig(knn_k=KS, knn_weighting="uniform")
    cpu = kn.knn_probe(store, 24, 90, 1, settings=p, device="cpu")
    gpu = kn.knn_probe(store, 24, 90, 1, settings=p, device="cuda")
    assert gpu[0]["device"].startswith("cuda")
    assert [(r["top1"], r["top5"], r["per_class"]) for r in gpu] == [
        (r["top1"], r["top5"], r["per_class"]) for r in cpu
    ]
