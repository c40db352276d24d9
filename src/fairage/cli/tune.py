"""``fairage tune``: a multi-objective search over configs."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _fmt_number,
    _terminated_exits,
    _tracking_overrides,
    app,
    console,
    err_console,
)


@app.command("tune")
# size: typer command: its parameters are the CLI options
def tune_command(
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder (any layout fairage reads); not needed with --pick on a finished study."
    ),
    out: Path = typer.Option(..., "--out", help="Tune folder: study.db, trials.csv, front.csv, trials/trial-NNNN."),
    space: Path | None = typer.Option(
        None, "--space", help="Search space YAML over config keys (default: the shipped space of --scale)."
    ),
    trials: int = typer.Option(20, "--trials", min=0, help="Trials in the study, all workers together."),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Optuna storage URL shared by workers "
        "(postgresql://..., mysql://..., journal:///shared/tune.log); "
        "default sqlite:///OUT/study.db.",
    ),
    study: str = typer.Option("fairage-tune", "--study", help="Study name within the storage."),
    objectives: str = typer.Option(
        "mae,age_bias", "--objectives", help="Validation objectives, all minimised: mae, <attr>_bias, worst_<attr>_mae."
    ),
    scale: str = typer.Option("cpu", "--scale", help="Scale of the base preset and default space: full, cpu, tiny."),
    preset: str = typer.Option("M1", "--preset", help="Base preset every trial starts from."),
    config: Path | None = typer.Option(None, "--config", help="Base config YAML instead of --preset."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override of the base config (repeatable)."),
    sampler: str = typer.Option("nsga2", "--sampler", help="Optuna sampler: nsga2 or tpe."),
    seed: int | None = typer.Option(
        None, "--seed", help="Sampler seed (default: the base config's seed); give each machine its own."
    ),
    pick: str | None = typer.Option(
        None,
        "--pick",
        help="Choose a trial on validation figures, e.g. "
        '"age_bias<=1.0" or "mae<=+0.3" (within 0.3 of the best MAE); '
        "writes OUT/picked.yaml.",
    ),
    reference: list[Path] | None = typer.Option(
        None,
        "--reference",
        help="A finished run folder (e.g. the suite's M1) drawn as a reference point in front.png (repeatable).",
    ),
    tracking_uri: str | None = typer.Option(
        None,
        "--tracking-uri",
        help="Log every trial to this MLflow "
        "tracking server or store (experiment: the study's name); sets "
        "trainer.logger=mlflow. Default with trainer.logger=mlflow: "
        "sqlite:///OUT/mlflow.db.",
    ),
) -> None:
    """Search a config space for the accuracy-fairness Pareto front (Optuna; several machines may share a study)."""
    from ..workflows.tune import TuneRequest, pick_trial, tune

    request = TuneRequest(
        out=out,
        data=data,
        space=space,
        trials=trials,
        storage=storage,
        study=study,
        objectives=objectives,
        scale=scale,
        preset=preset,
        config=config,
        overrides=tuple(_tracking_overrides(tracking_uri) + list(set_ or [])),
        sampler=sampler,
        seed=seed,
        pick=pick,
        references=tuple(reference or []),
        tracking_uri=tracking_uri,
    )
    hint = "run the same `fairage tune` command again: finished trials are kept, the interrupted one is retried"
    with _terminated_exits(hint, None):
        outcome = tune(request, _show_event)
    if outcome.front is not None:
        _print_front(outcome, study, out)
    if pick is not None:
        _print_pick(pick_trial(outcome.study, pick, out))


def _show_event(event) -> None:
    """A trial's progress line (stdout), or its warning (stderr)."""
    if event.warning:
        err_console.print(f"[yellow]warning:[/yellow] {event.message}", highlight=False, soft_wrap=True)
    else:
        console.print(event.message, highlight=False, soft_wrap=True)


def _print_front(outcome, study: str, out: Path) -> None:
    """The Pareto front table (validation objectives, test beside, years) and where the files are."""
    from rich.table import Table

    from ..workflows.tune import FRONT, FRONT_PLOT, TRIALS

    names = outcome.objectives
    table = Table(title=f"Pareto front of study '{study}' (validation; test beside), years")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(f"val {name}", justify="right")
        table.add_column(f"test {name}", justify="right")
    for _, row in outcome.front.iterrows():
        cells = [str(int(row["number"]))]
        for name in names:
            cells.extend(_fmt_number(row[f"{split}_{name}"]) for split in ("val", "test"))
        table.add_row(*cells)
    console.print(table)
    console.print(f"trials: {out / TRIALS}  front: {out / FRONT}  plot: {out / FRONT_PLOT}")
    console.print(
        f"HTML report of the front: fairage report [BASELINE_RUN ...] --tune {out} --out DIR", highlight=False
    )


def _print_pick(chosen) -> None:
    """The picked trial, its config (as written) and where the config went."""
    values = ", ".join(f"validation {n} {v:.3f}" for n, v in chosen.values.items())
    console.print(f"picked trial {chosen.number} ({values}); run folder {chosen.run_dir}", highlight=False)
    console.print(chosen.config_path.read_text(encoding="utf-8"), highlight=False, markup=False)
    console.print(f"config written to {chosen.config_path}", highlight=False)
