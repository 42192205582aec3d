"""DifFeed: the decoder -> encoder pairing against the U-Net's own skip connections, zero feedback
reproducing the first pass, the injection (resized), gradients, learning on the embedded default,
and `probe feedback` errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from diffprobe.extract import job as jobs
from diffprobe.extract.extraction import pool_features
from diffprobe.extract.run import run as extract_run
from diffprobe.extract.unet import (
    TINY_CHECKPOINT,
    block_modules,
    block_table,
    build_model,
    capture,
    load_checkpoint,
    preset,
)
from diffprobe.probe import feedback as fb
from diffprobe.probe.cli import probe_app
from diffprobe.probe.feedback import DifFeed, skip_pairs
from diffprobe.probe.ledger import read_rows
from diffprobe.probe.linear import store_fingerprint
from diffprobe.store.errors import BlockError
from diffprobe.store.feature_store import open_store

from .conftest import small_config
from .test_heads import embed_params, transformer_params

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _skip_channels_agree(spec, pairs):
    """Independently of the trace: each output block's first layer takes (previous block's channels +
    the paired encoder block's channels) at the encoder block's spatial size, and every input
    block is popped exactly once."""
    model = build_model(spec, device="meta")
    table = block_table(spec)
    names = [name for name, _ in block_modules(model)]
    decoders = [n for n, name in enumerate(names, start=1) if name.startswith("output_blocks")]
    encoders = [n for n, name in enumerate(names, start=1) if name.startswith("input_blocks")]
    assert sorted(pairs) == decoders and sorted(pairs.values()) == encoders
    for d, e in pairs.items():
        first = block_modules(model)[d - 1][1][0]  # a ResBlock; in_layers[0] is its GroupNorm
        assert first.in_layers[0].num_channels == table[d - 1].channels + table[e].channels
        assert table[d - 1].spatial == table[e].spatial


def test_adm256_pairing_is_the_skip_connections():
    spec = preset("adm-256-uncond")
    pairs = skip_pairs(spec)
    paper = {21: 17, 24: 14, 27: 11, 30: 8, 33: 5, 36: 2}
    assert {d: pairs[d] for d in paper} == paper
    _skip_channels_agree(spec, pairs)
    # the paper's DifFeed builds and runs on ADM-256 (meta device: shapes only, no weights)
    table = block_table(spec)
    unet = build_model(spec, device="meta").eval().requires_grad_(False)
    with torch.device("meta"):
        model = DifFeed(unet, table, pairs, list(paper), 24, 16, 1000).train()
        logits = model(torch.empty(2, 3, 256, 256), torch.zeros(2, dtype=torch.long))
    assert tuple(logits.shape) == (2, 1000) and model.pool == 16
    expected = sum(table[d].channels * table[e].channels + 3 * table[e].channels for d, e in paper.items())
    assert (
        sum(p.numel() for p in model.feedback.parameters())
        == expected
        == 2 * (1024 * 1024 + 512 * 512 + 256 * 256 + 3 * (1024 + 512 + 256))
    )
    assert sum(p.numel() for p in model.head.parameters()) == (
        embed_params(1024, 16, 1024) + transformer_params(1024, 2) + 1024 * 1000 + 1000
    )


def test_pairing_follows_another_topology():
    spec = preset(
        "tiny",
        image_size=16,
        num_res_blocks=1,
        channel_mult=(1, 2, 2),
        attention_resolutions=(4,),
        num_channels=32,
        num_head_channels=32,
    )
    pairs = skip_pairs(spec)
    assert len(block_table(spec)) == 13 and len(pairs) == 6  # 6 input blocks, middle, 6 output blocks
    _skip_channels_agree(spec, pairs)


@pytest.fixture(scope="module")
def tiny():
    spec = preset("tiny")
    unet = build_model(spec)
    load_checkpoint(unet, TINY_CHECKPOINT)
    return unet.eval().requires_grad_(False), block_table(spec), skip_pairs(spec)


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.full((n,), 150, dtype=torch.long)


def test_zero_feedback_reproduces_the_first_pass_exactly(tiny):
    unet, table, pairs = tiny
    blocks = [21, 22, 24, 27, 30, 33, 36]  # 22 (2x2) feeds encoder block 16 (1x1): resized
    model = DifFeed(unet, table, pairs, blocks, 24, 16, 10).train()
    for layer in model.feedback.values():
        torch.nn.init.zeros_(layer[0].weight)
        torch.nn.init.zeros_(layer[0].bias)  # BatchNorm of zeros is its bias (0), ReLU keeps 0
    x, t = _inputs()
    first = model.first_pass(x, t)
    assert sorted(first) == blocks
    plain = capture(unet, x, t, blocks + [24])
    assert all(torch.equal(first[b], plain[b]) for b in blocks)
    assert torch.equal(model.second_pass(x, t, first), plain[24])


def test_feedback_is_added_resized_to_its_encoder_block_and_only_it_trains(tiny):
    unet, table, pairs = tiny
    model = DifFeed(unet, table, pairs, [22], 17, 16, 10).train()
    x, t = _inputs()
    first = model.first_pass(x, t)
    model.target = 16  # read the encoder block itself
    fed = model.second_pass(x, t, first)
    added = model.feedback["22"](first[22])  # (N, 128, 2, 2) -> block 16 is 1x1
    assert added.shape[-1] == 2 and fed.shape[-1] == 1
    expected = capture(unet, x, t, [16])[16] + F.adaptive_avg_pool2d(added, 1)
    assert torch.allclose(fed, expected, atol=1e-6) and not torch.equal(fed, capture(unet, x, t, [16])[16])
    model.target = 24
    loss = model(x, t).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"feedback", "head"}


def test_bad_blocks_are_errors(tiny):
    unet, table, pairs = tiny
    with pytest.raises(BlockError, match=r"block 19 \(middle_block\) takes no skip connection; .* 20-37"):
        DifFeed(unet, table, pairs, [19], 24, 2, 10)
    with pytest.raises(BlockError, match=r"block 8 is not after encoder block 8"):
        DifFeed(unet, table, pairs, [30], 8, 2, 10)


def test_feedback_learns_on_the_embedded_default_and_shares_the_store_noise(tmp_path):
    over = {
        "data.max_per_class": 10,
        "extract.blocks": "24",
        "extract.timesteps": [150],
        "extract.pools": [2],
        "store.chunk_images": 64,
        "extract.forward_batch": 32,
        "extract.batch_size": 64,
        "heads.epochs": 5,
        "heads.step_size": 4,
        "heads.feedback_batch_size": 16,
        "heads.feedback_lr": [0.05],
        "probe.device": "cpu",
        "probe.ledger": str(tmp_path / "ledger.csv"),
    }
    cfg = small_config(tmp_path, **over)
    extract_run(cfg)
    store = open_store(cfg.store.path)
    r = fb.run(cfg)
    assert r["top1"] > 0.5, r["top1"]  # chance: 0.1
    assert r["pairs"] == {"21": 17, "24": 14, "27": 11, "30": 8, "33": 5, "36": 2} and r["target"] == 24
    assert r["n_train"] + r["n_heldout"] == len(store.labels("train")) and r["n_val"] == len(store.labels("val"))
    table = block_table(preset("tiny"))  # Conv1x1 (weight + bias) + BatchNorm (weight + bias) per pair
    feedback = sum(
        table[d].channels * table[e].channels + 3 * table[e].channels
        for d, e in {21: 17, 24: 14, 27: 11, 30: 8, 33: 5, 36: 2}.items()
    )
    head = embed_params(128, 2, 128) + transformer_params(128, 2) + 128 * 10 + 10
    assert r["architecture"]["feedback_parameters"] == feedback
    assert r["architecture"]["parameters"] == feedback + head and r["architecture"]["tokens"] == 4
    # the row sits beside the store's rows: same fingerprint as the store made with this config
    (row,) = read_rows(tmp_path / "ledger.csv")
    assert row["head"] == "feedback" and row["fingerprint"] == store_fingerprint(store)
    assert row["blocks"] == [21, 24, 27, 30, 33, 36] and row["top1"] == r["top1"]
    # the first pass sees the store's x_t: its block 24 (pooled, fp16) is the stored feature
    job = jobs.prepare(cfg)
    unet = build_model(job.spec)
    load_checkpoint(unet, job.checkpoint)
    data = fb.Images(job.source, job.diffusion, "val", np.arange(8), 150, cfg.extract.noise_seed, torch.device("cpu"))
    x = data.x_t(list(range(8)))
    with torch.no_grad():
        ours = pool_features(capture(unet.eval(), x, torch.full((8,), 150), [24])[24], 2).half().numpy()
    stored = store.features("val", 24, 150, 2)[:8]
    np.testing.assert_allclose(ours.astype(np.float32), stored.astype(np.float32), atol=2e-3, rtol=2e-3)


def test_cli_feedback_errors_are_one_line(tmp_path):
    res = runner.invoke(probe_app, ["feedback", "--feedback-blocks", "19", "--store", str(tmp_path / "s.zarr")])
    assert res.exit_code == 2 and "takes no skip connection" in res.output
    assert len(res.output.strip().splitlines()) == 1
    for block in ("0", "38"):  # the config's model (tiny: 37 blocks) bounds --block, before its checkpoint loads
        res = runner.invoke(probe_app, ["feedback", "--block", block, "--store", str(tmp_path / "s.zarr")])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert f"--block: {block} is not a block of this model; it has blocks 1-37" in res.output
