"""The ``fairage`` command: thin typer commands over the library modules.

Every command turns a FairageError (bad file, bad config, bad argument) into one
red message on stderr and exit code 2, never a traceback.

Each issue's commands live in their own section below; keep commands thin: parse
arguments, call the library, print with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from .errors import FairageError

err_console = Console(stderr=True)
console = Console()


class _FairageGroup(TyperGroup):
    """Top-level group: a FairageError anywhere below becomes one message + exit 2.

    Done at the click level (not in ``main``) so typer's CliRunner sees it too.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FairageError as err:
            err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_FairageGroup,
    name="fairage",
    help="Fair apparent-age estimation: train, evaluate accuracy and bias by group, compare weighting strategies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(message: str) -> None:
    """Print one clear error and exit with code 2."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# =========================================================================== data (issue 2)


# =========================================================================== evaluation (issue 3)


# =========================================================================== weighting (issue 4)


# =========================================================================== training (issue 5)


# =========================================================================== suite, report, demo (issue 6)


@app.command("presets")
def presets_command() -> None:
    """List the shipped presets (M1..M5 and variants) with a one-line description."""
    from rich.table import Table

    from .config import list_presets

    table = Table(title="presets (fairage suite --presets NAME,...; scale with --scale full|cpu|tiny)")
    table.add_column("name")
    table.add_column("description")
    listed = list_presets()
    # M4 before its variant M4-48 (plain name order puts "-" before ".yaml")
    for name in sorted(listed, key=lambda n: (n.split("-")[0], n)):
        table.add_row(name, listed[name])
    console.print(table)


def _print_comparison(run_dirs: list[Path], title: str) -> None:
    from .report import comparison_table, rich_table

    console.print(rich_table(comparison_table(run_dirs), title=title))


@app.command("suite")
def suite_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (any layout fairage reads)."),
    out: Path = typer.Option(Path("runs/suite"), "--out", help="Output folder: one run folder per preset, plus the report."),
    presets: str = typer.Option("M1,M2,M3,M4,M5", "--presets", help="Comma-separated preset names (see `fairage presets`)."),
    scale: str = typer.Option("cpu", "--scale", help="full (as the report), cpu (resnet18, 64 px) or tiny (tests)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Runs per preset; K > 1 gives mean ± std over seeds."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Config override for every preset, e.g. stage2.lr=5e-5 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Train each preset (reusing finished runs), evaluate on the test split, write the comparison report."""
    from .suite import run_suite, suite_configs

    names = [p.strip() for p in presets.split(",") if p.strip()]
    report = run_suite(data, out, presets=names, scale=scale, seeds=seeds, overrides=set_ or [], progress=not quiet)
    _print_comparison([out / n for n, _ in suite_configs(names, scale, seeds, set_ or [])],
                      title=f"comparison ({data}, scale {scale}): MAE and bias scores in years, test split")
    console.print(f"report: {report}")


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Finished run folders (each with metrics_test.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for comparison.csv/.md, plots and report.html."),
) -> None:
    """Build the comparison table, plots and report.html from existing run folders."""
    from .report import build_report

    report = build_report(run_dirs, out)
    _print_comparison(list(run_dirs), title="comparison: MAE and bias scores in years, test split")
    console.print(f"report: {report}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (synthetic data, runs, report)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Synthetic benchmark + M1..M5 at CPU scale (minutes on a laptop); prints the table and report path."""
    from .suite import REPORT_PRESETS, run_demo

    report = run_demo(out, progress=not quiet)
    if quiet:
        # run_demo printed nothing; the table and the path are the demo's result
        _print_comparison([out / p for p in REPORT_PRESETS],
                          title="synthetic benchmark: MAE and bias scores in years, test split")
        console.print(f"report: {report}")


# =========================================================================== entry point


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
