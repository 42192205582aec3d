"""kNN alignment on a store: the adapter between `diffprobe.analyze.knn` and a `FeatureStore`.

    from diffprobe.analyze.align import run
    r = run(cfg, t=90)                 # `analyze align --t 90`: block x block mutual-kNN + PNG/CSV

Cells, pools, the common image order (ids aligned across stores, skipped images left out),
the readers and the files are `analyze cka`'s (`diffprobe.analyze.cka.run_matrix`); only the
numbers differ. Files go to ``align-<store fingerprint>/`` beside the store, named
``<mode>-<t or block>-p<pool>-<split>-<metric>-k<k>``.
"""

from __future__ import annotations

from diffprobe.analyze.cka import run_matrix
from diffprobe.analyze.knn import AlignError, AlignOptions, align_matrix  # noqa: F401  (re-exported)


def run(cfg, **kw) -> dict:
    """`analyze align`: the `analyze cka` modes and keywords (`diffprobe.analyze.cka.run`) with
    `AlignOptions` fields (``knn_metric``, ``knn_k``, ...) overriding ``cfg.analyze``. Returns the
    `align_matrix` result plus mode, store, split, t, block, pool, files, folder."""
    return run_matrix(
        cfg,
        AlignOptions,
        lambda p, opts, progress: align_matrix(p["rows"], p["cols"], p["n"], opts, on_progress=progress),
        lambda opts: (
            "align",
            f"{opts.knn_metric}-k{opts.knn_k}",
            f"{opts.knn_metric} (k {opts.knn_k})",
            opts.knn_metric,
        ),
        **kw,
    )
