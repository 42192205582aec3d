"""Sweep plots: the paper's Figure 4/5 for any model and data set, as PNG files.

    from diffprobe.probe.plots import sweep_plots
    sweep_plots([{"block": 24, "t": 90, "pool": 2, "top1": 0.97}, ...], "runs/sweep-x", "digits · sgd")

Per pool p: ``heatmap-pool{p}.png`` (val top-1 over block (x) x t (y), colour bar, values
written in the cells when there are at most 120), ``top1-vs-t-pool{p}.png`` (one line per
block) and ``top1-vs-block-pool{p}.png`` (one line per t). Lines are coloured along viridis;
more than 10 of them get a colour bar instead of a legend. matplotlib is imported here,
lazily, with the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ANNOTATE_MAX = 120
_LEGEND_MAX = 10


def _lines(ax, fig, xs, series: dict, cmap, name: str):
    """One line per key of ``series`` ({key: y values over xs, NaN where missing})."""
    import matplotlib as mpl

    keys = sorted(series)
    norm = mpl.colors.Normalize(min(keys), max(keys) if len(keys) > 1 else min(keys) + 1)
    for k in keys:
        y = np.asarray(series[k], dtype=float)
        ok = ~np.isnan(y)
        ax.plot(
            np.asarray(xs)[ok],
            100 * y[ok],
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=cmap(norm(k)),
            label=f"{name} {k}",
        )
    if len(keys) > _LEGEND_MAX:
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=name)
    else:
        ax.legend(fontsize=8, ncols=2 if len(keys) > 5 else 1)


def sweep_plots(
    points: list[dict], folder: str | Path, label: str, metric: str = "val top-1", stem: str = "top1"
) -> list[Path]:
    """Write the plots of ``points`` ({"block", "t", "pool", "top1"}) into ``folder``; returns the paths.

    ``metric`` names the value in the titles and axes (the dense sweep: "val mIoU"), ``stem`` the
    line plots' files (``<stem>-vs-t-pool{p}.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    cmap = plt.get_cmap("viridis")
    written = []
    for pool in sorted({q["pool"] for q in points}):
        here = [q for q in points if q["pool"] == pool]
        blocks = sorted({q["block"] for q in here})
        ts = sorted({q["t"] for q in here})
        acc = np.full((len(ts), len(blocks)), np.nan)
        for q in here:
            acc[ts.index(q["t"]), blocks.index(q["block"])] = q["top1"]
        title = f"{label} · pool {pool}"

        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(blocks) + 2.5), max(3.0, 0.45 * len(ts) + 1.8)))
        im = ax.imshow(100 * np.ma.masked_invalid(acc), origin="lower", aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7 if len(blocks) > 20 else 9)
        ax.set_yticks(range(len(ts)), [str(t) for t in ts])
        ax.set_xlabel("block")
        ax.set_ylabel("timestep t")
        ax.set_title(f"{metric} (%): {title}")
        fig.colorbar(im, ax=ax, label=f"{metric} (%)")
        if acc.size <= _ANNOTATE_MAX:
            lo, hi = np.nanmin(acc), np.nanmax(acc)
            for (i, j), v in np.ndenumerate(acc):
                if not np.isnan(v):
                    dark = hi > lo and (v - lo) / (hi - lo) < 0.5
                    ax.text(
                        j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                    )
        written.append(_save(fig, folder / f"heatmap-pool{pool}.png"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        _lines(ax, fig, ts, {b: acc[:, j] for j, b in enumerate(blocks)}, cmap, "block")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric} vs t per block: {title}")
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / f"{stem}-vs-t-pool{pool}.png"))

        fig, ax = plt.subplots(figsize=(max(7.0, 0.2 * len(blocks) + 3), 4.5))
        _lines(ax, fig, blocks, {t: acc[i, :] for i, t in enumerate(ts)}, cmap, "t")
        ax.set_xlabel("block")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric} vs block per t: {title}")
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / f"{stem}-vs-block-pool{pool}.png"))
    return written


def segmentation_picture(examples: dict, class_names: list[str], path: str | Path, title: str) -> Path:
    """Val images with their ground truth and predicted masks side by side, one row per image.

    ``examples``: ``images`` (n, 3, S, S) uint8, ``truth`` and ``prediction`` (n, E, E) uint8
    (255 = ignore, drawn white). Classes are coloured with tab20 (a legend names them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    path = Path(path)
    k = len(class_names)
    base = plt.get_cmap("tab20" if k > 10 else "tab10")
    colours = np.ones((256, 4))
    colours[:k] = [base(i % base.N) for i in range(k)]
    cmap = ListedColormap(colours)
    n = len(examples["images"])
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n + 0.9), squeeze=False)
    for i in range(n):
        panels = [
            (examples["images"][i].transpose(1, 2, 0), "image", {}),
            (examples["truth"][i], "ground truth", {"cmap": cmap, "vmin": 0, "vmax": 255, "interpolation": "nearest"}),
            (
                examples["prediction"][i],
                "prediction",
                {"cmap": cmap, "vmin": 0, "vmax": 255, "interpolation": "nearest"},
            ),
        ]
        for ax, (arr, name, kw) in zip(axes[i], panels):
            ax.imshow(arr, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    shown = sorted({int(v) for part in ("truth", "prediction") for v in np.unique(examples[part]) if v < k})
    handles = [Patch(color=colours[c], label=class_names[c]) for c in shown]
    fig.legend(handles=handles, loc="lower center", ncols=min(6, max(1, len(handles))), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, path, tight=False)


def _save(fig, path: Path, tight: bool = True) -> Path:
    """Save under a temporary name, then rename: a full disk leaves no short PNG, and one
    line (`OutputError`) names the file. ``tight``: lay the figure out tightly first."""
    import matplotlib.pyplot as plt

    from diffprobe.store.files import write_atomically

    if tight:
        fig.tight_layout()
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:]))
    finally:
        plt.close(fig)


def cka_heatmap(
    matrix: np.ndarray,
    rows: list,
    cols: list,
    row_name: str,
    col_name: str,
    title: str,
    path: str | Path,
    label: str = "CKA",
) -> Path:
    """One CKA (or kNN alignment: ``label``) matrix as a PNG: rows (y) x cols (x) labelled, colour
    bar 0..1 (wider if an unbiased estimate leaves it), values in the cells when there are at most 120."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    m = np.asarray(matrix, dtype=float)
    lo, hi = min(0.0, float(np.nanmin(m))), max(1.0, float(np.nanmax(m)))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.26 * len(cols) + 3.0), max(4.5, 0.26 * len(rows) + 2.2)))
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi)
    small = 7 if max(len(rows), len(cols)) > 20 else 9
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=small, rotation=90 if len(cols) > 20 else 0)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=small)
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    if m.size <= _ANNOTATE_MAX:
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if (v - lo) / (hi - lo) < 0.5 else "black",
            )
    return _save(fig, path)
