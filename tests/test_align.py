"""kNN alignment (`analyze align`): mutual-kNN and CKNNA against brute-force implementations
written here (dense masks, platonic-rep's formulas), the limits (identical representations,
an independent pairing vs the permutation baseline), streaming vs in memory, bootstrap, and
the command's outputs and one-line errors."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffprobe.analyze import align as al
from diffprobe.analyze import cka as ck
from diffprobe.analyze import knn as kn
from diffprobe.analyze.cli import analyze_app
from diffprobe.analyze.engine import array_source
from diffprobe.probe.neighbours import RunningTopK, block_topk
from diffprobe.store.config import load_config
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import REPO

runner = CliRunner()

# ------------------------------------------------------------------ brute force


def brute_knn_mask(x, k):
    """Cosine kernel of the normalised rows and the (n, n) 0/1 mask of each row's k nearest
    others, by a full sort per row on (similarity desc, index asc)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    kern = x @ x.T
    n = len(x)
    mask = np.zeros((n, n))
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: (-kern[i, j], j))
        mask[i, order[:k]] = 1.0
    return kern, mask


def brute_hsic_unbiased(k, l):
    """Song et al. (2012), eq. 5, literally (as platonic-rep's hsic_unbiased)."""
    m = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    return ((kt * lt.T).sum() + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2 * (kt @ lt).sum() / (m - 2)) / (
        m * (m - 3)
    )


def brute_mutual(x, y, k):
    _, ma = brute_knn_mask(x, k)
    _, mb = brute_knn_mask(y, k)
    return float(((ma * mb).sum(1) / k).mean())


def brute_cknna(x, y, k):
    ka, ma = brute_knn_mask(x, k)
    kb, mb = brute_knn_mask(y, k)
    m = ma * mb
    return float(
        brute_hsic_unbiased(m * ka, m * kb)
        / np.sqrt(brute_hsic_unbiased(ma * ka, ma * ka) * brute_hsic_unbiased(mb * kb, mb * kb))
    )


def keyed(lists):
    """A representation's neighbour lists as sorted keys i * n + j and their similarities."""
    n = lists.n
    keys = (np.arange(n)[:, None] * n + lists.index).ravel()
    order = np.argsort(keys)
    return keys[order], lists.sims.ravel()[order]


def related(seed, n=70, d=9, noise=0.6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 0.5
    y = np.tanh(x @ rng.normal(size=(d, 6))) + noise * rng.normal(size=(n, 6))
    return x, y


# ------------------------------------------------------------------ the metrics


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 5), (2, 10), (3, 30)])
def test_mutual_knn_equals_brute_force(seed, k):
    x, y = related(seed)
    assert kn.mutual_knn(x, y, k, precision="float64") == pytest.approx(brute_mutual(x, y, k), abs=1e-9)


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 5), (2, 10), (3, 30), (4, 69)])
def test_cknna_equals_brute_force(seed, k):
    x, y = related(seed)
    assert kn.cknna(x, y, k, precision="float64") == pytest.approx(brute_cknna(x, y, k), abs=1e-9)


def test_float32_products_stay_close():
    x, y = related(5, n=120)
    assert kn.cknna(x, y, 10) == pytest.approx(brute_cknna(x, y, 10), abs=1e-5)
    assert kn.mutual_knn(x, y, 10) == pytest.approx(brute_mutual(x, y, 10), abs=1e-9)


def test_identical_representations_give_one():
    x, _ = related(6)
    for k in (2, 10):
        assert kn.mutual_knn(x, x, k) == 1.0
        assert kn.cknna(x, x, k) == pytest.approx(1.0, abs=1e-12)
        # the same images in a rescaled copy: cosine neighbours do not change
        assert kn.mutual_knn(x, 3.0 * x, k) == 1.0


def test_an_independent_pairing_approaches_the_permutation_baseline():
    rng = np.random.default_rng(7)
    n, k = 400, 10
    x, y = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    srcs = [array_source(x, "x")], [array_source(y, "y")]
    for metric in ("mutual-knn", "cknna"):
        r = kn.align_matrix(*srcs, n, kn.AlignOptions(knn_metric=metric, knn_k=k, permutations=30))
        v, base, high = r["matrix"][0][0], r["perm_mean"][0][0], r["perm_high"][0][0]
        assert v <= high + 0.02, (metric, v, high)
        assert abs(v - base) < 0.02, (metric, v, base)
    # mutual-kNN of unrelated neighbourhoods: about k / (n - 1)
    r = kn.align_matrix(*srcs, n, kn.AlignOptions(knn_k=k, permutations=30))
    assert r["perm_mean"][0][0] == pytest.approx(k / (n - 1), rel=0.2)
    # a related pair is far above it
    a, b = related(8, n=n)
    rel = kn.align_matrix([array_source(a)], [array_source(b)], n, kn.AlignOptions(knn_k=k, permutations=10))
    assert rel["matrix"][0][0] > 3 * rel["perm_high"][0][0]


def test_permutation_replicate_equals_recomputing_on_shuffled_images():
    x, y = related(9)
    pi = np.random.default_rng(0).permutation(len(y))
    opts = kn.AlignOptions(knn_metric="cknna", knn_k=6, precision="float64")
    ly, _, _ = kn.neighbours(array_source(y), len(y), opts)
    lx, _, _ = kn.neighbours(array_source(x), len(x), opts)
    relabelled = kn._permuted(ly, pi)
    recomputed, _, _ = kn.neighbours(array_source(y[pi]), len(y), opts)
    (ka, sa), (kb, sb) = keyed(relabelled), keyed(recomputed)
    assert np.array_equal(ka, kb) and np.allclose(sa, sb, atol=1e-12)
    assert kn.pair_stats(lx, relabelled, 6)[1] == pytest.approx(kn.pair_stats(lx, recomputed, 6)[1], abs=1e-12)


def test_both_ways_of_matching_neighbours_agree(monkeypatch):
    x, y = related(12, n=90)
    for k in (3, 20):
        want = (kn.mutual_knn(x, y, k, precision="float64"), kn.cknna(x, y, k, precision="float64"))
        monkeypatch.setattr(kn, "_BROADCAST", 0)  # sorted keys instead of the (n, k, k) comparison
        got = (kn.mutual_knn(x, y, k, precision="float64"), kn.cknna(x, y, k, precision="float64"))
        monkeypatch.undo()
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-12)
        assert want[1] == pytest.approx(brute_cknna(x, y, k), abs=1e-9)


def test_streamed_neighbours_equal_in_memory_and_blocks_do_not_matter():
    rng = np.random.default_rng(10)
    n = 600
    x = rng.normal(size=(n, 300)).astype(np.float32)
    x[50] = x[7]  # exact ties: the smaller index wins in every layout
    x[420] = x[7]
    opts = kn.AlignOptions(knn_k=7)
    whole, _, reads = kn.neighbours(array_source(x, chunk=64), n, opts)
    small = kn.AlignOptions(knn_k=7, memory_mb=1.0)  # 720 KB of features: windows of 128 rows
    streamed, _, reads_s = kn.neighbours(array_source(x, chunk=64), n, small)
    assert reads == 1 and reads_s == 5
    assert np.array_equal(whole.index, streamed.index) and np.array_equal(whole.sims, streamed.sims)
    ref = brute_knn_mask(x, 7)[1]
    got = np.zeros((n, n))
    r, c = np.divmod(keyed(whole)[0], n)
    got[r, c] = 1
    assert np.array_equal(got, ref)


def test_running_topk_breaks_ties_by_index_whatever_the_blocks():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0, 3.0, 0.5]])
    for block in (1, 2, 3, 8):
        top = RunningTopK(1, 3)
        for lo in range(0, 8, block):
            top.add(s[:, lo : lo + block], lo)
        assert top.index.tolist() == [[1, 2, 4]] and top.values.tolist() == [[3.0, 3.0, 3.0]]
    v, i = block_topk(s, 5)
    assert i.tolist() == [[1, 2, 4, 6, 3]]
    with pytest.raises(ValueError, match="increasing order"):
        top.add(s[:, :2], 0)


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    x, y = related(11, n=120)
    srcs = [array_source(x, "x")], [array_source(y, "y")]
    for metric in ("mutual-knn", "cknna"):
        opts = kn.AlignOptions(knn_metric=metric, knn_k=5, bootstrap=40, seed=3)
        r = kn.align_matrix(*srcs, 120, opts)
        lo, v, hi = r["ci_low"][0][0], r["matrix"][0][0], r["ci_high"][0][0]
        assert lo < v < hi and hi - lo < 0.5, (metric, lo, v, hi)
        assert kn.align_matrix(*srcs, 120, opts)["ci_low"] == r["ci_low"]


@pytest.mark.parametrize(
    "kwargs,n,pattern",
    [
        ({"knn_k": 70}, 70, r"--k 70: must be below the number of images \(70\)"),
        ({"knn_k": 1, "knn_metric": "cknna"}, 70, r"cknna needs k >= 2"),
        ({"knn_k": 40, "bootstrap": 5}, 70, r"replicates hold 35 images each"),
        ({"knn_k": 5, "memory_mb": 1.0, "bootstrap": 2000}, 70, r"need \d+ MB but analyze.memory_mb is 1"),
    ],
)
def test_engine_errors(kwargs, n, pattern):
    x, y = related(0, n=n)
    with pytest.raises(kn.AlignError, match=pattern):
        kn.align_matrix([array_source(x)], [array_source(y)], n, kn.AlignOptions(**kwargs))


def test_options_are_checked_by_the_config_parsers():
    with pytest.raises(Exception, match=r"analyze.knn_k: 0 is out of range"):
        kn.AlignOptions(knn_k=0)
    with pytest.raises(Exception, match=r"analyze.knn_metric: 'cka' is not allowed"):
        kn.AlignOptions(knn_metric="cka")


# ------------------------------------------------------------------ on stores, and the command

N = 60
BLOCKS = (3, 19, 24)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    rng = np.random.default_rng(1)
    base = rng.normal(size=(N, 8))
    feats = {b: (np.tanh(base @ rng.normal(size=(8, 8 * 4))) + 0.3 * rng.normal(size=(N, 32))) for b in BLOCKS}
    arrays = {FeatureKey(90, b, 2): feats[b].reshape(N, 8, 2, 2) for b in BLOCKS}
    labels = {"val": np.arange(N) % 3}
    a = write_synthetic_store(root / "a.zarr", {"val": arrays}, labels, chunk_images=16, skipped={"val": [5]})
    order = rng.permutation(N)  # b: a's images in another order
    ids_a = [f"val/{i:06d}" for i in range(N)]
    b = write_synthetic_store(
        root / "b.zarr",
        {"val": {k: v[order] for k, v in arrays.items()}},
        {"val": labels["val"][order]},
        ids={"val": [ids_a[i] for i in order]},
        chunk_images=16,
        tag="b",
    )
    c = write_synthetic_store(
        root / "c.zarr", {"val": arrays}, labels, ids={"val": [f"other/{i}" for i in range(N)]}, tag="c"
    )
    keep = np.arange(N) != 5
    stored = {bl: f[keep].astype(np.float16).astype(np.float64) for bl, f in feats.items()}  # what the store holds
    return {"a": a, "b": b, "c": c, "feats": stored}


def _cfg(path, **over):
    return load_config(REPO / "pipeline.toml", {"store.path": str(path), **over})


def test_run_block_matrix_matches_the_in_memory_metric_and_writes_files(stores):
    feats = stores["feats"]
    for metric, fn in (("mutual-knn", brute_mutual), ("cknna", brute_cknna)):
        r = al.run(_cfg(stores["a"]), t=90, knn_metric=metric, knn_k=5, precision="float64")
        assert r["rows"] == list(BLOCKS) and r["n_images"] == N - 1 and r["mode"] == "blocks"
        m = np.asarray(r["matrix"])
        assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
        assert m[0, 2] == pytest.approx(fn(feats[3], feats[24], 5), abs=1e-9)
        folder = stores["a"].parent / f"align-{ck.fingerprint(open_store(stores['a']))}"
        stem = f"blocks-t90-p2-val-{metric}-k5"
        assert r["folder"] == str(folder)
        assert (folder / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        lines = (folder / f"{stem}.csv").read_text().splitlines()
        assert np.allclose([[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]], m, atol=0)


def test_against_aligns_image_ids(stores):
    r = al.run(_cfg(stores["a"]), t=90, against=stores["b"], knn_k=5, plots=False)
    alone = al.run(_cfg(stores["a"]), t=90, knn_k=5, plots=False)
    # b holds the same images (and no skipped one: the pairs use the images usable in both)
    assert r["n_images"] == N - 1 and np.allclose(r["matrix"], alone["matrix"])


def test_cli_json_and_table(stores):
    res = runner.invoke(
        analyze_app,
        ["align", "--t", "90", "--store", str(stores["a"]), "--metric", "cknna", "--k", "4", "--permutations", "3"],
    )
    assert res.exit_code == 0, res.output
    assert "cknna (k 4): block x block at t 90" in res.stdout and "permutation baseline" in res.stdout
    res = runner.invoke(analyze_app, ["align", "--block", "24", "--store", str(stores["a"]), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["rows"] == [90] and r["metric"] == "mutual-knn" and r["k"] == 10 and r["mode"] == "timesteps"


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--t", "90", "--k", "0"], r"analyze.knn_k: 0 is out of range"),
        (["--t", "90", "--k", "-3"], r"analyze.knn_k: -3 is out of range"),
        (["--t", "90", "--k", "59"], r"--k 59: must be below the number of images \(59\)"),
        (["--t", "90", "--metric", "cka"], r"analyze.knn_metric: 'cka' is not allowed; allowed: 'mutual-knn', 'cknna'"),
        (["--t", "30"], r"--t 30: .* holds t 90 in split 'val'"),
        (["--t", "90", "--blocks", "3,30"], r"--blocks: block 30 at t 90, pool 2 is not in"),
        (["--t", "90", "--pool", "1"], r"--pool 1: .* holds pools 2"),
        (["--t", "90", "--against", "C"], r"ids of split 'val' differ: \d+ of 60 ids in"),
    ],
)
def test_cli_errors_are_one_line_exit_2_nothing_written(stores, tmp_path, args, pattern):
    args = [str(stores["c"]) if a == "C" else a for a in args]
    before = sorted(p.name for p in stores["a"].parent.iterdir())
    res = runner.invoke(analyze_app, ["align", "--store", str(stores["a"]), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert re.search(pattern, " ".join(res.output.split())), res.output
    assert sorted(p.name for p in stores["a"].parent.iterdir()) == before
