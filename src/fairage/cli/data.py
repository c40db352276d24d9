"""``fairage synth`` and ``fairage data info``: write a synthetic dataset, describe a dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config.schema import MAX_IMAGE_SIZE
from .common import (
    _ABSOLUTE_HELP,
    _EXTRA_CATEGORIES_HELP,
    _SKIP_BAD_HELP,
    _data_flags,
    app,
    console,
    data_app,
    err_console,
)


@app.command("synth")
def synth_command(
    out: Path = typer.Argument(..., help="Output folder (APPA-REAL release layout)."),
    n_train: int = typer.Option(4000, "--n-train", min=0, help="Faces in the train split."),
    n_valid: int = typer.Option(1500, "--n-valid", min=0, help="Faces in the valid split."),
    n_test: int = typer.Option(2000, "--n-test", min=0, help="Faces in the test split."),
    size: int = typer.Option(224, "--size", min=16, max=MAX_IMAGE_SIZE, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed -> byte-identical files)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes drawing faces (output does not depend on it)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Write the synthetic face benchmark (procedural faces with age, gender, ethnicity, expression)."""
    from ..data import load_faces, write_synthetic

    root = write_synthetic(
        out, n_train=n_train, n_valid=n_valid, n_test=n_test, size=size, seed=seed, workers=workers, progress=not quiet
    )
    faces = load_faces(root)
    console.print(f"wrote {len(faces)} synthetic faces ({size} px, seed {seed}) to {root}")


@data_app.command("info")
# size: typer command: its parameters are the CLI options
def data_info_command(
    root: Path = typer.Argument(..., help="Dataset folder (or a CSV file for the csv layout)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    layout: str | None = typer.Option(
        None, "--layout", help="Force a layout: appa, npy, utkface, csv (default: detect)."
    ),
    target: str = typer.Option(
        "apparent", "--target", help="appa only: apparent (apparent_age_avg) or real (real_age)."
    ),
    full_images: bool = typer.Option(
        False, "--full-images", help="appa only: the full photos instead of the face crops."
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed of the stratified split (utkface, csv without a split column)."
    ),
) -> None:
    """Show a dataset: layout, faces per split, counts per attribute value, age histogram."""
    import json

    from ..data.loaders import inspect_dataset

    options = _data_flags(skip_bad, extra_categories, allow_absolute_paths, layout)
    faces, info = inspect_dataset(root, target=target, full_images=full_images, seed=seed, **options)
    skipped = faces.attrs.get("skipped", [])
    if skipped:
        from rich.markup import escape

        err_console.print(f"[yellow]skipped {len(skipped)} bad image(s):[/yellow]", highlight=False)
        for line in skipped:
            err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print_info(root, info, len(faces))


def _print_info(root: Path, info: dict, total: int) -> None:
    """The tables of ``fairage data info``: faces per split and attribute value, the age histogram."""
    from rich.table import Table

    from ..data.loaders import histogram_rows

    splits = list(info["splits"])
    console.print(
        f"[bold]{root}[/bold]: layout [bold]{info['layout']}[/bold], {total} faces "
        + ", ".join(f"{s} {info['splits'][s]['n']}" for s in splits),
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title="faces per split and attribute value")
    table.add_column("attribute")
    table.add_column("value")
    for s in splits:
        table.add_column(s, justify="right")
    for attribute in info["attributes"]:
        values = sorted({v for s in splits for v in info["splits"][s][attribute]})
        for k, v in enumerate(values):
            table.add_row(
                attribute if k == 0 else "",
                v,
                *[str(info["splits"][s][attribute].get(v, 0)) for s in splits],
                end_section=k == len(values) - 1,
            )
    table.add_row(
        "age",
        "min / mean / max",
        *[f"{info['age'][s]['min']:.1f} / {info['age'][s]['mean']:.1f} / {info['age'][s]['max']:.1f}" for s in splits],
    )
    console.print(table)
    hist = Table(title="age histogram (years, all splits)")
    hist.add_column("age")
    hist.add_column("n", justify="right")
    hist.add_column("")
    for label, count, bar in histogram_rows(info["age_histogram"]):
        hist.add_row(label, str(count), "█" * bar)
    console.print(hist)
