"""PNG plots for bench reports: ROC curves, ID-vs-OOD score histograms, a method × OOD-set AUROC heatmap.

matplotlib is imported only here (lazily, so other commands do not pay for it), with the non-interactive Agg
backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from oodbench import metrics
from oodbench.engine.checkpoint import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Written whole or not at all (a temporary file replaces `path`), as every other file of a report."""
    path = Path(path)
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


LINE_STYLES = ("-", "--", ":", "-.")


def line_styles(n: int) -> list:
    """n distinct (colour, line style) pairs: the 10 tab10 colours solid, then dashed, dotted, dash-dotted, ..."""
    colours = _pyplot().get_cmap("tab10").colors
    return [(colours[i % 10], LINE_STYLES[i // 10 % len(LINE_STYLES)]) for i in range(n)]


def roc_curves(curves: dict, title: str, path: Path) -> None:
    """One ROC curve (OOD = positive) per entry of `curves`: {label: (id_scores, ood_scores)}, each with its own
    colour and line style."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for (label, (id_scores, ood_scores)), (colour, style) in zip(curves.items(), line_styles(len(curves))):
        fpr, tpr, _ = metrics.roc_points(id_scores, ood_scores, drop_intermediate=True)
        auroc = metrics.evaluate(id_scores, ood_scores)["auroc"]
        ax.plot(fpr, tpr, lw=1.4, color=colour, ls=style, label=f"{label} ({100 * auroc:.1f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate (ID flagged as OOD)", ylabel="true positive rate (OOD detected)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="method (AUROC %)", title_fontsize=7,
              ncol=2 if len(curves) > 16 else 1)
    _save(fig, path)


def score_histograms(id_scores, ood: dict, title: str, path: Path, bins: int = 60) -> None:
    """Density histograms of one method's scores: the ID set filled, each OOD set {name: scores} as an outline.

    The bins span the 0.5–99.5% quantiles of all scores pooled, so one extreme set does not squash the rest;
    values outside are clipped into the edge bins.
    """
    plt = _pyplot()
    pooled = np.concatenate([np.asarray(id_scores, dtype=np.float64)]
                            + [np.asarray(s, dtype=np.float64) for s in ood.values()])
    lo, hi = np.quantile(pooled, [0.005, 0.995])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.hist(np.clip(id_scores, lo, hi), bins=edges, density=True, alpha=0.35, color="0.3", label="ID (test)")
    for name, scores in ood.items():
        ax.hist(np.clip(scores, lo, hi), bins=edges, density=True, histtype="step", lw=1.3, label=name)
    ax.set(xlabel="OOD score (higher = more OOD)", ylabel="density", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    _save(fig, path)


def auroc_heatmap(values, rows: list, columns: list, title: str, path: Path) -> None:
    """A rows × columns heatmap of AUROC in percent on the full 0–100 scale, diverging at chance (50: white; blue
    above, red below, so a score that ranks OOD as in-distribution stands out); NaN cells (failed or missing) are
    grey and marked."""
    plt = _pyplot()
    values = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(columns), 0.9 + 0.38 * len(rows)))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}"
            dark = not np.isnan(values[i, j]) and abs(values[i, j] - 50) > 35
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    _save(fig, path)
