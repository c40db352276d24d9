"""``fairage tune``: a multi-objective search over configs."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _check_trainers,
    _fmt_number,
    _sigterm_exits,
    _tracking_overrides,
    app,
    console,
    err_console,
    fail,
)


@app.command("tune")
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
    from rich.table import Table

    from ..workflows.tune import (
        FRONT,
        FRONT_PLOT,
        TRIALS,
        SearchSpace,
        default_storage,
        load_base,
        open_study,
        parse_objectives,
        pick_trial,
        run_tune,
    )

    names = parse_objectives(objectives)
    url = storage or default_storage(out)
    if data is not None:
        base = load_base(config, preset, scale, _tracking_overrides(tracking_uri) + list(set_ or []))
        _check_trainers([base])
        space_ = SearchSpace.from_file(space, base) if space else SearchSpace.default(scale, base)

        def show(event) -> None:
            if event.warning:
                err_console.print(f"[yellow]warning:[/yellow] {event.message}", highlight=False, soft_wrap=True)
            else:
                console.print(event.message, highlight=False, soft_wrap=True)

        with _sigterm_exits(
            "run the same `fairage tune` command again: finished trials are kept, the interrupted one is retried", None
        ):
            tuner = run_tune(
                data,
                out,
                base,
                space_,
                names,
                trials,
                url,
                study,
                sampler,
                scale,
                seed,
                show,
                references=list(reference or []),
            )
        study_ = tuner.study
        front = tuner.write_tables()[1]
        table = Table(title=f"Pareto front of study '{study}' (validation; test beside), years")
        table.add_column("trial", justify="right")
        for name in names:
            table.add_column(f"val {name}", justify="right")
            table.add_column(f"test {name}", justify="right")
        for _, row in front.iterrows():
            cells = [str(int(row["number"]))]
            for name in names:
                cells.extend(_fmt_number(row[f"{split}_{name}"]) for split in ("val", "test"))
            table.add_row(*cells)
        console.print(table)
        console.print(f"trials: {out / TRIALS}  front: {out / FRONT}  plot: {out / FRONT_PLOT}")
        console.print(
            f"HTML report of the front: fairage report [BASELINE_RUN ...] --tune {out} --out DIR", highlight=False
        )
    elif pick is None:
        fail("--data DIR is required to run trials (only --pick reads a finished study without it)")
    elif tracking_uri is not None:
        fail("--tracking-uri applies to trials run with --data DIR, not to --pick alone")
    else:
        if storage is None and not (out / "study.db").is_file():
            fail(f"{out} holds no study (no study.db); run `fairage tune --data DIR --out {out}` first")
        study_ = open_study(url, study)
    if pick is not None:
        chosen = pick_trial(study_, pick, out)
        values = ", ".join(f"validation {n} {v:.3f}" for n, v in chosen.values.items())
        console.print(f"picked trial {chosen.number} ({values}); run folder {chosen.run_dir}", highlight=False)
        console.print(chosen.config_path.read_text(encoding="utf-8"), highlight=False, markup=False)
        console.print(f"config written to {chosen.config_path}", highlight=False)
