"""Comparison tables, plots and the HTML report.

Plots are written atomically as PNG with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..atomic import atomic_path, write_text
from ..config.files import dump_config
from ..config.schema import ExperimentConfig
from ..csvcells import safe_table
from ..data.schema import ATTRIBUTES, SCORED_ATTRIBUTES
from ..errors import ConfigError, DataError
from ..fairness.metrics import EvaluationResult
from ..store.predictions import read_predictions
from ..store.run_folder import RunFolder
from .plots import pyplot, save_figure

# =========================================================================== comparison report
#
# A "run" is a training run folder as written by ``fairage.training.train``:
# ``config.yaml``, ``metrics_test.json`` (the ``fairage.fairness.metrics.evaluate`` object),
# ``history.csv`` and ``predictions_test.csv``. The functions below read such folders,
# compare them in the seed report's Table 1 layout, plot them and write one
# self-contained HTML page.

#: bias attribute -> Table 1 column name, in Table 1's order
BIAS_COLUMNS: dict[str, str] = {
    "gender": "Gender bias",
    "expression": "Expression bias",
    "ethnicity": "Ethnicity bias",
    "age": "Age bias",
}
#: the seed report's Table 1 columns, in its order
TABLE1_COLUMNS: tuple[str, ...] = (
    "Model",
    "Learning rate",
    "Training strategy",
    *BIAS_COLUMNS.values(),
    "MAE",
)
#: the measured columns (bias scores and MAE), each with a "<col> CI low/high" pair
METRIC_COLUMNS: tuple[str, ...] = (*BIAS_COLUMNS.values(), "MAE")
INTERVAL_COLUMNS: tuple[str, ...] = tuple(f"{c} CI {end}" for c in METRIC_COLUMNS for end in ("low", "high"))
COMPARISON_COLUMNS: tuple[str, ...] = (*TABLE1_COLUMNS, *INTERVAL_COLUMNS, "Runs")


@dataclass
class FinishedRun:
    """One finished run folder, read back for the comparison.

    ``label`` is the model name shown in tables (the config's ``name``; runs that
    share a label and differ only in ``seed`` are seeds of one model).
    """

    folder: RunFolder
    label: str
    config: ExperimentConfig
    metrics: EvaluationResult
    history: pd.DataFrame | None = None

    @property
    def run_dir(self) -> Path:
        return self.folder.path


def load_run(run_dir: str | Path) -> FinishedRun:
    """Read a finished run folder (config.yaml, metrics_test.json, history.csv, run.json if present).

    Raises DataError naming the file when the folder is missing, unfinished or
    corrupt, ConfigError when its config.yaml does not validate.
    """
    folder = RunFolder.open(run_dir, record_required=False)
    metrics = folder.metrics()
    if metrics is None:
        raise DataError(
            f"{folder.file(RunFolder.METRICS)} not found: the run is not finished (metrics_test.json is written last)"
        )
    cfg = folder.config()
    history = folder.history() if folder.file(RunFolder.HISTORY).is_file() else None
    return FinishedRun(folder=folder, label=cfg.name, config=cfg, metrics=metrics, history=history)


def _config_without_seed(cfg) -> dict:
    d = cfg.model_dump(mode="json")
    d.pop("seed", None)
    return d


def load_runs(runs: Sequence[FinishedRun | str | Path]) -> list[FinishedRun]:
    """Read run folders (or pass FinishedRuns through) and make labels unambiguous.

    Runs with the same config ``name`` whose configs are equal apart from ``seed`` are
    seeds of one model and keep the name; otherwise each such run is labelled
    ``"<name> (<folder name>)"``.
    """
    records = [r if isinstance(r, FinishedRun) else load_run(r) for r in runs]
    if not records:
        raise DataError("no run folders given")
    by_label: dict[str, list[FinishedRun]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    for label, group in by_label.items():
        if len(group) > 1:
            first = _config_without_seed(group[0].config)
            if any(_config_without_seed(r.config) != first for r in group[1:]):
                for r in group:
                    r.label = f"{label} ({r.run_dir.name})"
    return records


def _group(records: list[FinishedRun]) -> dict[str, list[FinishedRun]]:
    out: dict[str, list[FinishedRun]] = {}
    for r in records:
        out.setdefault(r.label, []).append(r)
    return out


def format_lr(lr: float) -> str:
    """Learning rate as the seed report writes it: ``1e-5``, ``5e-5``, ``0.001``.

    >>> format_lr(1e-05), format_lr(5e-5), format_lr(0.001)
    ('1e-5', '5e-5', '0.001')
    """
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{lr:g}").replace("e+", "e")


def _learning_rate(cfg) -> str:
    lrs = [format_lr(st.lr) for _, st in cfg.stages()]
    return lrs[0] if len(set(lrs)) == 1 else " / ".join(lrs)


def _strategy(cfg) -> str:
    parts = []
    for name, st in cfg.stages():
        w = st.weighting
        what = "head" if name == "stage1" else "all layers"
        if w.active:
            scheme = w.scheme if w.scheme != "none" else ""
            desc = "+".join(p for p in (("lds" if w.lds else ""), scheme) if p)
            what += f", {desc} weights" + (" (sampler)" if w.mode == "sampler" else "")
        if st.dro.enabled:
            what += f", Group DRO ({st.dro.scheme})"
        if st.loss == "bmc":
            what += ", Balanced MSE"
        elif st.loss == "ce":
            what += ", DEX"
        elif st.loss in ("coral", "corn"):
            what += f", {st.loss.upper()}"
        if st.label_std != "off":
            what += f", label std ({st.label_std})"
        parts.append(("I: " if name == "stage1" else "II: ") + what)
    return "; ".join(parts)


def _metric_values(metrics: EvaluationResult) -> dict[str, float]:
    """Table columns -> value for one run (NaN where the metrics have no entry)."""
    out: dict[str, float] = {}

    def bounds(ci) -> tuple[float, float]:
        return (math.nan, math.nan) if ci is None else (float(ci[0]), float(ci[1]))

    for attr, col in BIAS_COLUMNS.items():
        v = metrics.bias.get(attr)
        out[col] = math.nan if v is None else float(v)
        out[f"{col} CI low"], out[f"{col} CI high"] = bounds(metrics.bias_ci.get(attr))
    out["MAE"] = float(metrics.mae)
    out["MAE CI low"], out["MAE CI high"] = bounds(metrics.mae_ci)
    return out


def comparison_values(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame:
    """One numeric row per run: Model, run folder, seed and every measured column."""
    records = load_runs(runs)
    rows = []
    for r in records:
        rows.append({"Model": r.label, "Run": str(r.run_dir), "Seed": r.config.seed, **_metric_values(r.metrics)})
    return pd.DataFrame(rows)


def field_metrics_table(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame | None:
    """The field's metrics, one row per run: what the age-estimation literature reports beside MAE.

    Columns: Model, Seed, Status ("ok", or the stages that collapsed), MAE by each age bin of the
    run's ``eval.age_edges`` (children first), CS@k for each k (fractions), epsilon-error (only when
    a run has the raters' std), then per single attribute its worst group and that group's MAE and
    the std of its group MAEs (years; groups under ``eval.min_group`` faces left out). None when no
    run's metrics hold these figures (metrics written before they existed).
    """
    records = load_runs(runs)
    if not any(r.metrics.age_bins or r.metrics.cs for r in records):
        return None
    rows = []
    for r in records:
        m = r.metrics
        collapsed = r.folder.record.collapsed_stages if r.folder.record is not None else {}
        row: dict[str, object] = {
            "Model": r.label,
            "Seed": r.config.seed,
            "Status": "ok" if not collapsed else "collapsed: " + ", ".join(collapsed),
        }
        for group, score in m.age_bins.items():
            row[f"MAE {group}"] = score.mae if score.n else float("nan")
        for k, stat in m.cs.items():
            row[f"CS@{k}"] = stat.value
        if any(x.metrics.epsilon_error for x in records):
            row["epsilon-error"] = m.epsilon_error.value if m.epsilon_error else float("nan")
        for attr in [a for a in m.bias if a not in m.intersections]:
            worst, spread = m.worst_group.get(attr), m.group_mae_std.get(attr)
            row[f"{attr} worst group"] = worst.group if worst else "n/a"
            row[f"{attr} worst MAE"] = worst.mae if worst else float("nan")
            row[f"{attr} group-MAE std"] = spread.value if spread else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def pvalue_table(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame | None:
    """Permutation p-value of each bias score, one row per run: Model, Seed, the four bias columns.

    None when no run's metrics hold p-values (``eval.n_perm: 0``, or metrics written before
    they existed); NaN where a run has no p for an attribute.
    """
    records = load_runs(runs)
    if not any(r.metrics.n_perm for r in records):
        return None
    rows = []
    for r in records:
        row: dict[str, object] = {"Model": r.label, "Seed": r.config.seed, "Permutations": r.metrics.n_perm}
        for attr, col in BIAS_COLUMNS.items():
            p = r.metrics.bias_p.get(attr)
            row[col] = math.nan if p is None else float(p)
        rows.append(row)
    return pd.DataFrame(rows, columns=["Model", "Seed", *BIAS_COLUMNS.values(), "Permutations"])


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` of the values (s = sample standard deviation, ddof=1); NaNs left out.

    >>> format_mean_std([1.0, 2.0, 3.0])
    '2.000 ± 1.000'
    >>> format_mean_std([4.0, float("nan")], digits=1)
    '4.0'
    """
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return "n/a"
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def comparison_table(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame:
    """The seed report's Table 1 for the given runs, one row per model, runs' order.

    Columns: ``COMPARISON_COLUMNS`` = Model, Learning rate, Training strategy, Gender
    bias, Expression bias, Ethnicity bias, Age bias, MAE (years; bias scores in years
    too), then "<metric> CI low/high" (bootstrap interval bounds from each run's
    metrics) and Runs (number of runs averaged). When every model has one run the
    measured cells are floats; when some model has several runs (seeds) every measured
    cell is the string ``"mean ± std"`` over its runs.
    """
    records = load_runs(runs)
    groups = _group(records)
    several = any(len(g) > 1 for g in groups.values())
    rows = []
    for label, group in groups.items():
        cfg = group[0].config
        row: dict[str, object] = {
            "Model": label,
            "Learning rate": _learning_rate(cfg),
            "Training strategy": _strategy(cfg),
        }
        values = [_metric_values(r.metrics) for r in group]
        for col in (*METRIC_COLUMNS, *INTERVAL_COLUMNS):
            vals = [v[col] for v in values]
            row[col] = format_mean_std(vals) if several else vals[0]
        row["Runs"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def display_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Table 1 for reading: the Table 1 columns with each metric's interval inline.

    Every measured cell becomes ``"value [low, high]"`` (single runs) or
    ``"mean ± std"`` (several runs, intervals shown separately in the CSV).
    """
    out = table[list(TABLE1_COLUMNS)].copy().astype(object)
    for col in METRIC_COLUMNS:
        cells = []
        for _, row in table.iterrows():
            v, lo, hi = row[col], row[f"{col} CI low"], row[f"{col} CI high"]
            if isinstance(v, str):
                cells.append(v)
            elif isinstance(lo, float) and not math.isnan(lo):
                cells.append(f"{_cell(v, digits)} [{_cell(lo, digits)}, {_cell(hi, digits)}]")
            else:
                cells.append(_cell(v, digits))
        out[col] = cells
    return out


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown pipe table of ``table`` (floats to ``digits``)."""
    cols = [str(c) for c in table.columns]

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(esc(_cell(row[c], digits)) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def rich_table(table: pd.DataFrame, title: str | None = None, digits: int = 2):
    """A ``rich.table.Table`` of ``display_table(table)`` for the terminal.

    Each metric's interval (or ± std) goes on a second line of its cell, so the
    table stays readable in an 80-column terminal.
    """
    from rich.table import Table

    shown = display_table(table, digits)
    t = Table(title=title)
    for c in shown.columns:
        t.add_column(str(c), justify="left" if c in ("Model", "Training strategy") else "right")
    for _, row in shown.iterrows():
        cells = []
        for c in shown.columns:
            text = str(row[c])
            if c in METRIC_COLUMNS:
                text = text.replace(" [", "\n[").replace(" ± ", "\n± ")
            cells.append(text)
        t.add_row(*cells)
    return t


# --------------------------------------------------------------------------- plots


def plot_all_training_curves(runs: Sequence[FinishedRun | str | Path], path: str | Path) -> Path:
    """Training and validation MAE (years) per cumulative epoch, one panel per model.

    Seeds of one model are drawn in the same panel. A dashed line marks the start
    of stage II. Runs without ``history.csv`` get an empty panel saying so.
    """
    plt = pyplot()
    groups = _group(load_runs(runs))
    n = len(groups)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, group) in zip(axes.flat, groups.items()):
        drawn = False
        for i, r in enumerate(group):
            h = r.history
            if h is None or h.empty:
                continue
            h = h.reset_index(drop=True)
            x = np.arange(1, len(h) + 1)
            ax.plot(
                x, h["train_mae"], color="tab:blue", alpha=0.9 if i == 0 else 0.4, label="train" if i == 0 else None
            )
            ax.plot(
                x, h["val_mae"], color="tab:orange", alpha=0.9 if i == 0 else 0.4, label="valid" if i == 0 else None
            )
            stages = list(h["stage"])
            if i == 0 and "stage1" in stages and "stage2" in stages:
                ax.axvline(stages.index("stage2") + 0.5, color="gray", linestyle="--", linewidth=1)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no history.csv", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label + (f" ({len(group)} runs)" if len(group) > 1 else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("MAE (years)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle("training curves (dashed: stage II starts)")
    fig.tight_layout()
    return save_figure(fig, path)


def group_mae_frame(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame:
    """Per-group test MAE: columns Model, attribute, group, n, mae (mean over runs), mae_std.

    ``mae_std`` is the standard deviation over a model's runs (NaN for one run).
    Groups keep the order of the metrics JSON.
    """
    records = load_runs(runs)
    rows = []
    for r in records:
        for attr, groups in r.metrics.groups.items():
            for g, score in groups.items():
                rows.append({"Model": r.label, "attribute": attr, "group": str(g), "n": score.n, "mae": score.mae})
    if not rows:
        return pd.DataFrame(columns=["Model", "attribute", "group", "n", "mae", "mae_std"])
    df = pd.DataFrame(rows)
    out = (
        df.groupby(["Model", "attribute", "group"], sort=False)
        .agg(n=("n", "first"), mae=("mae", "mean"), mae_std=("mae", "std"))
        .reset_index()
    )
    return out


def _panel_attributes(frame: pd.DataFrame) -> list[str]:
    """The attributes of a per-group frame in plotting order: the four, then the others as they come."""
    attrs = [a for a in SCORED_ATTRIBUTES if a in set(frame["attribute"])]
    return attrs + [a for a in dict.fromkeys(frame["attribute"]) if a not in attrs]


def _attribute_panels(n_attributes: int, n_models: int):
    """A figure of one panel per attribute, two per row, wide enough for ``n_models`` bars per group;
    panels beyond ``n_attributes`` hidden. Returns ``(fig, axes)`` (axes a 2-D array)."""
    plt = pyplot()
    n = max(1, n_attributes)
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    panel_width = max(5.0, 0.35 * n_models * 4 + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_width * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_group_mae(runs: Sequence[FinishedRun | str | Path], path: str | Path) -> Path:
    """Per-group test MAE (years) bars, one panel per attribute, models side by side.

    Error bars: standard deviation over seeds when a model has several runs.
    """
    plt = pyplot()
    records = load_runs(runs)
    frame = group_mae_frame(records)
    models = list(_group(records))
    attrs = _panel_attributes(frame)
    fig, axes = _attribute_panels(len(attrs), len(models))
    width = 0.8 / max(1, len(models))
    colors = plt.get_cmap("tab10")
    for ax, attr in zip(axes.flat, attrs):
        sub = frame[frame["attribute"] == attr]
        groups = list(dict.fromkeys(sub["group"]))
        for k, model in enumerate(models):
            m = sub[sub["Model"] == model].set_index("group")
            vals = [m["mae"].get(g, math.nan) for g in groups]
            errs = [m["mae_std"].get(g, math.nan) for g in groups]
            errs = None if all(math.isnan(e) for e in errs) else np.nan_to_num(errs)
            pos = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
            ax.bar(pos, vals, width=width, yerr=errs, capsize=2, color=colors(k % 10), label=model)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(attr)
        ax.set_ylabel("test MAE (years)")
        ax.grid(axis="y", alpha=0.3)
    if not attrs:
        axes[0, 0].text(0.5, 0.5, "no per-group metrics", ha="center", va="center")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 8), fontsize=9)
    fig.suptitle("test MAE per group (a bias score is the mean pairwise gap between these bars)")
    fig.tight_layout(rect=(0, 0.06 if axes.shape[0] == 1 else 0.04, 1, 1))
    return save_figure(fig, path)


def group_coverage_frame(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame:
    """Per-group test coverage of the runs' age intervals: columns Model, intervals (``conformal``,
    ``plain``), attribute, group, n, coverage (fraction, mean over runs), coverage_std, width (years,
    mean over runs). Empty when no run has intervals."""
    records = load_runs(runs)
    rows = []
    for r in records:
        for name, cov in r.metrics.coverage.items():
            for attr, groups in cov.groups.items():
                for g, score in groups.items():
                    rows.append(
                        {
                            "Model": r.label,
                            "intervals": name,
                            "attribute": attr,
                            "group": str(g),
                            "n": score.n,
                            "coverage": score.coverage,
                            "width": score.width,
                        }
                    )
    columns = ["Model", "intervals", "attribute", "group", "n", "coverage", "coverage_std", "width"]
    if not rows:
        return pd.DataFrame(columns=columns)
    out = (
        pd.DataFrame(rows)
        .groupby(["Model", "intervals", "attribute", "group"], sort=False)
        .agg(n=("n", "first"), coverage=("coverage", "mean"), coverage_std=("coverage", "std"), width=("width", "mean"))
        .reset_index()
    )
    return out[columns]


def coverage_table(runs: Sequence[FinishedRun | str | Path]) -> pd.DataFrame | None:
    """One row per run with intervals: Model, Seed, Target, then per interval set its coverage (%),
    mean width (years), worst age group and the coverage gap of each attribute (percentage points,
    the bias score of coverage). None when no run has intervals."""
    rows = []
    for r in load_runs(runs):
        if not r.metrics.coverage:
            continue
        row = {
            "Model": r.label,
            "Seed": r.config.seed,
            "Target": math.nan if r.metrics.coverage_target is None else 100 * r.metrics.coverage_target,
        }
        for name, cov in r.metrics.coverage.items():
            row[f"{name} coverage %"] = 100 * cov.total.coverage
            row[f"{name} width"] = cov.total.width
            worst = cov.worst("age")
            if worst is not None:
                row[f"{name} worst age group"] = f"{worst[0]} {100 * worst[1].coverage:.1f}%"
            for attr, gap in cov.gap.items():
                row[f"{name} {attr} gap"] = math.nan if gap is None else 100 * gap
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def plot_group_coverage(runs: Sequence[FinishedRun | str | Path], path: str | Path) -> Path | None:
    """Per-group test coverage (%) of the age intervals, one panel per attribute, models side by side.

    Bars: the calibrated (``conformal``) intervals; black ticks: the plain intervals of the
    same calibration; dashed line: the target coverage. None (nothing written) when no run
    has intervals.
    """
    plt = pyplot()
    records = load_runs(runs)
    frame = group_coverage_frame(records)
    if frame.empty:
        return None
    models = list(_group(records))
    attrs = _panel_attributes(frame)
    fig, axes = _attribute_panels(len(attrs), len(models))
    width = 0.8 / max(1, len(models))
    colors = plt.get_cmap("tab10")
    targets = {r.metrics.coverage_target for r in records if r.metrics.coverage_target is not None}
    for ax, attr in zip(axes.flat, attrs):
        sub = frame[frame["attribute"] == attr]
        groups = list(dict.fromkeys(sub["group"]))
        for k, model in enumerate(models):
            pos = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
            for name, style in (("conformal", "bar"), ("plain", "tick")):
                m = sub[(sub["Model"] == model) & (sub["intervals"] == name)].set_index("group")
                if m.empty:
                    continue
                vals = [100 * m["coverage"].get(g, math.nan) for g in groups]
                if style == "bar":
                    errs = [100 * m["coverage_std"].get(g, math.nan) for g in groups]
                    errs = None if all(math.isnan(e) for e in errs) else np.nan_to_num(errs)
                    ax.bar(pos, vals, width=width, yerr=errs, capsize=2, color=colors(k % 10), label=model)
                else:
                    ax.scatter(
                        pos,
                        vals,
                        marker="_",
                        s=220,
                        color="black",
                        linewidths=2,
                        label="plain intervals" if k == 0 else None,
                        zorder=3,
                    )
        for target in targets:
            ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(attr)
        ax.set_ylabel("test coverage (%)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 8), fontsize=9)
    fig.suptitle(
        "age-interval coverage per group (dashed: target; a coverage gap is the mean pairwise gap between bars)"
    )
    fig.tight_layout(rect=(0, 0.06 if axes.shape[0] == 1 else 0.04, 1, 1))
    return save_figure(fig, path)


def plot_bias_vs_mae(runs: Sequence[FinishedRun | str | Path], path: str | Path) -> Path:
    """Bias against MAE, one panel per bias score, one point per model with its intervals.

    Points sit at the mean over a model's runs; error bars are the bootstrap
    intervals (mean bounds over runs). Lower-left is better: the trade-off.
    """
    plt = pyplot()
    values = comparison_values(runs)
    models = list(dict.fromkeys(values["Model"]))
    means = values.groupby("Model", sort=False).mean(numeric_only=True)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    colors = plt.get_cmap("tab10")
    for ax, col in zip(axes, BIAS_COLUMNS.values()):
        for k, model in enumerate(models):
            row = means.loc[model]
            x, y = row["MAE"], row[col]
            if math.isnan(y):
                continue
            xerr = [[max(0.0, x - row["MAE CI low"])], [max(0.0, row["MAE CI high"] - x)]]
            yerr = [[max(0.0, y - row[f"{col} CI low"])], [max(0.0, row[f"{col} CI high"] - y)]]
            xerr = None if any(math.isnan(e[0]) for e in xerr) else xerr
            yerr = None if any(math.isnan(e[0]) for e in yerr) else yerr
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=colors(k % 10), capsize=2, label=model)
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("MAE (years)")
        ax.set_ylabel(f"{col} (years)")
        ax.set_title(col)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("bias vs MAE (lower-left is better; bars: bootstrap intervals)")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- a tune's Pareto front


#: the report's table of a tune's front, ``tune_front.csv``
TUNE_FRONT = "tune_front.csv"


def tune_front_frame(tune, baseline: FinishedRun | None = None) -> tuple[pd.DataFrame, str | None]:
    """The Pareto trials of a tune folder (``fairage.workflows.tune.TuneFolder``) and their paired differences.

    One row per row of ``front.csv``: ``Trial``, ``val <objective>`` (what the front was chosen on),
    ``test <objective>`` with ``... CI low/high`` (bootstrap, from ``front.csv``), and with a
    ``baseline`` run ``<objective> - <baseline>`` with ``... CI low/high`` and ``... excludes 0``
    (``fairage.workflows.tune.paired_differences``: the trial minus the baseline on the same test faces,
    paired bootstrap; NaN / "n/a" where undefined). Years throughout. Returns the frame and a note
    (why differences are missing) or None.
    """
    from ..workflows.tune import paired_differences

    note = None
    rows = []
    for r in tune.front.to_dict("records"):
        row: dict[str, object] = {"Trial": int(r["number"])}
        for name in tune.objectives:
            row[f"val {name}"] = r[f"val_{name}"]
        for name in tune.objectives:
            row[f"test {name}"] = r[f"test_{name}"]
            row[f"test {name} CI low"], row[f"test {name} CI high"] = (
                r[f"test_{name}_ci_low"],
                r[f"test_{name}_ci_high"],
            )
        if baseline is not None:
            diffs: dict = {}
            run_dir = tune.run_dir(r.get("run_dir"))
            if run_dir is None:
                note = note or f"trial {int(r['number'])}: its run folder is not here, no paired difference"
            else:
                try:
                    diffs = paired_differences(baseline.run_dir, run_dir, tune.objectives)
                except DataError as err:
                    note = note or f"trial {int(r['number'])} against {baseline.label}: {err}"
            for name in tune.objectives:
                d = diffs.get(name)
                col = f"{name} - {baseline.label}"
                row[col] = d.estimate if d is not None else math.nan
                row[f"{col} CI low"], row[f"{col} CI high"] = d.ci if d is not None and d.ci else (math.nan,) * 2
                row[f"{col} excludes 0"] = "n/a" if d is None or d.ci is None else ("yes" if d.excludes_zero else "no")
        rows.append(row)
    return pd.DataFrame(rows), note


def tune_front_display(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``tune_front_frame`` for reading: each measured cell ``value [low, high]``; a paired difference
    that excludes 0 marked ``*``."""
    if frame.empty:  # a study without a finished trial yet
        return pd.DataFrame(columns=["Trial"])
    out = pd.DataFrame({"Trial": frame["Trial"].astype(str)})
    for col in frame.columns:
        if col == "Trial" or col.endswith((" CI low", " CI high", " excludes 0")):
            continue
        cells = []
        for _, row in frame.iterrows():
            v = row[col]
            lo, hi = row.get(f"{col} CI low", math.nan), row.get(f"{col} CI high", math.nan)
            text = (
                _cell(v, digits) if math.isnan(lo) else f"{_cell(v, digits)} [{_cell(lo, digits)}, {_cell(hi, digits)}]"
            )
            if row.get(f"{col} excludes 0") == "yes":
                text += " *"
            cells.append(text)
        out[col] = cells
    return out


def plot_tune_front(tune, references: Sequence[FinishedRun], path: str | Path) -> Path | None:
    """The front's first two objectives on the test split (``plots.plot_pareto``): every trial with
    test figures here, the Pareto trials highlighted, ``references`` (e.g. M1..M5) as crosses.
    None (nothing written) with fewer than two objectives or no trial with test figures."""
    from ..workflows.tune import front_points, objective_point
    from .plots import plot_pareto

    if len(tune.objectives) < 2:
        return None
    objectives = tune.objectives[:2]
    points = front_points(tune, objectives)
    if points.empty:
        return None
    refs = []
    for r in references:
        point = objective_point(r.run_dir, objectives)
        if point is not None:
            refs.append({"name": r.label, **point})
    return plot_pareto(
        points,
        path,
        f"{objectives[0]} (years, test)",
        f"{objectives[1]} (years, test)",
        pd.DataFrame(refs) if refs else None,
        title=f"Pareto front ({tune.path.name}): trials on the test split (bootstrap intervals)",
    )


# --------------------------------------------------------------------------- dataset summary


def summarize_faces(faces: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Counts per attribute value and split: attribute -> DataFrame (values x splits + total).

    ``faces`` is a face table (columns ``split``, ``age``, ``gender``, ``ethnicity``,
    ``expression``; any present). Age is counted by the report's age bins.
    """
    from ..data.schema import AGE_EDGES, age_bin_labels, age_bins

    if "split" in faces.columns:
        split = faces["split"].astype(str)
    else:
        split = pd.Series(["all"] * len(faces), index=faces.index)
    out: dict[str, pd.DataFrame] = {}
    columns: dict[str, tuple[pd.Series, list[str] | None]] = {}
    if "age" in faces.columns:
        columns["age"] = (
            pd.Series(age_bins(faces["age"].to_numpy(dtype=float), AGE_EDGES), index=faces.index),
            age_bin_labels(AGE_EDGES),
        )
    for attr in ATTRIBUTES:
        if attr in faces.columns:
            columns[attr] = (faces[attr].astype(str), None)
    for attr, (values, order) in columns.items():
        t = pd.crosstab(values.astype(str), split)
        t = t.reindex(
            columns=[s for s in ("train", "valid", "test", "all") if s in t.columns]
            + [s for s in t.columns if s not in ("train", "valid", "test", "all")]
        )
        if order is not None:
            t = t.reindex([o for o in order if o in t.index] + [i for i in t.index if i not in order], fill_value=0)
        t["total"] = t.sum(axis=1)
        t.index.name = attr
        t.columns.name = None
        out[attr] = t
    return out


def _summary_from_predictions(records: list[FinishedRun]) -> tuple[dict[str, pd.DataFrame], str] | None:
    for r in records:
        p = r.folder.file(RunFolder.PREDICTIONS)
        if p.is_file():
            df = read_predictions(p).assign(split="test")
            return summarize_faces(df), f"test split, from {p}"
    return None


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; } td.num { white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { color: #555; font-size: .9em; }
.summary { display: flex; flex-wrap: wrap; gap: 1.5em; }
.warning { color: #a40000; font-weight: bold; }
"""


_TEXT_COLUMNS = {"Model", "Training strategy", "group", "attribute"}


def _table_context(
    df: pd.DataFrame,
    caption: str | None = None,
    index: bool = False,
    digits: int = 3,
    table_id: str | None = None,
    text_columns: set[str] | frozenset[str] = frozenset(),
) -> dict:
    """A DataFrame as the template's table: column names with their CSS class, formatted cells."""
    text_cols = _TEXT_COLUMNS | set(text_columns) | ({df.index.name} if index else set())
    names = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    rows = []
    for idx, row in df.iterrows():
        cells = ([(df.index.name, idx)] if index else []) + [(str(c), row[c]) for c in df.columns]
        rows.append([(_cell(v, digits), "text" if c in text_cols else "num") for c, v in cells])
    return {
        "id": table_id,
        "caption": caption,
        "rows": rows,
        "columns": [(c, "text" if c in text_cols else "num") for c in names],
    }


def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("fairage.outputs", "templates"),
        autoescape=select_autoescape(["j2", "html"]),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("report.html.j2")


def _groups_context(records: list[FinishedRun]) -> dict | None:
    """The per-group MAE table (years), one column per model, with each group's faces; None without groups."""
    gm = group_mae_frame(records)
    if gm.empty:
        return None
    wide = gm.pivot_table(index=["attribute", "group"], columns="Model", values="mae", sort=False)
    wide = wide.reindex(columns=list(dict.fromkeys(gm["Model"])))
    n = gm.drop_duplicates(["attribute", "group"]).set_index(["attribute", "group"])["n"]
    wide.insert(0, "n", n.reindex(wide.index).to_numpy())
    return _table_context(wide.reset_index(), table_id="groups")


def _models_context(records: list[FinishedRun]) -> list[dict]:
    """Each model once: label, description, run folder, initial weights, warnings and config."""
    models, seen = [], set()
    for r in records:
        if r.label in seen:
            continue
        seen.add(r.label)
        record = r.folder.record
        start = None
        if record is not None:
            start = (
                f"pretrained weights {record.weights or ''}"
                if record.weights_loaded
                else "random initialisation (no pretrained weights)"
            )
        models.append(
            {
                "label": r.label,
                "description": r.config.description.strip(),
                "run_dir": str(r.run_dir),
                "start": start,
                "warnings": r.folder.warnings() if record is not None else [],
                "config_yaml": dump_config(r.config),
            }
        )
    return models


def _pvalues_context(records: list[FinishedRun]) -> dict | None:
    """The permutation p-values of the bias scores; None when no run has them."""
    pvalues = pvalue_table(records)
    if pvalues is None:
        return None
    shown = pvalues.copy()
    for col in BIAS_COLUMNS.values():
        shown[col] = [("n/a" if math.isnan(v) else f"{v:.3g}") for v in shown[col]]
    return _table_context(shown, table_id="pvalues")


def _tune_context(tune: dict) -> dict:
    """The Pareto front section: its source, baseline, note, table and plot (base64 PNG)."""
    image = tune.get("image")
    return {
        "source": str(tune["source"]),
        "baseline": tune.get("baseline"),
        "note": tune.get("note"),
        "table": _table_context(tune_front_display(tune["frame"]), table_id="tune-front"),
        "image": base64.b64encode(Path(image).read_bytes()).decode("ascii") if image else None,
    }


def render_html(
    table: pd.DataFrame,
    images: Sequence[tuple[str, Path]],
    records: list[FinishedRun],
    summary: dict[str, pd.DataFrame] | None,
    summary_source: str | None,
    title: str = "fairage comparison report",
    reference: str | None = None,
    tune: dict | None = None,
) -> str:
    """The report page as one string (Jinja2 template ``templates/report.html.j2``).

    Inline CSS, PNGs as base64 data URIs, no scripts. ``reference``: the name of a
    published table (``fairage.outputs.reference``) to show beside fairage's, marked as such.
    ``tune``: the Pareto front section (``source``, ``baseline``, ``note``, ``frame`` from
    ``tune_front_frame``, ``image``: its plot or None).
    """
    level = records[0].config.eval.level if records else 0.95
    groups = _groups_context(records)
    models = _models_context(records)
    field_table = field_metrics_table(records)
    field_context = None
    if field_table is not None:
        text = {"Status", *[c for c in field_table.columns if c.endswith("worst group")]}
        field_context = _table_context(field_table, table_id="field", text_columns=text)
    pvalues_context = _pvalues_context(records)
    coverage = coverage_table(records)
    coverage_context = None
    if coverage is not None:
        coverage_context = _table_context(coverage, table_id="coverage", digits=1)
    reference_context = None
    if reference is not None:
        from .reference import PUBLISHED_NOTE, reference_display

        reference_context = {
            "note": PUBLISHED_NOTE,
            "table": _table_context(reference_display(reference), caption=PUBLISHED_NOTE, table_id="reference"),
        }
    tune_context = _tune_context(tune) if tune is not None else None
    return _template().render(
        title=title,
        css=_CSS,
        level_pct=int(round(level * 100)),
        tune=tune_context,
        comparison=_table_context(display_table(table), table_id="comparison"),
        pvalues=pvalues_context,
        field=field_context,
        coverage=coverage_context,
        reference=reference_context,
        images=[(caption, base64.b64encode(Path(png).read_bytes()).decode("ascii")) for caption, png in images],
        groups=groups,
        summary=[_table_context(t, caption=f"faces per {attr}", index=True) for attr, t in (summary or {}).items()],
        summary_source=summary_source,
        models=models,
    )


def _tune_runs(tune: str | Path, run_dirs: Sequence) -> tuple:
    """The tune folder read (``read_tune_folder``) and its front trials' run folders found here;
    DataError when there is neither a front trial's folder nor a run folder given."""
    from ..workflows.tune import read_tune_folder

    tune_folder = read_tune_folder(tune)
    trial_dirs: list[Path] = []
    if "run_dir" in tune_folder.front.columns:
        trial_dirs = [d for d in map(tune_folder.run_dir, tune_folder.front["run_dir"]) if d is not None]
    if not run_dirs and not trial_dirs:
        raise DataError(f"{tune}: none of the front's run folders is here, and no run folder was given")
    return tune_folder, trial_dirs


def _dataset_summary(dataset_summary, records: list[FinishedRun]) -> tuple[dict | None, str | None]:
    """The faces-per-group tables and what they count (see ``build_report``'s ``dataset_summary``)."""
    if dataset_summary is None:
        found = _summary_from_predictions(records)
        return found if found else (None, None)
    if isinstance(dataset_summary, pd.DataFrame):
        return summarize_faces(dataset_summary), "all splits"
    if isinstance(dataset_summary, dict):
        return dataset_summary, None
    raise ConfigError(f"dataset_summary must be a face table or a dict, got {type(dataset_summary).__name__}")


def _tune_section(tune_folder, references: list[FinishedRun], out_dir: Path) -> dict:
    """The Pareto front section: ``tune_front.csv`` and ``front.png`` written, with the first reference run
    as the baseline of the paired differences."""
    baseline = references[0] if references else None
    frame, note = tune_front_frame(tune_folder, baseline)
    with atomic_path(out_dir / TUNE_FRONT) as tmp:
        safe_table(frame).to_csv(tmp, index=False)
    return {
        "source": tune_folder.path,
        "baseline": baseline.label if baseline else None,
        "note": note,
        "frame": frame,
        "image": plot_tune_front(tune_folder, references, out_dir / "front.png"),
    }


def build_report(
    run_dirs: Sequence[FinishedRun | str | Path],
    out_dir: str | Path,
    dataset_summary: pd.DataFrame | dict | None = None,
    reference: str | None = None,
    tune: str | Path | None = None,
) -> Path:
    """Write the comparison of finished runs into ``out_dir``; return ``report.html``'s path.

    Writes ``comparison.csv`` (``comparison_table``), ``comparison.md`` (the display
    table with intervals), ``training_curves.png``, ``group_mae.png``, ``group_coverage.png``
    (runs with age intervals only), ``bias_vs_mae.png`` and ``report.html`` (self-contained: inline CSS, images as data
    URIs, no scripts, fonts or links to fetch). ``dataset_summary`` is a face table
    (counted with ``summarize_faces``) or its result; None counts the test faces in
    the first run's ``predictions_test.csv``. ``reference`` names a published table
    (``fairage.outputs.reference``, e.g. ``"seed"``) shown beside fairage's, marked as not
    measured by fairage. All files are written atomically.

    ``tune``: a ``fairage tune`` output folder; the report then opens with its Pareto front
    (``tune_front_frame``, also written as ``tune_front.csv``, and ``front.png``: the trials on the
    test split, the front highlighted, ``run_dirs`` as reference points) and the front trials'
    run folders join the comparison after ``run_dirs``; the first of ``run_dirs`` (e.g. M1) is the
    baseline of the paired differences. ``run_dirs`` may then be empty.
    """
    out_dir = Path(out_dir)
    tune_folder, trial_dirs = _tune_runs(tune, run_dirs) if tune is not None else (None, [])
    records = load_runs([*run_dirs, *trial_dirs])
    references = records[: len(run_dirs)]
    table = comparison_table(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "comparison.csv") as tmp:
        safe_table(table).to_csv(tmp, index=False)  # run names that a spreadsheet would run stay text
    write_text(out_dir / "comparison.md", to_markdown(display_table(table)))
    images = [
        ("Training curves", plot_all_training_curves(records, out_dir / "training_curves.png")),
        ("Per-group test MAE, models side by side", plot_group_mae(records, out_dir / "group_mae.png")),
    ]
    coverage_png = plot_group_coverage(records, out_dir / "group_coverage.png")
    if coverage_png is not None:  # beside the MAE per group: is the reported uncertainty as true for every group
        images.append(("Per-group coverage of the age intervals", coverage_png))
    images.append(("Bias vs MAE", plot_bias_vs_mae(records, out_dir / "bias_vs_mae.png")))
    summary, source = _dataset_summary(dataset_summary, records)
    tune_section = _tune_section(tune_folder, references, out_dir) if tune_folder is not None else None
    page = render_html(table, images, records, summary, source, reference=reference, tune=tune_section)
    report = out_dir / "report.html"
    write_text(report, page)
    return report
