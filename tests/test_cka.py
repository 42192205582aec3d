"""CKA: identities and invariances, agreement with direct Gram-matrix implementations written
here, the minibatch estimator, constant features, out-of-core vs in-memory, and `analyze cka`
through typer's runner."""

import itertools
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.analyze import cka as ck
from diffprobe.analyze.cli import analyze_app
from diffprobe.store.config import load_config
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import REPO

runner = CliRunner()
LINEAR = ("linear", "linear-unbiased")
ALL = ("linear", "linear-unbiased", "rbf", "rbf-unbiased", "minibatch")


# ------------------------------------------------------------------ direct implementations


def direct_gram(x, kernel="linear", fraction=0.5):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if kernel == "linear":
        return x @ x.T
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    sigma = fraction * np.median(d[np.triu_indices(len(x), 1)])
    return np.exp(-(d**2) / (2 * sigma**2))


def direct_cka(k, l, unbiased):
    """Kornblith et al.'s formulation: explicit centring matrix, or the unbiased centring of the Gram."""
    n = len(k)
    if unbiased:

        def center(g):
            g = g.copy()
            np.fill_diagonal(g, 0)
            means = g.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            g -= means[:, None] + means[None, :]
            np.fill_diagonal(g, 0)
            return g
    else:
        h = np.eye(n) - np.ones((n, n)) / n

        def center(g):
            return h @ g @ h

    kc, lc = center(k), center(l)
    return float((kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum()))


def ustat_hsic(k, l):
    """Song et al.'s unbiased HSIC as the literal average over ordered 4-tuples of distinct images."""
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(len(k)), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def pair(seed=0, n=80, dx=12, dy=9, noise=1.0, data_seed=None):
    """Two related representations; ``data_seed`` draws fresh images from the same population."""
    rng = np.random.default_rng(seed)
    scale, w = rng.uniform(0.5, 2, dx), rng.normal(size=(dx, dy))
    if data_seed is not None:
        rng = np.random.default_rng(10_000 + data_seed)
    x = rng.normal(size=(n, dx)) * scale + 3.0
    y = np.tanh(x @ w) + noise * rng.normal(size=(n, dy)) - 2.0
    return x, y


# ------------------------------------------------------------------ estimator properties


@pytest.mark.parametrize("estimator", ALL)
def test_cka_of_x_with_itself_is_one(estimator):
    x, _ = pair()
    assert ck.cka(x, x, estimator) == pytest.approx(1.0, abs=1e-9)
    r = ck.cka_matrix(
        [ck.array_source(x, 1), ck.array_source(x + 1.0, 2)], None, len(x), ck.CkaOptions(estimator=estimator)
    )
    assert np.allclose(r["matrix"], 1.0, atol=1e-9)


@pytest.mark.parametrize("estimator", ALL)
def test_invariant_to_orthogonal_maps_and_isotropic_scaling_but_not_anisotropic(estimator):
    x, y = pair(1, noise=0.3)
    base = ck.cka(x, y, estimator)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(x.shape[1], x.shape[1])))
    qy, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(y.shape[1], y.shape[1])))
    assert ck.cka(x @ q, y, estimator) == pytest.approx(base, abs=1e-7)
    assert ck.cka(x, y @ qy, estimator) == pytest.approx(base, abs=1e-7)
    assert ck.cka(7.5 * x, y, estimator) == pytest.approx(base, abs=1e-7)
    assert ck.cka(x, 0.01 * y, estimator) == pytest.approx(base, abs=1e-7)
    stretch = np.geomspace(0.05, 20, x.shape[1])
    assert abs(ck.cka(x * stretch, y, estimator) - base) > 1e-2


@pytest.mark.parametrize(
    "estimator,form",
    [(e, f) for e in LINEAR for f in ("feature", "gram")] + [("rbf", "gram"), ("rbf-unbiased", "gram")],
)  # RBF has only the Gram form
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_agrees_with_a_direct_gram_matrix_implementation(estimator, form, precision):
    kernel, unbiased = estimator.split("-")[0], estimator.endswith("unbiased")
    for seed in range(3):
        x, y = pair(seed, n=60 + 17 * seed)
        want = direct_cka(direct_gram(x, kernel, 0.5), direct_gram(y, kernel, 0.5), unbiased)
        got = ck.cka(x, y, estimator, form=form, precision=precision, rbf_fraction=0.5)
        assert got == pytest.approx(want, abs=1e-6)


def test_unbiased_hsic_is_the_u_statistic():
    x, y = pair(3, n=8, dx=3, dy=2)
    k, l = direct_gram(x), direct_gram(y)
    want = ustat_hsic(k, l) / np.sqrt(ustat_hsic(k, k) * ustat_hsic(l, l))
    for form in ("feature", "gram"):
        assert ck.cka(x, y, "linear-unbiased", form=form, precision="float64") == pytest.approx(want, abs=1e-10)


def test_feature_and_gram_forms_agree_on_a_matrix_and_with_each_pair_alone():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) + 5 for d in (3, 40, 200)]
    for est in LINEAR:
        rows = [ck.array_source(x, i, chunk=32) for i, x in enumerate(xs)]
        a = ck.cka_matrix(rows, None, 150, ck.CkaOptions(estimator=est, precision="float64"), form="feature")
        b = ck.cka_matrix(rows, None, 150, ck.CkaOptions(estimator=est), form="gram")
        assert a["form"] == "feature" and b["form"] == "gram"
        assert np.allclose(a["matrix"], b["matrix"], atol=1e-9)
        for i, j in itertools.product(range(3), repeat=2):
            assert a["matrix"][i][j] == pytest.approx(ck.cka(xs[i], xs[j], est), abs=1e-7)


def test_minibatch_converges_to_the_full_unbiased_value():
    x, y = pair(4, n=1200)
    full = ck.cka(x, y, "linear-unbiased", precision="float64")
    err = {
        m: np.mean([abs(ck.cka(x, y, "minibatch", minibatch_size=m, seed=s) - full) for s in range(5)])
        for m in (16, 256, 1200)
    }
    assert err[1200] < 1e-10  # one batch of every image is the full estimator
    assert err[256] < err[16] < 0.01


@pytest.mark.parametrize("estimator", ALL)
def test_constant_features_never_give_nan(estimator):
    x, _ = pair(2)
    const = np.full((len(x), 6), 3.25)
    zero = np.zeros((len(x), 4))
    half = x.copy()
    half[:, :4] = 1.0  # some constant columns: an ordinary representation
    for form in ("feature", "gram") if estimator in LINEAR else ("auto",):
        r = ck.cka_matrix(
            [ck.array_source(a, lab, name=f"block {lab}") for lab, a in ((1, x), (2, const), (3, zero), (4, half))],
            None,
            len(x),
            ck.CkaOptions(estimator=estimator),
            form=form,
        )
        m = np.asarray(r["matrix"])
        assert np.isfinite(m).all()
        assert (m[1] == 0).all() and (m[:, 2] == 0).all() and m[0, 0] == 1 and 0 < m[0, 3] < 1
        assert any("block 2" in w and "zero variance" in w for w in r["warnings"])
        assert any("block 3" in w for w in r["warnings"]) and not any("block 1 " in w for w in r["warnings"])
    assert ck.cka(const, zero, estimator) == 0.0


def test_bootstrap_and_permutation_baseline():
    x, y = pair(0, n=120, noise=0.3)
    rng = np.random.default_rng(9)
    unrelated = rng.normal(size=x.shape)
    srcs = [ck.array_source(a, i) for i, a in enumerate((x, y, unrelated))]
    r = ck.cka_matrix(srcs, None, len(x), ck.CkaOptions(bootstrap=60, permutations=30, seed=1))
    m, lo, hi = (np.asarray(r[k]) for k in ("matrix", "ci_low", "ci_high"))
    assert (lo <= m + 1e-12).all() and (m <= hi + 1e-12).all() and lo[0, 1] < hi[0, 1]
    assert r["bootstrap"] == 60 and r["permutations"] == 30
    perm = np.asarray(r["perm_mean"])
    assert perm[0, 1] < m[0, 1] / 2  # a real relation sits far above its shuffled pairing
    assert m[0, 2] < np.asarray(r["perm_high"])[0, 2] + 0.05  # an unrelated one does not
    again = ck.cka_matrix(srcs, None, len(x), ck.CkaOptions(bootstrap=60, permutations=30, seed=1))
    assert again["ci_low"] == r["ci_low"] and again["perm_mean"] == r["perm_mean"]
    # the interval's width matches the spread of the estimate over fresh data sets of the same size
    fresh = []
    for s in range(40):
        xs, ys = pair(0, n=120, noise=0.3, data_seed=s)
        fresh.append(ck.cka(xs, ys))
    width = hi[0, 1] - lo[0, 1]
    assert 0.5 < width / (np.quantile(fresh, 0.975) - np.quantile(fresh, 0.025)) < 2.0
    mb = ck.cka_matrix(
        srcs, None, len(x), ck.CkaOptions(estimator="minibatch", minibatch_size=16, bootstrap=40, permutations=5)
    )
    assert np.isfinite(mb["ci_low"]).all() and mb["n_batches"] == 8


def test_bootstrap_refused_when_gram_matrices_do_not_fit():
    x, y = pair(0, n=300)
    with pytest.raises(ck.CkaError, match=r"--bootstrap/--permutations need .*memory_mb.*minibatch"):
        ck.cka(x, y, bootstrap=5, memory_mb=1.0)


# ------------------------------------------------------------------ stores


C, P = 4, 2


def write_cka_store(path, arrays: dict, n: int, *, ids=None, skipped=(), chunk=16):
    """A one-split ('val') store holding ``arrays`` {(block, t): (n, C, P, P) float16}."""
    blocks = [{"number": b, "module": f"m{b}", "channels": C, "spatial": P} for b in range(1, 38)]
    ids = [f"img/{i:04d}" for i in range(n)] if ids is None else ids
    return write_synthetic_store(
        path,
        {"val": {FeatureKey(t, b, P): x for (b, t), x in arrays.items()}},
        {"val": np.arange(n) % 2},
        class_names=["a", "b"],
        ids={"val": ids},
        skipped={"val": skipped},
        chunk_images=chunk,
        blocks=blocks,
        tag=str(path),
    )


N = 90


def _features(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(N, C * P * P))
    out = {}
    for i, (b, t) in enumerate(itertools.product((3, 19, 24, 30), (30, 90))):
        mix = rng.normal(size=(C * P * P, C * P * P)) * (0.3 + i / 4)
        out[(b, t)] = (np.tanh(base @ mix) + 0.5 * rng.normal(size=base.shape)).reshape(N, C, P, P).astype(np.float16)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cka")
    feats = _features(0)
    a = write_cka_store(root / "a" / "s.zarr", feats, N, skipped=(5,))
    order = np.random.default_rng(1).permutation(N)  # the same images in another order
    ids = [f"img/{i:04d}" for i in order]
    b = write_cka_store(root / "b" / "s.zarr", {k: v[order] for k, v in feats.items()}, N, ids=ids)
    c = write_cka_store(root / "c" / "s.zarr", feats, N, ids=[f"img/{i:04d}" for i in range(3, N + 3)])
    return {"a": a, "b": b, "c": c, "feats": feats, "order": order}


def _cfg(path, **kw):
    return load_config(REPO / "pipeline.toml", {"store.path": str(path), **kw})


def test_out_of_core_equals_in_memory_and_reads_each_array_once(stores, monkeypatch):
    feats = stores["feats"]
    keep = np.ones(N, bool)
    keep[5] = False  # skipped in store a
    blocks = (3, 19, 24, 30)
    calls = {}
    real = ck.store_source

    def counting(store, split, block, t, pool, rows, label, name):
        src = real(store, split, block, t, pool, rows, label, name)

        def read(lo, hi):
            calls.setdefault(name, []).append((lo, hi))
            return src.read(lo, hi)

        return ck.Source(src.label, src.name, src.dim, read, src.chunk)

    monkeypatch.setattr(ck, "store_source", counting)
    for est in ALL:
        for form in ("feature", "gram") if est in LINEAR else ("auto",):
            calls.clear()
            s = open_store(stores["a"])
            p = ck.plan(s, "val", t=(90,))
            assert [x.label for x in p["rows"]] == list(blocks) and p["n"] == N - 1
            r = ck.cka_matrix(p["rows"], None, p["n"], ck.CkaOptions(estimator=est, minibatch_size=32), form=form)
            for name, spans in calls.items():  # every image of every array read exactly once
                assert sorted(spans) == spans and sum(h - lo for lo, h in spans) == N - 1, (est, form, name)
            assert len(calls) == len(blocks)
            mem = ck.cka_matrix(
                [ck.array_source(feats[(b, 90)][keep].astype(np.float64), b) for b in blocks],
                None,
                N - 1,
                ck.CkaOptions(estimator=est, minibatch_size=32),
                form=form,
            )
            assert np.allclose(r["matrix"], mem["matrix"], atol=1e-6), (est, form)
    # no skipped image: every window is a contiguous slice of the store
    p = ck.plan(open_store(stores["b"]), "val", t=(30,), blocks=(3, 30))
    r = ck.cka_matrix(p["rows"], None, N, ck.CkaOptions(), form="feature")
    x, y = (feats[(b, 30)][stores["order"]].astype(np.float64) for b in (3, 30))
    assert r["matrix"][0][1] == pytest.approx(ck.cka(x, y, precision="float64"), abs=1e-7)


def test_groups_when_accumulators_exceed_memory_give_the_same_matrix():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(64, 300)) @ rng.normal(size=(300, 300)) for _ in range(4)]
    srcs = [ck.array_source(x, i) for i, x in enumerate(xs)]
    whole = ck.cka_matrix(srcs, None, 64, ck.CkaOptions(precision="float64"), form="feature")
    small = ck.cka_matrix(srcs, None, 64, ck.CkaOptions(precision="float64", memory_mb=6.0), form="feature")
    gram = ck.cka_matrix(srcs, None, 64, ck.CkaOptions(), form="gram")
    assert whole["reads"] == 1 and small["reads"] > 1
    assert np.allclose(whole["matrix"], small["matrix"], atol=1e-10)
    assert np.allclose(whole["matrix"], gram["matrix"], atol=1e-10)  # 1200 columns: several product panels


def test_run_writes_heatmap_and_csv_beside_the_store(stores):
    r = ck.run(_cfg(stores["a"]), t=(90,), blocks=(19, 24, 30))
    assert r["rows"] == r["cols"] == [19, 24, 30] and r["mode"] == "blocks" and r["pool"] == 2
    folder = stores["a"].parent / f"cka-{ck.fingerprint(open_store(stores['a']))}"
    assert r["folder"] == str(folder)
    png, csv = folder / "blocks-t90-p2-val-linear.png", folder / "blocks-t90-p2-val-linear.csv"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    lines = csv.read_text().splitlines()
    assert lines[0].split(",")[1:] == ["19", "24", "30"]
    assert np.allclose([[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]], r["matrix"], atol=0)
    t = ck.run(_cfg(stores["a"]), block=24)
    assert t["rows"] == [30, 90] and t["mode"] == "timesteps"


def test_against_matches_image_ids_and_refuses_other_images(stores):
    r = ck.run(_cfg(stores["a"]), t=(30,), against=stores["b"], plots=False)
    m = np.asarray(r["matrix"])  # b holds a's images in another order: the diagonal is CKA(X, X)
    assert np.allclose(np.diag(m), 1.0, atol=1e-9) and r["n_images"] == N - 1
    alone = ck.run(_cfg(stores["a"]), t=(30,), plots=False)
    assert np.allclose(m, alone["matrix"], atol=1e-9)
    with pytest.raises(ck.StoreError, match=r"ids of split 'val' differ: 3 of 90 ids in .* are not in .* and 3 of 90"):
        ck.run(_cfg(stores["a"]), t=(30,), against=stores["c"], plots=False)


# ------------------------------------------------------------------ the CLI


def test_cli_json(stores):
    res = runner.invoke(
        analyze_app,
        [
            "cka",
            "--t",
            "90",
            "--store",
            str(stores["a"]),
            "--blocks",
            "3,24",
            "--estimator",
            "linear-unbiased",
            "--bootstrap",
            "20",
            "--permutations",
            "5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert {"rows", "cols", "matrix", "estimator", "ci_low", "ci_high", "perm_mean", "files"} <= set(r)
    assert r["rows"] == [3, 24] and r["estimator"] == "linear-unbiased" and len(r["ci_low"]) == 2
    want = ck.cka(
        stores["feats"][(3, 90)][np.arange(N) != 5], stores["feats"][(24, 90)][np.arange(N) != 5], "linear-unbiased"
    )
    assert r["matrix"][0][1] == pytest.approx(want, abs=1e-6)
    res = runner.invoke(analyze_app, ["cka", "--block", "19", "--store", str(stores["a"])])
    assert res.exit_code == 0 and "t x t at block 19" in res.stdout and "heatmap and CSV" in res.stdout


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--t", "91"], r"--t 91: .* holds t 30,90 in split 'val'"),
        (["--t", "90", "--blocks", "24,25"], r"--blocks: block 25 at t 90, pool 2 is not in .*holds blocks 3,19,24,30"),
        (["--t", "90", "--blocks", "40"], r"--blocks: 40 is not a block of this store; its model has blocks 1-37"),
        (["--t", "90", "--pool", "4"], r"--pool 4: .* holds pools 2 in split 'val'"),
        (["--block", "20"], r"--block 20: .* holds blocks 3,19,24,30"),
        (["--t", "30,90"], r"--t: give one timestep"),
        (["--t", "90", "--split", "train"], r"no split 'train'; the store holds val"),
        (["--t", "90", "--estimator", "cosine"], r"analyze.estimator: 'cosine' is not allowed"),
    ],
)
def test_cli_errors_are_one_line_exit_2(stores, args, pattern):
    res = runner.invoke(analyze_app, ["cka", "--store", str(stores["a"]), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert re.search(pattern, " ".join(res.output.split())), res.output


def test_cli_against_mismatched_ids(stores):
    res = runner.invoke(analyze_app, ["cka", "--t", "90", "--store", str(stores["a"]), "--against", str(stores["c"])])
    assert res.exit_code == 2 and "3 of 90 ids" in res.output and "Traceback" not in res.output


def test_the_title_names_the_pool_read_per_block(tmp_path):
    """Block 19's map is 1x1: asked for pool 2, it is read at its capped pool 1, and the result says so."""
    blocks = [{"number": b, "module": f"m{b}", "channels": C, "spatial": 1 if b == 19 else P} for b in range(1, 38)]
    rng = np.random.default_rng(0)
    feats = {
        FeatureKey(90, 24, P): rng.normal(size=(40, C, P, P)),
        FeatureKey(90, 19, 1): rng.normal(size=(40, C, 1, 1)),
    }
    path = write_synthetic_store(tmp_path / "s.zarr", {"val": feats}, {"val": np.arange(40) % 2}, blocks=blocks)
    r = ck.run(_cfg(path), t=(90,), pool=P, plots=False)
    assert r["rows"] == [19, 24] and r["pool_read"] == "pool 2 (block 19 read at 1)"
