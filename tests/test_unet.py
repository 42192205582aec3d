import json

import pytest
import torch

from diffprobe.extract.unet import (
    TINY_CHECKPOINT,
    block_modules,
    block_table,
    build_diffusion,
    build_model,
    capture,
    file_sha256,
    load_checkpoint,
    preset,
)
from diffprobe.store.errors import BlockError, CheckpointError


def _per_block(ranges):
    """Expand (value, lo, hi) ranges into one value per block 1..37."""
    out = {}
    for value, lo, hi in ranges:
        for b in range(lo, hi + 1):
            out[b] = value
    return [out[b] for b in range(1, 38)]


def test_adm256_block_table_matches_the_published_architecture():
    """ADM-256's channels and map sizes per block, written out independently from guided-diffusion's
    flags (num_channels 256, channel_mult 1,1,2,2,4,4, 2 res blocks, resblock_updown): 3 blocks per
    level on the way down after the stem, the middle block, 3 per level on the way up (README,
    "Concepts"; extract/unet.py derives them from the model instead)."""
    table = block_table(preset("adm-256-uncond"))  # meta device: no weights allocated
    channels = _per_block([(256, 1, 7), (512, 8, 13), (1024, 14, 25), (512, 26, 31), (256, 32, 37)])
    spatial = _per_block(
        [
            (256, 1, 3),
            (128, 4, 6),
            (64, 7, 9),
            (32, 10, 12),
            (16, 13, 15),
            (8, 16, 21),
            (16, 22, 24),
            (32, 25, 27),
            (64, 28, 30),
            (128, 31, 33),
            (256, 34, 37),
        ]
    )
    assert len(table) == 37
    assert [b.channels for b in table.blocks] == channels
    assert [b.spatial for b in table.blocks] == spatial
    assert table[19].module == "middle_block" and table[1].module == "input_blocks.0"
    assert table[37].module == "output_blocks.17"


def test_tiny_shares_the_37_block_topology():
    table = block_table(preset("tiny"))
    assert len(table) == 37
    assert [b.spatial for b in table.blocks if b.spatial == 1] == [1] * 6
    assert [b.number for b in table.blocks if b.spatial == 1] == list(range(16, 22))


def test_block_numbers_are_checked():
    table = block_table(preset("tiny"))
    with pytest.raises(BlockError, match="block 38 does not exist: this model has blocks 1-37"):
        table.check([24, 38])
    with pytest.raises(BlockError, match="block 0 does not exist"):
        table[0]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    load_checkpoint(model, TINY_CHECKPOINT)
    return model


def _reference_forward(model, x, t):
    """Every block's output from a plain loop over the modules, written out here on purpose
    (the independent check of the hook-based capture)."""
    from guided_diffusion.nn import timestep_embedding

    emb = model.time_embed(timestep_embedding(t, model.model_channels))
    outs, hs, h = [], [], x
    for m in model.input_blocks:
        h = m(h, emb)
        hs.append(h)
        outs.append(h)
    h = model.middle_block(h, emb)
    outs.append(h)
    for m in model.output_blocks:
        h = m(torch.cat([h, hs.pop()], dim=1), emb)
        outs.append(h)
    return outs, model.out(h)


def test_capture_equals_a_plain_forward_and_truncation_changes_nothing(tiny):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    t = torch.tensor([90, 150, 300])
    with torch.no_grad():
        ref, final = _reference_forward(tiny, x, t)
        assert torch.equal(final, tiny(x, t))  # the reference loop is the model's own forward
        every = capture(tiny, x, t, range(1, 38))
        for b in range(1, 38):
            assert torch.equal(every[b], ref[b - 1]), b
        for subset in ([5], [19, 24], [2, 30, 37]):
            part = capture(tiny, x, t, subset)
            assert sorted(part) == subset
            for b in subset:
                assert torch.equal(part[b], ref[b - 1]), b


def test_capture_stops_after_the_deepest_block(tiny):
    ran = []
    modules = block_modules(tiny)
    handles = [m.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, (_, m) in enumerate(modules, 1)]
    handles.append(tiny.out.register_forward_hook(lambda *_: ran.append("out")))
    try:
        with torch.no_grad():
            capture(tiny, torch.randn(1, 3, 32, 32), torch.tensor([90]), [3, 7])
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(1, 8))
    assert all(not m._forward_hooks or True for _, m in modules)  # hooks are removed again:
    assert sum(len(m._forward_hooks) for _, m in modules) == 0


def test_capture_takes_numpy_block_numbers(tiny):
    import numpy as np

    out = capture(tiny, torch.randn(1, 3, 32, 32), torch.tensor([90]), np.array([19, 24]))
    assert sorted(out) == [19, 24]


def test_capture_rejects_bad_blocks(tiny):
    with pytest.raises(BlockError, match="block 40 does not exist: this model has blocks 1-37"):
        capture(tiny, torch.randn(1, 3, 32, 32), torch.tensor([90]), [24, 40])


# ------------------------------------------------------------------ checkpoints


def _save(tmp_path, state, name="ckpt.pt"):
    p = tmp_path / name
    torch.save(state, p)
    return p


def test_checkpoint_errors_name_the_key_and_shapes(tmp_path):
    spec = preset("tiny")
    state = build_model(spec).state_dict()
    model = build_model(spec)

    missing = dict(state)
    del missing["out.2.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'out\.2\.weight' \(model expects shape \(6, 32, 3, 3\)\)"):
        load_checkpoint(model, _save(tmp_path, missing))

    extra = dict(state, **{"label_emb.weight": torch.zeros(1000, 128)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'label_emb\.weight' \(shape \(1000, 128\)\)"):
        load_checkpoint(model, _save(tmp_path, extra))

    wrong = dict(state, **{"input_blocks.0.0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch at 'input_blocks\.0\.0\.weight': checkpoint "
        r"\(64, 3, 3, 3\), model \(32, 3, 3, 3\)",
    ):
        load_checkpoint(model, _save(tmp_path, wrong))

    adm = build_model(preset("adm-256-uncond"), device="meta")
    with pytest.raises(CheckpointError, match="shape mismatch at 'time_embed.0.weight'"):
        load_checkpoint(adm, TINY_CHECKPOINT)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage.pt: not a torch.save file of tensors \(") as e:
        load_checkpoint(model, garbage)
    assert "weights_only" not in str(e.value)

    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        load_checkpoint(model, _save(tmp_path, {"step": 3}))

    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(model, tmp_path / "absent.pt")


def test_checkpoint_loads_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle
    import warnings

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=4)  # a plain pickle: torch warns before refusing it
    for path, why in (
        (_save(tmp_path, {"x": Evil()}), "holds pickled Python objects besides tensors"),
        (evil, "not a torch.save file of tensors"),
    ):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError, match=why) as e:
                load_checkpoint(build_model(preset("tiny")), path)
        assert "weights_only" not in str(e.value) and not shown  # torch's warning and advice stay off screen


# ------------------------------------------------------------------ the shipped model


def test_shipped_checkpoint_matches_its_model_card():
    card = (TINY_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    log = json.loads((TINY_CHECKPOINT.parent / "training_log.json").read_text())
    sha = file_sha256(TINY_CHECKPOINT)
    assert sha in card and log["sha256"] == sha
    assert TINY_CHECKPOINT.stat().st_size <= 20 * 1024 * 1024
    assert (TINY_CHECKPOINT.parent / "reconstructions.png").stat().st_size > 0


def test_shipped_model_learned_to_denoise(tiny):
    """On val digits, the trained network's noise MSE is far below the untrained network's."""
    from diffprobe.extract.images import DigitsSource
    from diffprobe.extract.train_tiny import eps_mse

    source = DigitsSource(32)
    ids = list(source.split("val").ids[:64])
    x0 = torch.from_numpy(__import__("numpy").stack(source.load("val", ids)))
    diffusion = build_diffusion(preset("tiny"))
    torch.manual_seed(0)
    untrained = build_model(preset("tiny")).eval()
    for t in (90, 150, 300):
        trained_mse = eps_mse(tiny, diffusion, x0, t, seed=0)
        untrained_mse = eps_mse(untrained, diffusion, x0, t, seed=0)
        assert trained_mse < 0.5 * untrained_mse, (t, trained_mse, untrained_mse)
