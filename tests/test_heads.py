"""Attention head and DifFormer: the paper's configurations on ADM-256's block table (meta device)
with token and parameter counts computed here, learning on a small store of the embedded default,
the missing-feature message, the ledger's head columns, and `probe attention|fusion` via typer."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from diffprobe.extract.run import run as extract_run
from diffprobe.extract.unet import block_table, preset
from diffprobe.probe.attention import attention_probe, fusion_probe
from diffprobe.probe.cli import probe_app
from diffprobe.probe.heads import AttentionHead, FusionHead, auto_dim
from diffprobe.probe.ledger import COLUMNS_V2, LedgerError, append_row, read_rows, to_row
from diffprobe.probe.linear import linear_probe
from diffprobe.store.config import HeadsConfig
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import open_store

from .conftest import small_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ sizes, computed independently


def embed_params(c, p, d):  # LayerNorm over C x P x P (weight + bias), 1x1 conv C -> D with bias
    return 2 * c * p * p + c * d + d


def transformer_params(d, depth, mlp_ratio=4):
    hidden = mlp_ratio * d
    block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    return d + depth * block + 2 * d  # CLS, blocks, final LayerNorm


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _sequence_lengths(transformer):
    """Sequence length entering the first transformer block, once per call."""
    seen = []
    transformer.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def test_paper_configurations_on_adm256_block_table():
    table = block_table(preset("adm-256-uncond"))
    h = HeadsConfig()
    k = 1000
    # attention at block 24, pool 16: 256 tokens + CLS, D = 1024 (auto: block 24's channels)
    c24, s24 = table[24].channels, min(16, table[24].spatial)
    d = auto_dim([c24], h.num_heads)
    assert (c24, s24, d) == (1024, 16, 1024)
    with torch.device("meta"):
        head = AttentionHead(c24, s24, k, h.dim, h.depth, h.num_heads, h.mlp_ratio)
        seen = _sequence_lengths(head.transformer)
        assert tuple(head(torch.empty(2, c24, s24, s24)).shape) == (2, k)
    assert seen == [256 + 1]
    assert _count(head) == embed_params(1024, 16, 1024) + transformer_params(1024, 2) + 1024 * k + k
    # DifFormer 19/24/30 at pool 16 (19 is 8x8): 64 + 256 + 256 tokens + CLS per t, 3 timesteps
    inputs = [(table[b].channels, min(16, table[b].spatial)) for b in (19, 24, 30)]
    assert inputs == [(1024, 8), (1024, 16), (512, 16)]
    with torch.device("meta"):
        fusion = FusionHead(inputs, 3, k, h.dim, h.depth, h.num_heads, h.mlp_ratio)
        seen = _sequence_lengths(fusion.transformer)
        xs = [[torch.empty(2, c, p, p) for c, p in inputs] for _ in range(3)]
        assert tuple(fusion.tokens(xs[0]).shape) == (2, 64 + 256 + 256, 1024)
        assert tuple(fusion(xs).shape) == (2, k)
    assert seen == [64 + 256 + 256 + 1] * 3  # one shared transformer, once per t
    expected = sum(embed_params(c, p, 1024) for c, p in inputs) + transformer_params(1024, 2) + 3 * 1024 * k + k
    assert _count(fusion) == expected


def test_auto_dim_follows_the_model_and_explicit_sizes_are_kept():
    tiny = block_table(preset("tiny"))
    assert auto_dim([tiny[24].channels], 8) == 128
    assert auto_dim([36], 8) == 40  # rounded up to a multiple of the heads
    head = AttentionHead(128, 2, 10, dim=64, depth=1, num_heads=4, mlp_ratio=2.0)
    assert _count(head) == embed_params(128, 2, 64) + transformer_params(64, 1, 2) + 64 * 10 + 10


# ------------------------------------------------------------------ learning on the embedded default


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The embedded default (digits x tiny U-Net), 12 images per class per split, blocks 19/24/30."""
    cfg = small_config(
        tmp_path_factory.mktemp("heads"),
        **{
            "data.max_per_class": 12,
            "extract.blocks": "19,24,30",
            "extract.timesteps": [90, 150],
            "extract.pools": [1, 2, 4],
            "extract.forward_batch": 32,
            "extract.batch_size": 64,
            "store.chunk_images": 64,
        },
    )
    extract_run(cfg)
    return open_store(cfg.store.path)


FAST = HeadsConfig(epochs=12, step_size=9, batch_size=16, attention_lr=(0.05,), fusion_lr=(0.05,))


def _check_scores(r, store):
    """top-1 equals the class-size-weighted per-class accuracy; n_val and labels agree with the store."""
    y = store.labels("val")
    counts = {name: int((y == c).sum()) for c, name in enumerate(store.class_names)}
    assert r["n_val"] == len(y)
    assert r["top1"] == pytest.approx(sum(r["per_class"][n] * counts[n] for n in counts) / len(y))
    assert r["top1"] <= r["top5"] <= 1.0


def test_attention_head_learns_and_compares_with_the_linear_probe(store):
    r = attention_probe(store, 24, 150, heads=FAST)
    assert r["stored_pool"] == 2 and r["architecture"]["tokens"] == 4  # block 24 is 2x2 in the tiny model
    assert r["architecture"]["parameters"] == embed_params(128, 2, 128) + transformer_params(128, 2) + 128 * 10 + 10
    assert r["top1"] > 0.5, r["top1"]  # chance: 0.1
    _check_scores(r, store)
    lin = linear_probe(store, 24, 150, 2)
    assert lin["top1"] > 0.5
    assert r["n_train"] == lin["n_train"] and r["n_heldout"] == lin["n_heldout"]  # the same held-out part
    again = attention_probe(store, 24, 150, heads=FAST)
    assert again["top1"] == r["top1"] and again["per_class"] == r["per_class"]  # seeded


def test_attention_with_more_tokens_and_a_label_subset(store):
    r = attention_probe(store, 30, 90, pool=4, heads=FAST, subset="shots:6")
    assert r["stored_pool"] == 4 and r["architecture"]["tokens"] == 16 and r["n_train"] == 60
    lin = linear_probe(store, 30, 90, 4, subset="shots:6")
    assert r["top1"] > 0.25 and lin["top1"] > 0.25, (r["top1"], lin["top1"])  # 60 images; chance: 0.1


def test_fusion_learns_with_its_token_counts(store):
    r = fusion_probe(store, [19, 24, 30], [90, 150], pool=4, heads=FAST)
    assert r["stored_pools"] == [1, 2, 4] and r["architecture"]["tokens"] == 1 + 4 + 16
    assert r["block"] is None and r["blocks"] == [19, 24, 30] and r["timesteps"] == [90, 150]
    inputs = [(128, 1), (128, 2), (64, 4)]
    assert r["architecture"]["parameters"] == (
        sum(embed_params(c, p, 128) for c, p in inputs) + transformer_params(128, 2) + 2 * 128 * 10 + 10
    )
    assert r["top1"] > 0.5, r["top1"]
    _check_scores(r, store)


def test_missing_features_name_the_cell_and_the_extract_run(store):
    # block 24 is 2x2, so pool 8 is its stored pool 2; block 30 (8x8) was stored at pools 1, 2, 4 only
    with pytest.raises(
        StoreError,
        match=r"no complete features for block 30, t 90, pool 8; add them with "
        r"`extract run --store \S+ --blocks 30 --t 90 --pool 8`",
    ):
        fusion_probe(store, [24, 30], [90], pool=8, heads=FAST)
    with pytest.raises(StoreError, match=r"block 19, t 300, pool 1 \(and 1 more\).*--blocks 19,24 --t 300"):
        fusion_probe(store, [19, 24], [300], heads=FAST)


# ------------------------------------------------------------------ ledger and CLI


def test_ledger_head_columns_and_version_2_ledgers(tmp_path):
    base = {c: 1 for c in COLUMNS_V2} | {"hyperparameters": {}, "per_class": {}, "recipe": "sgd", "store": "s"}
    fusion = base | {"head": "fusion", "block": None, "t": None, "blocks": [19, 24, 30], "timesteps": [90, 150]}
    new = tmp_path / "new.csv"
    append_row(new, base)  # a linear result: no head keys
    append_row(new, fusion)
    rows = read_rows(new)
    assert [r["head"] for r in rows] == ["linear", "fusion"]
    assert rows[0]["blocks"] == [1] and rows[1]["block"] is None and rows[1]["timesteps"] == [90, 150]
    old = tmp_path / "old.csv"  # written before the head columns
    with open(old, "w", newline="") as f:
        csv.writer(f).writerow(COLUMNS_V2)
        csv.DictWriter(f, COLUMNS_V2).writerow({c: to_row(base)[c] for c in COLUMNS_V2})
    append_row(old, base)  # linear rows still go in, in the old columns
    with pytest.raises(LedgerError, match="linear-probe rows only"):
        append_row(old, fusion)
    rows = read_rows(old)
    assert len(rows) == 2 and all(r["head"] == "linear" and r["blocks"] == [1] for r in rows)
    assert old.read_text().splitlines()[0] == ",".join(COLUMNS_V2)


def test_cli_attention_json_and_ledger(store, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text("[heads]\nepochs = 2\nbatch_size = 32\n")
    ledger = tmp_path / "l.csv"
    res = runner.invoke(
        probe_app,
        [
            "attention",
            "--block",
            "24",
            "--t",
            "90",
            "--store",
            str(store.path),
            "--config",
            str(cfg),
            "--ledger",
            str(ledger),
            "--shots",
            "5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    for key in ("top1", "top5", "block", "t", "pool", "recipe", "subset", "subset_sha", "architecture"):
        assert key in r
    assert r["subset"] == "shots:5" and r["n_train"] == 50 and r["head"] == "attention"
    (row,) = read_rows(ledger)
    assert row["head"] == "attention" and row["top1"] == r["top1"] and row["blocks"] == [24]
    assert row["hyperparameters"]["tokens"] == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["fusion", "--blocks", "19,24", "--t", "90,600"], "extract run --store"),
        (
            ["attention", "--block", "99", "--t", "90"],
            "--block: 99 is not a block of this store; its model has blocks 1-37",
        ),
        (
            ["attention", "--block", "0", "--t", "90"],
            "--block: 0 is not a block of this store; its model has blocks 1-37",
        ),
        (["fusion", "--blocks", "19,x"], "--blocks: cannot read"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(store, tmp_path, args, message):
    res = runner.invoke(probe_app, args + ["--store", str(store.path), "--ledger", str(tmp_path / "l.csv")])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
