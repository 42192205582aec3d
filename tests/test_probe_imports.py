"""`probe linear` on a cache runs without the U-Net: it imports neither diffprobe.extract nor
guided_diffusion. Checked in a fresh interpreter, since the test process imports everything."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from typer.testing import CliRunner
    from diffprobe.probe.cli import probe_app
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    rng = np.random.default_rng(0)
    key = FeatureKey(block=24, t=90, pool=2)
    split = lambda n: rng.standard_normal((n, 8, 2, 2)).astype(np.float32)
    labels = lambda n: np.arange(n) % 3
    path = write_synthetic_store(
        sys.argv[1], {"train": {key: split(60)}, "val": {key: split(30)}}, {"train": labels(60), "val": labels(30)}
    )
    r = CliRunner().invoke(probe_app, ["linear", "--block", "24", "--t", "90", "--pool", "2", "--store", str(path),
                                       "--recipe", "lbfgs", "--json"])
    loaded = [m for m in sys.modules if m == "guided_diffusion" or m.startswith(("guided_diffusion.", "diffprobe.extract"))]
    print(json.dumps({"exit": r.exit_code, "output": r.output[-500:], "loaded": loaded}))
    """
)


def test_probe_linear_on_a_cache_imports_no_extract_and_no_guided_diffusion(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "s.zarr")], capture_output=True, text=True, check=True
    )
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["exit"] == 0, r["output"]
    assert r["loaded"] == [], r["loaded"]
