"""``fairage weights``: the sample weights a weighting config gives a training split."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _ABSOLUTE_HELP,
    _EXTRA_CATEGORIES_HELP,
    _SKIP_BAD_HELP,
    _data_flags,
    _parse_edges,
    app,
    console,
    err_console,
)


@app.command("weights")
# size: typer command: its parameters are the CLI options
def weights_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder; weights are computed on its train split."),
    scheme: str | None = typer.Option(
        None,
        "--scheme",
        help="none, age, age_ethnicity (10 groups; the default), age_ethnicity_expression (48), "
        "custom. With --formula lds the default is none (LDS alone).",
    ),
    formula: str = typer.Option(
        "inverse",
        "--formula",
        help="inverse (N/(K n_j)), sqrt_inverse, effective_number, or lds (= --lds with inverse).",
    ),
    lds: bool = typer.Option(False, "--lds", help="Multiply by label-distribution-smoothing weights of the age."),
    attributes: str | None = typer.Option(None, "--attributes", help="custom scheme: comma list, e.g. age,gender."),
    age_edges: str | None = typer.Option(None, "--age-edges", help="custom scheme: inner age edges, e.g. 20,40,60."),
    pseudo_count: float = typer.Option(0.0, "--pseudo-count", help="Added to every group count (the report used 1)."),
    beta: float = typer.Option(0.999, "--beta", help="effective_number's beta."),
    max_weight: float | None = typer.Option(None, "--max-weight", help="Clip weights (after mean-1 rescaling)."),
    layout: str | None = typer.Option(None, "--layout", help="Force a layout: appa, npy, utkface, csv."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path | None = typer.Option(None, "--plot", help="Also save a plot of group sizes against weights (PNG)."),
) -> None:
    """Group sizes and per-face weights of a weighting scheme on the training split (mean 1).

    ``--formula lds`` is shorthand for ``--lds`` (with the inverse group formula); without
    ``--scheme`` it means LDS alone, shown by the report's four age bins.
    """
    import json

    from ..fairness.weighting import describe, summarize_dataset_weights, weighting_from_options

    cfg = weighting_from_options(
        scheme,
        formula,
        lds,
        attributes=[a.strip() for a in (attributes or "").split(",") if a.strip()],
        age_edges=_parse_edges(age_edges) if age_edges else None,
        pseudo_count=pseudo_count,
        beta=beta,
        max_weight=max_weight,
    )
    summary = summarize_dataset_weights(
        data, cfg, **_data_flags(skip_bad, extra_categories, allow_absolute_paths, layout)
    )
    if plot is not None:
        from ..outputs.plots import plot_group_weights

        plot_group_weights(summary.table, plot, title=describe(cfg))
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
        return
    _print_weights(summary, describe(cfg))
    for w in summary.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def _print_weights(summary, description: str) -> None:
    """The table of ``fairage weights``: each group's size, weight per face and share (dominated groups red)."""
    from rich.table import Table

    out = Table(title=f"weights on {summary.n} training faces: {description} (mean 1 per face)")
    out.add_column("group")
    out.add_column("n", justify="right")
    out.add_column("weight / face", justify="right")
    out.add_column("share of weight", justify="right")
    for r in summary.table.itertuples():
        out.add_row(
            r.name,
            str(r.n),
            "-" if r.n == 0 else f"{r.weight:.3f}",
            f"{100 * r.share:.1f}%",
            style="red" if r.name in summary.heavy else None,
        )
    console.print(out)
