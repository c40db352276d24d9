"""``fairage evaluate``, ``compare`` and ``submit``: score predictions, compare two models, write a submission."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config.schema import MAX_N_BOOT, MAX_N_PERM
from .common import (
    _ABSOLUTE_HELP,
    _CLIP_HELP,
    _EXTRA_CATEGORIES_HELP,
    _SKIP_BAD_HELP,
    _data_flags,
    _fmt_ci,
    _fmt_value,
    _parse_edges,
    app,
    console,
)


@app.command("evaluate")
# size: typer command: its parameters are the CLI options
def evaluate_command(
    run_dir: Path | None = typer.Argument(
        None,
        help="A run folder: its predictions_test.csv; for another split or dataset (--split, --data) its model "
        "predicts those faces. A model folder predicts the faces of --data.",
    ),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    split: str = typer.Option("test", "--split", help="Split the predictions are for."),
    predictions: Path | None = typer.Option(None, "--predictions", help="Predictions CSV (image,prediction)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    n_boot: int | None = typer.Option(
        None,
        "--n-boot",
        min=0,
        max=MAX_N_BOOT,
        help="Bootstrap resamples (0: no intervals; default 1000, for a run its eval.n_boot).",
    ),
    level: float | None = typer.Option(
        None,
        "--level",
        min=0.5,
        max=0.999,
        help="Confidence level of the intervals (default 0.95, for a run its eval.level).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, help="Seed of the bootstrap and permutations (default 0, for a run its seed)."
    ),
    n_perm: int | None = typer.Option(
        None,
        "--n-perm",
        min=0,
        max=MAX_N_PERM,
        help="Label permutations for each bias's p-value (0: no test; default 1000, for a run its eval.n_perm).",
    ),
    attribute: list[str] | None = typer.Option(
        None,
        "--attribute",
        help="Attribute to score (repeatable; 'age' = ground-truth age bins; any column). "
        "Default: age, gender, ethnicity, expression.",
    ),
    age_edges: str | None = typer.Option(
        None, "--age-edges", help="Inner edges of the age groups, in years (default 20,40,60)."
    ),
    intersection: list[str] | None = typer.Option(
        None,
        "--intersection",
        help="Attributes scored cell by cell, comma-separated (repeatable), e.g. "
        "age,ethnicity. Default: age x ethnicity and gender x ethnicity "
        "(for a run: its eval.intersections).",
    ),
    min_group: int | None = typer.Option(
        None, "--min-group", min=1, help="Groups with fewer faces are flagged (default 20; a run: eval.min_group)."
    ),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """MAE, bias scores and the field's metrics (with bootstrap intervals) of a prediction set, by group.

    For a run folder the faces are loaded with the run's own data settings (layout,
    target, ...) and scored with its eval settings, so the result equals its metrics_test.json.
    On another split or dataset the run's model predicts the faces first.
    """
    import json

    from ..workflows.evaluate import evaluate_split, metric_settings, split_predictions

    options = _data_flags(skip_bad, extra_categories, allow_absolute_paths)
    found = split_predictions(run_dir, data, split, predictions, options, clip, progress=not json_out)
    intersections = [[a.strip() for a in item.split(",") if a.strip()] for item in intersection or []]
    chosen = {"n_boot": n_boot, "level": level, "n_perm": n_perm, "seed": seed, "attributes": attribute or None}
    chosen.update(min_group=min_group, intersections=intersections or None)
    settings = metric_settings(found, chosen)
    edges = _parse_edges(age_edges) if age_edges is not None else None
    evaluation = evaluate_split(found, settings, edges)
    if json_out:
        print(json.dumps(evaluation.to_json()))
        return
    _print_evaluation(evaluation.to_json(), f"{found.source}", split, settings["n_perm"])
    _print_coverage(evaluation, f"{100 * settings['level']:g}%")


def _print_evaluation(result: dict, source: str, split: str, n_perm: int) -> None:
    """The tables of ``fairage evaluate``: age bins first, then the field's metrics, biases and groups."""
    pct = f"{100 * result['level']:g}%"
    console.print(
        f"[bold]{source}[/bold] on {split} ({result['n']} faces), {pct} bootstrap intervals "
        f"({result['n_boot']} resamples)",
        highlight=False,
    )
    console.print(f"  MAE {result['mae']:.2f} years {_fmt_ci(result['mae_ci'])}", highlight=False)
    _print_age_bins(result, pct)
    _print_field_metrics(result)
    _print_biases(result, n_perm)
    for name, groups in result["groups"].items():
        _print_groups(result, name, groups, pct)


def _print_age_bins(result: dict, pct: str) -> None:
    """MAE by ground-truth age bin (bins under ``min_group`` faces in yellow)."""
    from rich.table import Table

    small = result["min_group"]
    ages = Table(title="MAE by age (ground truth, years)", title_justify="left")
    for column in ("age", "n", "MAE", f"{pct} interval"):
        ages.add_column(column, justify="left" if column == "age" else "right")
    for group, row in result["age_bins"]["groups"].items():
        ages.add_row(
            group,
            str(row["n"]),
            _fmt_value(row["mae"] if row["n"] else None),
            _fmt_ci(row["ci"]),
            style="yellow" if 0 < row["n"] < small else None,
        )
    console.print(ages)


def _print_field_metrics(result: dict) -> None:
    """CS@k (percent of faces within k years) and the epsilon-error, with their intervals."""
    for k, stat in result["cs"].items():
        console.print(
            f"  CS@{k} {100 * stat['value']:.1f}% of faces within {k} years "
            f"{_fmt_ci(stat['ci'] and [100 * x for x in stat['ci']])}",
            highlight=False,
        )
    if result["epsilon_error"]:
        eps = result["epsilon_error"]
        console.print(
            f"  epsilon-error {eps['value']:.3f} {_fmt_ci(eps['ci'])} (against the raters' std)", highlight=False
        )


def _print_biases(result: dict, n_perm: int) -> None:
    """Each attribute's bias score (years) with its interval, permutation p-value and worst group."""
    for name, bias in result["bias"].items():
        p_value = result["bias_p"].get(name)
        test = f"  permutation p = {p_value:.3g}" if p_value is not None else ""
        worst = result["worst_group"].get(name)
        spread = result["group_mae_std"].get(name)
        field = (
            f"  worst group {worst['group']} {worst['mae']:.2f} {_fmt_ci(worst['ci'])}, "
            f"group-MAE std {spread['value']:.2f}"
            if worst
            else ""
        )
        console.print(
            f"  {name} bias {_fmt_value(bias)} {_fmt_ci(result['bias_ci'][name])}{test}{field}", highlight=False
        )
    if n_perm:
        console.print(
            f"  (p: how often {n_perm} random relabellings of the faces' groups give a bias at "
            "least as large; small = the gap is unlikely to be chance)",
            highlight=False,
        )


def _print_groups(result: dict, name: str, groups: dict, pct: str) -> None:
    """One attribute's table: each group's faces, MAE and interval (small groups flagged, empty ones dim)."""
    from rich.table import Table

    small = result["min_group"]
    table = Table(title=f"{name} (bias {_fmt_value(result['bias'][name])})", title_justify="left")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("MAE", justify="right")
    table.add_column(f"{pct} interval", justify="right")
    table.add_column("")
    flagged = set(result["small_groups"].get(name, []))
    for group, row in groups.items():
        note = f"under {small} faces" if group in flagged else ""
        table.add_row(
            group,
            str(row["n"]),
            f"{row['mae']:.2f}",
            _fmt_ci(result["groups_ci"][name][group]),
            note,
            style="yellow" if note else None,
        )
    for group in result["skipped_groups"][name]:
        table.add_row(group, "0", "-", "skipped (no faces)", "", style="dim")
    console.print(table)


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt_pct_ci(ci) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _print_coverage(evaluation, pct: str) -> None:
    """Coverage and width of the intervals (conformal, plain beside it), overall and per group."""
    from rich.table import Table

    if not evaluation.coverage:
        return
    target = evaluation.coverage_target
    aim = f", aiming at {_fmt_pct(target)}" if target is not None else ""
    console.print(
        f"[bold]intervals[/bold] (age_lo-age_hi{aim}; gap = coverage bias score, mean |difference| between groups)",
        highlight=False,
    )
    for name, cov in evaluation.coverage.items():
        console.print(
            f"  {name}: coverage {_fmt_pct(cov.total.coverage)} {_fmt_pct_ci(cov.total.coverage_ci)}, "
            f"mean width {cov.total.width:.2f} years {_fmt_ci(cov.total.width_ci)}",
            highlight=False,
        )
    for attribute in next(iter(evaluation.coverage.values())).groups:
        table = Table(title=f"{attribute}: interval coverage ({pct} intervals)", title_justify="left")
        table.add_column("group")
        table.add_column("n", justify="right")
        for name in evaluation.coverage:
            table.add_column(f"{name} coverage", justify="right")
            table.add_column("width", justify="right")
        for group, row in next(iter(evaluation.coverage.values())).groups[attribute].items():
            cells = [group, str(row.n)]
            for cov in evaluation.coverage.values():
                g = cov.groups[attribute][group]
                cells += [f"{_fmt_pct(g.coverage)} {_fmt_pct_ci(g.coverage_ci)}", f"{g.width:.1f}"]
            table.add_row(*cells)
        gaps = [
            f"{name} {_fmt_pct(cov.gap[attribute])} {_fmt_pct_ci(cov.gap_ci[attribute])}"
            + (f" p = {cov.gap_p[attribute]:.3g}" if cov.gap_p.get(attribute) is not None else "")
            for name, cov in evaluation.coverage.items()
        ]
        table.caption = "coverage gap: " + "; ".join(gaps)
        table.caption_justify = "left"
        console.print(table)


@app.command("compare")
# size: typer command: its parameters are the CLI options
def compare_command(
    predictions_a: Path = typer.Argument(..., help="Predictions CSV of A (the baseline)."),
    predictions_b: Path = typer.Argument(..., help="Predictions CSV of B; differences are B - A."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: str = typer.Option("test", "--split", help="Split the predictions are for."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    n_boot: int | None = typer.Option(
        None, "--n-boot", min=0, max=MAX_N_BOOT, help="Paired bootstrap resamples (default 1000)."
    ),
    level: float | None = typer.Option(
        None, "--level", min=0.5, max=0.999, help="Confidence level of the intervals (default 0.95)."
    ),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of the bootstrap (default 0)."),
    attribute: list[str] | None = typer.Option(None, "--attribute", help="Attribute to score (repeatable)."),
    age_edges: str | None = typer.Option(
        None, "--age-edges", help="Inner edges of the age groups, in years (default 20,40,60)."
    ),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """Paired comparison of two prediction sets on the same faces: B - A with bootstrap intervals."""
    import json

    from ..workflows.evaluate import compare_predictions

    options = _data_flags(skip_bad, extra_categories, allow_absolute_paths)
    chosen = {"n_boot": n_boot, "level": level, "seed": seed, "attributes": attribute or None}
    edges = _parse_edges(age_edges) if age_edges is not None else None
    result = compare_predictions(predictions_a, predictions_b, data, split, options, clip, chosen, edges)
    if json_out:
        print(json.dumps(result.to_json()))
        return
    _print_comparison(result, split, predictions_a, predictions_b)


def _print_comparison(result, split: str, predictions_a: Path, predictions_b: Path) -> None:
    """The table of ``fairage compare``: each metric of A and B, B - A with its interval and verdict."""
    from rich.table import Table

    pct = f"{100 * result.level:g}%"
    table = Table(
        title=f"B - A on {result.n} {split} faces (A: {predictions_a}, B: {predictions_b})", title_justify="left"
    )
    for column in ("metric", "A", "B", "B - A", f"{pct} interval", "verdict"):
        table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
    for name, a, b, d in [*result.rows(), *result.field_rows()]:
        table.add_row(
            name,
            _fmt_value(a),
            _fmt_value(b),
            _fmt_value(d and d.estimate),
            _fmt_ci(d and d.ci),
            d.verdict if d is not None else "n/a",
        )
    console.print(table)


@app.command("submit")
def submit_command(
    predictions_or_run: Path = typer.Argument(..., help="Predictions CSV, or a run folder (its predictions_test.csv)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    out: Path = typer.Option(Path("predictions.zip"), "--out", help="Submission zip to write."),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """Write the competition submission: a zip with predictions.csv, one age per line in test order."""
    from ..workflows.evaluate import submission

    options = _data_flags(skip_bad, extra_categories, allow_absolute_paths)
    ages = submission(predictions_or_run, out, data, options, clip)
    console.print(f"wrote {out} ({len(ages)} test predictions)", highlight=False)
