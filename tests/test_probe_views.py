"""Probes on stored views and noise draws: the per-epoch view schedule (probe.data.FeatureData),
the views each batch really reads (in memory and streamed alike), noise-draw averaging, what
results record, and the refusals."""

import numpy as np
import pytest
import torch

from diffprobe.probe.attention import _predict, attention_probe
from diffprobe.probe.data import FeatureData, Views, val_logits, val_part
from diffprobe.probe.linear import linear_probe
from diffprobe.probe.protocol import select
from diffprobe.store.config import HeadsConfig, ProbeConfig
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, NV, C, P, K, M, CHUNK = 120, 40, 4, 2, 4, 3, 16
CELL = (24, 90, P)
PROBE = ProbeConfig(sgd_epochs=4, sgd_lr=(0.1,), lbfgs_max_iter=20, memory_mb=64)


def _tag(n: int, view: int) -> np.ndarray:
    """Features whose first value says (row, view): 1000 * view + row (exact in float32)."""
    x = np.zeros((n, C, P, P), np.float32)
    x[:, 0, 0, 0] = 1000 * view + np.arange(n)
    return x


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    y = np.arange(N) % 4
    train = {FeatureKey(90, 24, P, view=v): _tag(N, v) for v in range(K)}
    path = tmp_path_factory.mktemp("tagged") / "s.zarr"
    val = {FeatureKey(90, 24, P): _tag(NV, 0)}
    return open_store(
        write_synthetic_store(
            path, {"train": train, "val": val}, {"train": y, "val": y[:NV]}, chunk_images=CHUNK, dtype="float32"
        )
    )


def _data(store, stream, views=K, seed=0, rows=None):
    rows = np.flatnonzero(np.arange(N) % 5 != 2) if rows is None else rows
    y = store.labels("train")[rows]
    mb = 40 * K * C * P * P * 4 / 2**20  # 40 rows at K views: streamed in windows
    return FeatureData(
        store,
        "train",
        [CELL],
        rows,
        y,
        np.ones(N, bool),
        memory_mb=mb if stream else 64,
        stream=stream,
        views=views,
        view_seed=seed,
    )


def test_the_schedule_shows_every_image_every_view_once_per_k_epochs(tagged):
    data = _data(tagged, False)
    for cycle in range(3):
        seen = np.stack([data.view_schedule(e) for e in range(cycle * K, (cycle + 1) * K)], axis=1)
        assert (np.sort(seen, axis=1) == np.arange(K)).all()  # a permutation of the K views per image
    first = np.stack([data.view_schedule(e) for e in range(K)], axis=1)
    second = np.stack([data.view_schedule(e) for e in range(K, 2 * K)], axis=1)
    assert (first != second).any()  # a new permutation every cycle
    assert len({tuple(r) for r in first}) > 1  # not one order for every image
    other = _data(tagged, False, seed=1)
    assert any((other.view_schedule(e) != data.view_schedule(e)).any() for e in range(K))
    # keyed by image id, not by position: a subset of rows gets the same views for its images
    sub = _data(tagged, False, rows=data.rows[::3])
    assert np.array_equal(sub.view_schedule(5), data.view_schedule(5)[::3])
    assert (_data(tagged, False, views=1).view_schedule(3) == 0).all()


@pytest.mark.parametrize("stream", [False, True])
def test_each_batch_reads_every_row_at_its_scheduled_view(tagged, stream):
    data = _data(tagged, stream)
    assert data.in_memory is (not stream)
    for epoch in range(K + 1):
        want_view = dict(zip(data.rows.tolist(), data.view_schedule(epoch).tolist()))
        gen = torch.Generator().manual_seed(7)
        rows = []
        for (x,), y in data.batches(16, gen, epoch):
            tag = x[:, 0, 0, 0].numpy().astype(np.int64)
            view, row = tag // 1000, tag % 1000
            assert [want_view[r] for r in row.tolist()] == view.tolist()
            assert np.array_equal(tagged.labels("train")[row], y.numpy())
            rows += row.tolist()
        assert sorted(rows) == data.rows.tolist()  # every row once per epoch
    # sequential (statistics, scoring) reads view 0
    assert all((x[:, 0, 0, 0].numpy() < 1000).all() for (x,), _ in data.sequential(10))


def test_in_memory_and_streamed_give_the_same_batches(tagged):
    a, b = _data(tagged, False), _data(tagged, True)
    for epoch in (0, 3, 6):
        ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        # the epoch order depends on the budget when streamed; compare the (row, view) pairs read
        pa = sorted(x[:, 0, 0, 0].tolist()[i] for (x,), _ in a.batches(16, ga, epoch) for i in range(len(x)))
        pb = sorted(x[:, 0, 0, 0].tolist()[i] for (x,), _ in b.batches(16, gb, epoch) for i in range(len(x)))
        assert pa == pb


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A store with K train views and M val noise draws (float32, separable classes), and a twin
    whose val view 0 is the mean of those draws (exact: quarter multiples)."""
    rng = np.random.default_rng(0)
    y, yv = np.arange(N) % 4, np.arange(NV) % 4
    centers = rng.normal(size=(4, C, P, P)) * 2

    def q(x):
        return (np.round(x * 4) / 4).astype(np.float32)

    train = {FeatureKey(90, 24, P, view=v): q(centers[y] + rng.normal(size=(N, C, P, P))) for v in range(K)}
    draws = [q(centers[yv] + 1.5 * rng.normal(size=(NV, C, P, P))) for _ in range(M)]
    root = tmp_path_factory.mktemp("drawn")
    a = write_synthetic_store(
        root / "a.zarr",
        {"train": train, "val": {FeatureKey(90, 24, P, draw=m): draws[m] for m in range(M)}},
        {"train": y, "val": yv},
        chunk_images=CHUNK,
        dtype="float32",
    )
    mean = np.mean(draws, axis=0, dtype=np.float64).astype(np.float32)
    b = write_synthetic_store(
        root / "b.zarr",
        {"train": train, "val": {FeatureKey(90, 24, P): mean}},
        {"train": y, "val": yv},
        chunk_images=CHUNK,
        dtype="float32",
    )
    return open_store(a), open_store(b), draws


def test_linear_noise_draw_averaging_equals_the_head_on_the_mean_draw(drawn):
    """A linear head's logits are affine in the features: the mean of its logits over M draws is
    its logits on the mean draw, scored here by an ordinary 1-draw probe on the twin store."""
    a, b, draws = drawn
    ra = linear_probe(a, *CELL, settings=PROBE, views=Views(1, M))
    rb = linear_probe(b, *CELL, settings=PROBE)
    assert ra.top1 == rb.top1 and ra.per_class == rb.per_class and ra.top5 == rb.top5
    one = linear_probe(a, *CELL, settings=PROBE)
    assert one.heldout_top1 == ra.heldout_top1  # training does not read val
    assert ra["noise_draws"] == M and ra.hyperparameters["noise_draws"] == M and one["noise_draws"] == 1
    assert ra.settings != one.settings and "views" not in one.hyperparameters


def test_attention_noise_draw_averaging_equals_the_average_of_m_evaluations(drawn):
    a, _, _ = drawn
    h = HeadsConfig(depth=1, dim=8, num_heads=2, epochs=1, batch_size=32)
    sel = select(a, 0, PROBE, "all")
    from diffprobe.probe.heads import AttentionHead

    torch.manual_seed(0)
    model = AttentionHead(C, P, 4, 8, 1, 2, 4.0)
    inputs = lambda xs: xs[0].float()  # noqa: E731
    avg, _ = val_logits(a, [CELL], sel, Views(1, M), lambda val: _predict([model], val, inputs)[0][0], memory_mb=64)
    separate = [_predict([model], val_part(a, [CELL], sel, memory_mb=64, draw=m), inputs)[0][0] for m in range(M)]
    torch.testing.assert_close(avg, sum(separate) / M)
    assert not torch.equal(separate[0], separate[1])
    r = attention_probe(a, *CELL, heads=h, settings=PROBE, views=Views("all", M))
    assert r["views"] == K and r["noise_draws"] == M and r.hyperparameters["views"] == K


def test_linear_probe_on_views_trains_and_records_them(drawn):
    a, _, _ = drawn
    r = linear_probe(a, *CELL, settings=PROBE, views=Views("all"))
    one = linear_probe(a, *CELL, settings=PROBE)
    assert r["views"] == K and r.hyperparameters["views"] == K and one["views"] == 1
    assert r.settings != one.settings and r.row()["settings"] == r.settings
    assert r.top1 > 0.5  # separable classes: views train a working head
    assert linear_probe(a, *CELL, settings=PROBE, views=Views(2)).settings != r.settings


def test_probe_view_refusals(drawn):
    a, b, _ = drawn
    with pytest.raises(
        StoreError, match=rf"^--views 5: .* holds {K} of block 24, t 90, pool 2 in split 'train'; allowed: 1-{K}"
    ):
        linear_probe(a, *CELL, settings=PROBE, views=Views(5))
    with pytest.raises(StoreError, match=r"^--noise-draws 2: .* holds 1 of block 24, t 90, pool 2 in split 'val'"):
        linear_probe(b, *CELL, settings=PROBE, views=Views(1, 2))
    with pytest.raises(StoreError, match=r"^--views 2: views are read per epoch, by recipe 'sgd' only"):
        linear_probe(a, *CELL, recipe="lbfgs", settings=PROBE, views=Views(2))
    with pytest.raises(StoreError, match=r"^--views: 0 is not allowed"):
        linear_probe(a, *CELL, settings=PROBE, views=Views(0))


def test_a_sweep_resumes_only_cells_of_the_same_views(drawn, tmp_path):
    from diffprobe.probe.sweep import sweep

    a, _, _ = drawn
    ledger = tmp_path / "ledger.csv"
    cells = [FeatureKey(90, 24, P)]
    first = sweep(a, cells, settings=PROBE, ledger=ledger, views=Views("all", M))
    assert first["trained"] == 1
    again = sweep(a, cells, settings=PROBE, ledger=ledger, views=Views(K, M))  # "all" is K here
    assert again["trained"] == 0 and again["cells"][0]["top1"] == first["cells"][0]["top1"]
    assert sweep(a, cells, settings=PROBE, ledger=ledger)["trained"] == 1  # 1 view: other settings
    assert sweep(a, cells, settings=PROBE, ledger=ledger, views=Views(2, M))["trained"] == 1


def test_cli_views_beyond_the_store_is_one_line_exit_2(drawn, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.probe.cli import probe_app as app

    a, _, _ = drawn
    for args, message in (
        (["--views", "9"], "--views 9: "),
        (["--views", "x"], "--views: 'x' is not allowed"),
        (["--noise-draws", "4"], "--noise-draws 4: "),
    ):
        r = CliRunner().invoke(
            app,
            [
                "linear",
                "--block",
                "24",
                "--t",
                "90",
                "--store",
                str(a.path),
                "--ledger",
                str(tmp_path / "l.csv"),
                *args,
            ],
        )
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "l.csv").exists()
