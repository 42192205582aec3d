"""`ProbeResult` (probe/result.py) owns its ledger row and --json form: a linear result's row is
the row the old result dicts made (same columns, same values), so existing ledgers resume;
--json holds every field, head-specific extras flattened, and no fitted ids."""

import json

import numpy as np

from diffprobe.probe.ledger import COLUMNS, to_row
from diffprobe.probe.result import ProbeResult

OLD_LINEAR = {  # the keys `linear_probe` returned before the result type (no head columns)
    "timestamp": "2026-12-01T10:00:00+00:00",
    "store": "runs/s.zarr",
    "fingerprint": "0123456789abcdef",
    "n_train": 90,
    "n_heldout": 10,
    "n_val": 50,
    "n_classes": 10,
    "recipe": "sgd",
    "seed": 0,
    "subset": "all",
    "subset_sha": "ab" * 32,
    "settings": "0123456789ab",
    "device": "cpu",
    "streamed": False,
    "block": 24,
    "t": 90,
    "pool": 2,
    "stored_pool": 2,
    "dim": 512,
    "hyperparameters": {"lr": 0.1, "weight_decay": 0.0},
    "grid": [{"lr": 0.1, "weight_decay": 0.0, "heldout_top1": 0.9, "heldout_loss": 0.3}],
    "heldout_top1": 0.9,
    "top1": 0.875,
    "top5": 1.0,
    "per_class": {"0": 1.0, "1": 0.75},
    "seconds": 1.5,
}


def _result(**over) -> ProbeResult:
    fields = {k: v for k, v in OLD_LINEAR.items()}
    fields.update(head="linear", blocks=[24], timesteps=[90], fit_ids=np.array(["a", "b"]), **over)
    return ProbeResult(**fields)


def test_a_linear_row_is_the_row_old_results_made():
    r = _result()
    assert list(r.row()) == list(COLUMNS)
    assert r.row() == to_row(OLD_LINEAR)


def test_json_holds_every_field_and_extras_but_no_ids():
    r = _result(extra={"stored_pools": [1, 2]}, architecture={"dim": 8})
    out = json.loads(json.dumps(r.to_json()))
    assert out["stored_pools"] == [1, 2] and out["architecture"] == {"dim": 8} and "fit_ids" not in out
    assert {k: out[k] for k in OLD_LINEAR} == OLD_LINEAR
    assert r["stored_pools"] == [1, 2] and r["top1"] == r.top1 and "fit_ids" not in r and "top5" in r
