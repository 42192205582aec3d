"""The CLIs through typer's runner: output, --json, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffprobe.analyze.cli import analyze_app
from diffprobe.extract.cli import app
from diffprobe.probe.cli import probe_app

runner = CliRunner()


def _toml(tmp_path, extra=""):
    p = tmp_path / "small.toml"
    p.write_text(
        '[data]\nmax_per_class = 2\n[extract]\nblocks = "8,24"\ntimesteps = [90]\nforward_batch = 8\n'
        f'device = "cpu"\n[store]\nchunk_images = 8\npath = "{tmp_path / "s.zarr"}"\n' + extra
    )
    return p


def test_blocks_json_and_table():
    r = runner.invoke(app, ["blocks", "--json"])
    assert r.exit_code == 0
    table = json.loads(r.stdout)["blocks"]
    assert len(table) == 37 and table[18] == {"number": 19, "module": "middle_block", "channels": 128, "spatial": 1}
    r = runner.invoke(app, ["blocks", "--preset", "adm-256-uncond"])
    assert r.exit_code == 0 and "middle_block" in r.stdout and "1024" in r.stdout


def test_plan_shows_shapes_bytes_forwards_and_caps(tmp_path):
    r = runner.invoke(app, ["plan", "--config", str(_toml(tmp_path)), "--pool", "1,2", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["forwards"] == 40 and p["splits"] == {"train": 20, "val": 20}
    shapes = {(a["split"], a["name"]): a["shape"] for a in p["arrays"]}
    assert shapes[("train", "t90_b24_p2")] == [20, 128, 2, 2]
    assert p["bytes"] == sum(a["bytes"] for a in p["arrays"]) == 2 * (20 * 64 * 5 + 20 * 128 * 5) * 2
    r = runner.invoke(app, ["plan", "--config", str(_toml(tmp_path)), "--blocks", "16", "--pool", "1,2"])
    assert "block 16: pool 2 capped at its 1x1 map" in r.stdout
    assert not (tmp_path / "s.zarr").exists()  # a plan writes nothing


def test_run_status_and_resume(tmp_path):
    cfg = str(_toml(tmp_path))
    r = runner.invoke(app, ["run", "--config", cfg, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chunks_written"] == 6
    r = runner.invoke(app, ["status", "--config", cfg, "--json"])
    st = json.loads(r.stdout)["splits"]["train"]
    assert st["images"] == 20 and st["complete_arrays"] == len(st["arrays"]) == 4
    r = runner.invoke(app, ["run", "--config", cfg, "--t", "90"])
    assert r.exit_code == 0 and "0 chunks written, 6 already complete" in r.stdout
    r = runner.invoke(app, ["status", "--config", cfg])
    assert "4/4 arrays complete" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--blocks", "24,40"], "block 40 does not exist: this model has blocks 1-37"),
        (["run", "--blocks", "a-b"], "extract.blocks: cannot read 'a-b'"),
        (["run", "--t", "1000"], "extract.timesteps: t 1000 is out of range; this diffusion has t 0-999"),
        (["run", "--pool", "0"], "extract.pools: 0 is out of range"),
        (["run", "--batch-size", "0"], "extract.batch_size: 0 is out of range"),
        (["plan", "--device", "gpu"], "error: no such option"),
        (["run", "--device", "gpu"], "extract.device: 'gpu' is not a device"),
        (["status", "--store", "/nonexistent/x.zarr"], "no diffprobe store here"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = runner.invoke(app, [*args, "--config", str(_toml(tmp_path))] if args[0] != "status" else args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "s.zarr").exists()  # nothing written


def test_bad_config_file_exit_2(tmp_path):
    bad = _toml(tmp_path, '[model]\nchekpoint = "x.pt"\n')
    r = runner.invoke(app, ["run", "--config", str(bad)])
    assert r.exit_code == 2
    assert "model.chekpoint: unknown key" in r.output and "allowed: preset, checkpoint, arch" in r.output
    bad = _toml(tmp_path, '[model]\ncheckpoint = "/nope/x.pt"\n')
    r = runner.invoke(app, ["run", "--config", str(bad)])
    assert r.exit_code == 2 and "model.checkpoint: no such file '/nope/x.pt'" in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_messages_with_brackets_print_intact(tmp_path):
    bad = tmp_path / "b.toml"
    bad.write_text("extract = 3\n")
    r = runner.invoke(app, ["plan", "--config", str(bad)])
    assert r.exit_code == 2 and "extract: expected a [extract] table" in r.output


@pytest.mark.parametrize(
    "arch,message",
    [
        ("num_channels = 16", "model.arch: the flags of preset 'tiny'"),
        ('noise_schedule = "cos"', "do not build a guided-diffusion U-Net"),
        ("image_size = 48", "do not build a guided-diffusion U-Net"),
        ('channel_mult = "1,2"', "model.arch.channel_mult: '1,2' is not a valid tuple of positive integers"),
        ("widht = 3", "model.arch.widht: unknown flag"),
    ],
)
def test_bad_arch_flags_are_one_line_errors(tmp_path, arch, message):
    cfg = _toml(tmp_path, f'[model]\ncheckpoint = "x.pt"\n[model.arch]\n{arch}\n')
    r = runner.invoke(app, ["plan", "--config", str(cfg)])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_probe_and_analyze_show_help():
    for a in (probe_app, analyze_app):
        r = runner.invoke(a, [])
        assert r.exit_code == 0 and "Usage" in r.output


def test_console_scripts_resolve_to_the_cli_functions():
    """The installed entry points (not pyproject's text) name callables of the diffprobe namespace."""
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.value.startswith("diffprobe.")}
    assert set(scripts) >= {"extract", "probe", "analyze"}
    for name in ("extract", "probe", "analyze"):
        assert callable(scripts[name].load())
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.argv = ['{name}', '--help']; "
                f"from {scripts[name].module} import {scripts[name].attr} as m; m()",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_only_the_diffprobe_namespace_is_installed(tmp_path):
    """No top-level `store`, `extract`, `probe` or `analyze` package: those names belong to others on PyPI."""
    code = "import importlib.util as u; print([n for n in ('store', 'extract', 'probe', 'analyze') if u.find_spec(n)])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
