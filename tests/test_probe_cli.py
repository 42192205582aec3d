"""`probe --help` text: config sections in brackets are shown (not eaten as markup), flags show
no metavar, every option left unset names its config key and built-in default, ``--block`` is
the block the head reads in every command, and ``--pool`` says its default everywhere."""

import re

import pytest
from typer.testing import CliRunner

from diffprobe.probe.cli import probe_app
from diffprobe.store.config import Config

runner = CliRunner()
COMMANDS = ["linear", "sweep", "attention", "fusion", "feedback"]


def _help(command: str) -> str:
    res = runner.invoke(probe_app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", res.output)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_no_bool_metavar(command):
    text = _help(command)
    assert "<bool>" not in text and "--json Print one JSON object" in text
    assert f"(default: probe.seed, built-in {Config().probe.seed})" in text
    assert "(default: probe.ledger, built-in probe-results.csv)" in text
    pool = text[text.index("--pool") :].split(" --", 1)[0]
    assert "default" in pool and "capped at" in pool, pool


def test_config_sections_in_brackets_are_shown():
    assert "[heads] in pipeline.toml" in _help("attention")
    assert "[model] and [data] as for `extract run`" in _help("feedback")


def test_block_is_the_block_the_head_reads_everywhere():
    for command in ("linear", "attention"):
        assert "--block <int> The block the head reads" in _help(command)
    text = _help("feedback")
    assert "--block <int> The block the head reads" in text and "(default: heads.feedback_target, built-in 24)" in text
    assert "--feedback-blocks <str> Decoder blocks fed back." in text and "--target" not in text


def test_every_pool_default_is_a_config_key_of_the_commands_section(tmp_path):
    import json

    import numpy as np

    from diffprobe.analyze.cli import analyze_app
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    feats = {
        FeatureKey(90, b, p): (rng.normal(size=(64, 4, p, p)) + y[:, None, None, None]).astype(np.float16)
        for b in (23, 24)
        for p in (1, 2)
    }
    blocks = [{"number": b, "module": f"m{b}", "channels": 4, "spatial": 2} for b in range(1, 38)]
    store = write_synthetic_store(
        tmp_path / "s.zarr", {"train": feats, "val": feats}, {"train": y, "val": y}, blocks=blocks
    )
    config = tmp_path / "p.toml"
    config.write_text("[probe]\npool = 1\n[analyze]\npool = 2\n")
    args = ["--store", str(store), "--config", str(config), "--json"]
    for command in (
        ["linear", "--ledger", str(tmp_path / "l.csv")],
        ["knn", "--k", "3", "--ledger", str(tmp_path / "k.csv")],
    ):
        r = runner.invoke(probe_app, [*command, "--block", "24", "--t", "90", *args])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.strip().splitlines()[-1])["stored_pool"] == 1  # probe.pool
        r = runner.invoke(probe_app, [*command, "--block", "24", "--t", "90", "--pool", "2", *args])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.strip().splitlines()[-1])["stored_pool"] == 2  # --pool wins
    r = runner.invoke(analyze_app, ["cka", "--t", "90", "--no-plots", *args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pool"] == 2  # analyze.pool; built-in 0 reads the smallest held
    r = runner.invoke(analyze_app, ["cka", "--t", "90", "--no-plots", "--store", str(store), "--json"])
    assert json.loads(r.stdout)["pool"] == 1
    for command, key in (("linear", "probe.pool"), ("knn", "probe.pool"), ("attention", "heads.pool")):
        assert key in _help(command)
