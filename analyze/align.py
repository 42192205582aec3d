"""kNN alignment on a store: the adapter between `diffprobe.analyze.knn` and a `FeatureStore`.

    from diffprobe.analyze.align import run
    r = run(cfg, t=90)                 # `analyze align --t 90`: block x block mutual-kNN + PNG/CSV

Cells, pools, the common image order (ids aligned across stores, skipped images left out),
the readers and the files are `analyze cka`'s (`diffprobe.analyze.cka.run_matrix`); only the
numbers differ. Files go to ``align-<store fingerprint>/`` beside the store, named
``<mode>-<t or block>-p<pool>-<split>-<metric>-k<k>``.
"""

from __future__ import annotations

from collections.abc import Callable

from diffprobe.analyze.cka import options_from_config, run_matrix
from diffprobe.analyze.knn import AlignError, AlignOptions, align_matrix  # noqa: F401  (re-exported)


def run(
    cfg,
    *,
    t=None,
    block=None,
    blocks=None,
    against=None,
    pool=None,
    out_dir=None,
    plots: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    **option_overrides,
) -> dict:
    """`analyze align`: the `analyze cka` modes (``t``, ``block``, ``against``) with ``cfg.analyze``'s
    kNN metric and k (``option_overrides``: `AlignOptions` fields, None ignored). Returns the
    `align_matrix` result plus mode, store, split, t, block, pool, files, folder."""
    opts = options_from_config(cfg.analyze, AlignOptions, **option_overrides)
    return run_matrix(
        cfg,
        lambda p: align_matrix(p["rows"], p["cols"], p["n"], opts, on_progress=on_progress),
        folder_prefix="align",
        tag=f"{opts.knn_metric}-k{opts.knn_k}",
        name=f"{opts.knn_metric} (k {opts.knn_k})",
        value=opts.knn_metric,
        t=t,
        block=block,
        blocks=blocks,
        against=against,
        pool=pool,
        out_dir=out_dir,
        plots=plots,
    )
