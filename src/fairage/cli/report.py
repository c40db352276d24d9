"""``fairage report``: the comparison report of finished runs."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import _print_comparison, app, console, fail


@app.command("report")
def report_command(
    run_dirs: list[Path] | None = typer.Argument(
        None,
        help="Finished run folders (each with metrics_test.json); "
        "with --tune, the reference models (the first: the baseline).",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for comparison.csv/.md, plots and report.html."),
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="Also show a published table beside fairage's: 'seed' (the seed report's "
        "Table 1 on APPA-REAL, not measured by fairage).",
    ),
    tune: Path | None = typer.Option(
        None,
        "--tune",
        help="A `fairage tune` folder: the report opens with its "
        "Pareto front (table and plot, the run folders as reference points) and "
        "compares the front's trials too.",
    ),
) -> None:
    """Build the comparison table, plots and report.html from existing run folders (and a tune's front)."""
    from ..outputs.reference import REFERENCES
    from ..outputs.report import build_report

    if reference is not None and reference not in REFERENCES:
        fail(f"--reference: unknown table {reference!r}; available: {', '.join(REFERENCES)}")
    if not run_dirs and tune is None:
        fail("give finished run folders to compare, or --tune TUNE_FOLDER")
    report = build_report(list(run_dirs or []), out, reference=reference, tune=tune)
    shown = list(run_dirs or [])
    if tune is not None:
        from ..workflows.tune import read_tune_folder

        folder = read_tune_folder(tune)
        if "run_dir" in folder.front.columns:
            shown += [d for d in map(folder.run_dir, folder.front["run_dir"]) if d is not None]
    _print_comparison(shown, title="comparison: MAE and bias scores in years, test split", reference=reference)
    console.print(f"report: {report}")
