"""``fairage demo``: the synthetic benchmark and M1..M5 at CPU scale, end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _print_comparison,
    app,
    console,
)
from .suite import _suite_printer


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (synthetic data, runs, report)."),
    pretrain: bool = typer.Option(
        True,
        "--pretrain/--no-pretrain",
        help="Start every model from a backbone pretrained on other synthetic faces "
        "(the stand-in for VGGFace2), or from random init.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Synthetic benchmark + M1..M5 at CPU scale (minutes on a laptop); prints the table and report path."""
    from ..workflows.suite import REPORT_PRESETS, run_demo

    report = run_demo(out, pretrain=pretrain, progress=not quiet, on_event=_suite_printer(quiet))
    _print_comparison(
        [out / p for p in REPORT_PRESETS], title="synthetic benchmark: MAE and bias scores in years, test split"
    )
    console.print("[bold]The data is synthetic: these numbers say nothing about real faces.[/bold]")
    console.print(f"report: {report}")
