"""The plots training writes into a run folder: training curves and group weights.

PNG files, written atomically with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..atomic import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), chosen at the plotting call, not at import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` atomically as PNG and close it."""
    plt = pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_training_curves(history: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Loss and MAE (years) for train and valid across both stages.

    ``history`` has the run's ``history.csv`` columns (epoch, stage, train_loss,
    val_loss, train_mae, val_mae, lr), one row per epoch, stages in order. The x axis
    is the cumulative epoch; a dashed vertical line marks where stage II starts.
    """
    plt = pyplot()
    h = history.reset_index(drop=True)
    x = range(1, len(h) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "mae", "MAE (years)")):
        ax.plot(x, h[f"train_{metric}"], label="train", color="tab:blue")
        ax.plot(x, h[f"val_{metric}"], label="valid", color="tab:orange")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    stages = list(h["stage"])
    if "stage1" in stages and "stage2" in stages:
        start = stages.index("stage2") + 0.5
        for ax in axes:
            ax.axvline(start, color="gray", linestyle="--", linewidth=1)
            ax.text(start, ax.get_ylim()[1], " stage II", va="top", ha="left", fontsize=8, color="gray")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_group_weights(groups: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Group size (faces) against weight per face, one bar pair per group.

    ``groups`` has columns ``name``, ``n`` and ``weight`` (weight per face after
    rescaling), as returned by ``fairage.fairness.weighting.group_table``.
    """
    plt = pyplot()
    g = groups.reset_index(drop=True)
    fig, ax1 = plt.subplots(figsize=(max(6, 0.45 * len(g) + 2), 3.8))
    pos = range(len(g))
    ax1.bar([p - 0.2 for p in pos], g["n"], width=0.4, color="tab:blue", label="faces (n)")
    ax1.set_ylabel("faces in group", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.bar([p + 0.2 for p in pos], g["weight"], width=0.4, color="tab:red", label="weight per face")
    ax2.set_ylabel("weight per face", color="tab:red")
    ax1.set_xticks(list(pos))
    ax1.set_xticklabels(g["name"], rotation=60, ha="right", fontsize=8)
    ax1.set_title(title or "group sizes and weights")
    return save_figure(fig, path)


# size: one figure: the plotting calls with their styles
def plot_pareto(
    points: pd.DataFrame,
    path: str | Path,
    x_label: str,
    y_label: str,
    references: pd.DataFrame | None = None,
    title: str | None = None,
) -> Path:
    """Two objectives of a tune's trials (years), each with its interval; the Pareto trials highlighted.

    ``points``: one row per trial with columns ``number``, ``x``, ``x_low``, ``x_high``, ``y``,
    ``y_low``, ``y_high`` (intervals may be NaN) and ``front`` (bool: on the validation Pareto
    front). ``references``: optional rows ``name, x, x_low, x_high, y, y_low, y_high`` (finished
    runs such as M1..M5), drawn as labelled crosses.
    """
    plt = pyplot()

    def err(df, c):
        lo, hi = (df[c] - df[f"{c}_low"]).clip(lower=0), (df[f"{c}_high"] - df[c]).clip(lower=0)
        return [lo.fillna(0).to_numpy(), hi.fillna(0).to_numpy()]

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    rest, front = points[~points["front"]], points[points["front"]].sort_values("x")
    if len(rest):
        ax.errorbar(
            rest["x"],
            rest["y"],
            xerr=err(rest, "x"),
            yerr=err(rest, "y"),
            fmt="o",
            color="0.65",
            ecolor="0.85",
            ms=4,
            label="other trials",
        )
    if len(front):
        ax.errorbar(
            front["x"],
            front["y"],
            xerr=err(front, "x"),
            yerr=err(front, "y"),
            fmt="o-",
            color="tab:red",
            ecolor="tab:red",
            alpha=0.9,
            ms=5,
            lw=1,
            elinewidth=0.8,
            label="Pareto trials (validation)",
        )
        for r in front.itertuples():
            ax.annotate(str(r.number), (r.x, r.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if references is not None and len(references):
        ax.errorbar(
            references["x"],
            references["y"],
            xerr=err(references, "x"),
            yerr=err(references, "y"),
            fmt="x",
            color="black",
            ecolor="0.3",
            ms=7,
            label="reference runs",
        )
        for r in references.itertuples():
            ax.annotate(str(r.name), (r.x, r.y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or "trials on the test split (intervals: bootstrap)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
