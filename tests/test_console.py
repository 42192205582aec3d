"""store/console.py: every CLI's usage mistakes are the project's one line (exit 2), and
--help shows flags without a metavar and config defaults."""

import pytest
from typer.testing import CliRunner

from diffprobe.analyze.cli import analyze_app
from diffprobe.extract.cli import app as extract_app
from diffprobe.probe.cli import probe_app

runner = CliRunner()


@pytest.mark.parametrize(
    "app,args,line",
    [
        (extract_app, ["run", "--workers", "-1"], "error: --workers: -1 is out of range; allowed: 0-4096"),
        (
            probe_app,
            ["linear", "--block", "24", "--t", "90", "--pool", "0"],
            "error: --pool: 0 is out of range; allowed: 1 or more",
        ),
        (probe_app, ["linear", "--block", "24", "--t", "-1"], "error: --t: -1 is out of range; allowed: 0 or more"),
        (probe_app, ["linear", "--t", "90"], "error: --block: required; see --help"),
        (analyze_app, ["cka", "--pool", "0"], "error: --pool: 0 is out of range; allowed: 1 or more"),
        (analyze_app, ["nope"], "error: no such command 'nope'"),
        (extract_app, ["plan", "--blok", "3"], "error: no such option: --blok"),
        (extract_app, ["run", "--batch-size", "x"], "error: --batch-size: x: input should be a valid integer"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(app, args, line):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, r.stderr
    assert "Usage" not in r.output and "╭" not in r.output


def test_help_shows_config_defaults_and_no_bool_metavar():
    r = runner.invoke(extract_app, ["run", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "<bool>" not in r.stdout
    assert "(extract.blocks). [default: (1-37)]" in r.stdout
    assert "(extract.batch_size). [default: (64)]" in r.stdout
