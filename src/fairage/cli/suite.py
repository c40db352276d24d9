"""``fairage suite``: several presets trained and compared."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _ABSOLUTE_HELP,
    _EXTRA_CATEGORIES_HELP,
    _SKIP_BAD_HELP,
    _as_overrides,
    _check_trainers,
    _data_flags,
    _print_comparison,
    _sigterm_exits,
    _warn_full_scale,
    app,
    console,
    err_console,
)


def _suite_printer(quiet: bool):
    """The CLI's listener of suite events: steps unless ``quiet``, warnings always (stderr)."""

    def show(event) -> None:
        if event.failed:
            show.failed += 1
        if event.warning:
            err_console.print(f"[yellow]warning:[/yellow] {event.message}", highlight=False, soft_wrap=True)
        elif not quiet:
            console.print(event.message, highlight=False, soft_wrap=True)

    show.failed = 0  # runs that failed or collapsed: the command's exit code says so
    return show


@app.command("suite")
# size: typer command: its parameters are the CLI options
def suite_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (any layout fairage reads)."),
    out: Path = typer.Option(
        Path("runs/suite"), "--out", help="Output folder: one run folder per preset, plus the report."
    ),
    presets: str = typer.Option(
        "M1,M2,M3,M4,M5", "--presets", help="Comma-separated preset names (see `fairage presets`)."
    ),
    scale: str = typer.Option("cpu", "--scale", help="full (as the report), cpu (resnet18, 64 px) or tiny (tests)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Runs per preset; K > 1 gives mean ± std over seeds."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Config override for every preset, e.g. stage2.lr=5e-5 (repeatable)."
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Train each preset (reusing finished runs), evaluate on the test split, write the comparison report."""
    from ..workflows.suite import run_suite, suite_configs

    names = [p.strip() for p in presets.split(",") if p.strip()]
    overrides = list(set_ or []) + _as_overrides(_data_flags(skip_bad, extra_categories, allow_absolute_paths))
    plan = suite_configs(names, scale, seeds, overrides)
    _check_trainers([cfg for _, cfg in plan])
    _warn_full_scale(plan[0][1], scale)
    printer = _suite_printer(quiet)
    with _sigterm_exits(
        "run the same `fairage suite` command again: finished runs are reused, the interrupted one resumes", None
    ):
        report = run_suite(data, out, scale=scale, progress=not quiet, on_event=printer, plan=plan)
    from ..store.run_folder import RunFolder

    finished = [out / n for n, _ in plan if (out / n / RunFolder.METRICS).is_file()]
    _print_comparison(finished, title=f"comparison ({data}, scale {scale}): MAE and bias scores in years, test split")
    console.print(f"report: {report}")
    if printer.failed:
        err_console.print(
            f"[red]{printer.failed} run(s) failed or collapsed (see the warnings above)[/red]", highlight=False
        )
        raise typer.Exit(1)
