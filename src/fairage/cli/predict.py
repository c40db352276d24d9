"""``fairage predict`` and ``fairage calibrate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .common import app, console, err_console, fail


@app.command("predict")
# size: typer command: its parameters are the CLI options
def predict_command(
    model: Path = typer.Argument(..., help="A run folder, a model folder (import-keras) or an exported .onnx file."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (recursive) and globs."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="CSV to write: image,face,x,y,w,h,score,age (image,age with --faces); "
        "then age_lo,age_hi (conformal interval) for a calibrated model.",
    ),
    faces: bool = typer.Option(False, "--faces", help="Inputs are already face crops: no detection, one row each."),
    annotate: Path | None = typer.Option(
        None, "--annotate", help="Folder for copies of the photos with boxes and ages drawn (detect mode)."
    ),
    detector: str = typer.Option("auto", "--detector", help="auto (best installed), yunet, haar or dlib."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Faces per forward pass."),
    device: str | None = typer.Option(
        None, "--device", help="torch device, e.g. cpu or cuda (default: GPU when present)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Ages of every face in photos (or of face crops with --faces), written as CSV."""
    from ..inference.predictor import AgePredictor, expand_inputs, predict_to_csv

    files = expand_inputs(inputs)
    if not files:
        fail("no image files in the inputs")
    if any(Path(path).resolve() == out.resolve() for path, _ in files):
        fail(f"--out {out} is one of the input images; choose another file for the CSV")
    predictor = AgePredictor(model, detector=detector, device=device, batch_size=batch_size)
    task = "predicting" if faces else f"detecting ({predictor.detector.name}) and predicting"
    with _progress(quiet) as bar:
        job = bar.add_task(task, total=len(files))
        done = predict_to_csv(predictor, files, out, faces, annotate, on_file=lambda: bar.advance(job))
    for message in done.unreadable:
        err_console.print(f"[yellow]skipped:[/yellow] {message}", highlight=False, soft_wrap=True)
    if done.n_photos == 0:
        fail(f"none of the {len(files)} input file(s) could be read as an image")
    n_photos, n_faces, n_empty, unreadable = done.n_photos, done.n_faces, done.n_empty, done.unreadable
    what = (
        f"{n_photos} face crops" if faces else (f"{n_photos} photos, {n_faces} faces, {n_empty} photos without a face")
    )
    console.print(
        f"{what}, {len(unreadable)} unreadable files; model {predictor.loaded.name} "
        f"({predictor.loaded.kind}, {predictor.image_size} px) -> {out}",
        highlight=False,
        soft_wrap=True,
    )


def _progress(quiet: bool):
    """The progress bar of ``fairage predict`` (stderr, gone when done; none with ``--quiet``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=True,
        console=Console(stderr=True),
    )


@app.command("calibrate")
def calibrate_command(
    model: Path = typer.Argument(..., help="A run folder or a model folder (import-keras)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    split: str = typer.Option("valid", "--split", help="Split to calibrate on: faces the model did not train on."),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        min=0.001,
        max=0.5,
        help="Miscoverage: intervals aim at 1 - alpha (default: eval.conformal.alpha, 0.1).",
    ),
    by: list[str] | None = typer.Option(
        None,
        "--by",
        help="Attribute calibrated separately (repeatable; 'age' = true "
        "age bins; several = their intersection; 'none' = plain). "
        "Default: eval.conformal.by.",
    ),
    min_group: int | None = typer.Option(
        None, "--min-group", min=0, help="Fewest faces a group needs for its own quantile."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fit the conformal age intervals of a model and store them in its folder (conformal.json).

    A finished run's predictions_test.csv and metrics_test.json are rewritten with the
    intervals (same predictions), so runs trained before intervals existed gain them.
    """
    from ..training import calibrate_folder

    chosen = None if not by else ([] if by == ["none"] else by)
    calibration, messages = calibrate_folder(
        model, data, split, alpha=alpha, by=chosen, min_group=min_group, progress=not quiet
    )
    for message in messages:
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    what = " x ".join(calibration.by) or "plain"
    console.print(
        f"calibrated {model} on {calibration.n} {split} faces: {100 * calibration.level:g}% intervals, "
        f"Mondrian by {what}; plain half-width {calibration.plain:.2f} years",
        highlight=False,
        soft_wrap=True,
    )
    for group, q in calibration.groups.items():
        note = (
            f" (too few faces: uses {'the plain quantile' if q.fallback == 'all' else q.fallback})"
            if q.fallback
            else ""
        )
        if q.split_quantile is not None and q.quantile < q.split_quantile:
            note = f" (split conformal {q.split_quantile:.2f}, tightened for the interval's hull)"
        console.print(f"  {group}: n={q.n}, half-width {q.quantile:.2f} years{note}", highlight=False, soft_wrap=True)
