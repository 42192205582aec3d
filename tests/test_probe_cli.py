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
