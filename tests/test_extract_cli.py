"""`extract plan` from counts alone, with per-split subtotals and a free-space warning;
`extract status` pools per block; `extract blocks --store` prints the store's own table."""

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from diffprobe.extract.cli import app
from diffprobe.store.feature_store import FeatureKey
from diffprobe.store.synthetic import write_synthetic_store

runner = CliRunner()


def test_plan_from_counts_alone(tmp_path):
    args = ["plan", "--images", "train=1281167,val=50000", "--blocks", "19,24", "--t", "90", "--pool", "2"]
    r = runner.invoke(app, [*args, "--store", str(tmp_path / "none" / "s.zarr"), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["splits"] == {"train": 1281167, "val": 50000} and p["forwards"] == 1331167
    channels = {a["block"]: a["shape"][1] for a in p["arrays"]}
    pools = {a["block"]: a["pool"] for a in p["arrays"]}
    assert p["bytes"] == sum(n * channels[b] * pools[b] ** 2 * 2 for n in (1281167, 50000) for b in (19, 24))
    assert abs(p["free_bytes"] - shutil.disk_usage(tmp_path).free) < 2**30  # other processes write meanwhile
    r = runner.invoke(app, [*args, "--store", str(tmp_path / "s.zarr")], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    train = sum(a["bytes"] for a in p["arrays"] if a["split"] == "train")
    assert any(line.startswith("train: 1281167 images, 2 arrays, ") for line in lines)
    assert f"{train / 1e9:.1f} GB" in r.stdout


def test_plan_warns_when_the_file_system_is_too_small(tmp_path):
    r = runner.invoke(app, ["plan", "--images", f"train={10**11}", "--store", str(tmp_path / "s.zarr")])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("warning: the plan needs ") and " free" in r.stderr


def test_status_lists_pools_per_block_and_blocks_prints_the_store_table(tmp_path):
    blocks = [{"number": b, "module": f"m{b}", "channels": 4, "spatial": 4 if b != 19 else 1} for b in range(1, 38)]
    x = np.zeros((8, 4, 2, 2), np.float16)
    feats = {FeatureKey(90, 24, 2): x, FeatureKey(90, 24, 1): x[:, :, :1, :1], FeatureKey(90, 19, 1): x[:, :, :1, :1]}
    path = write_synthetic_store(tmp_path / "s.zarr", {"train": feats}, {"train": np.arange(8) % 2}, blocks=blocks)
    r = runner.invoke(app, ["status", "--store", str(path)])
    assert r.exit_code == 0, r.output
    assert "complete: block 19 at t 90, pool 1; block 24 at t 90, pools 1-2" in r.stdout
    r = runner.invoke(app, ["blocks", "--store", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["blocks"] == blocks
    r = runner.invoke(app, ["blocks", "--store", str(path)])
    assert "blocks of the store" in r.stdout and " m19 " in r.stdout
