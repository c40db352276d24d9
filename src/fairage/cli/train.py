"""``fairage train``, ``export-backbone`` and ``presets``."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    _ABSOLUTE_HELP,
    _EXTRA_CATEGORIES_HELP,
    _SKIP_BAD_HELP,
    _TRACKING_HELP,
    _as_overrides,
    _check_trainers,
    _data_flags,
    _sigterm_exits,
    _tracking_overrides,
    _warn_full_scale,
    app,
    console,
    err_console,
    fail,
)


def _train_summary(run_dir: Path, metrics) -> None:
    """One screen: where the run is, its stages, test MAE and bias scores (years)."""
    from rich.table import Table

    from ..store.run_folder import RunFolder

    folder = RunFolder.open(run_dir)
    table = Table(title=f"finished: {run_dir} (test split, years)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("CI", justify="right")

    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair is not None else ""

    table.add_row("faces", str(metrics.n), "")
    table.add_row("MAE", f"{metrics.mae:.3f}", ci(metrics.mae_ci))
    for attr, value in metrics.bias.items():
        if value is not None:
            table.add_row(f"{attr} bias", f"{value:.3f}", ci(metrics.bias_ci.get(attr)))
    for stage, best in folder.best_epochs().items():
        val_mae = "n/a" if best["val_mae"] is None else f"{best['val_mae']:.3f}"
        table.add_row(
            f"{stage}: epochs / best val MAE", f"{best['epochs_run']} / {val_mae} (epoch {best['epoch']})", ""
        )
    table.add_row("pretrained weights", "yes" if folder.record.weights_loaded else "no (random init)", "")
    for message in folder.warnings():
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    console.print(table)
    files = f"{RunFolder.PREDICTIONS}, {RunFolder.METRICS}, {RunFolder.CURVES}, {RunFolder.HISTORY}"
    console.print(f"run folder: {run_dir} ({files})")


def _interruptible(run_dir: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; on Ctrl-C (which Lightning turns into SystemExit) print how to resume."""
    from ..store.run_folder import is_rank_zero

    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        if is_rank_zero():
            err_console.print(f"interrupted: continue with `fairage train --resume {run_dir}`", highlight=False)
        raise


@app.command("train")
# size: typer command: its parameters are the CLI options
def train_command(
    config: Path | None = typer.Option(None, "--config", help="Experiment config YAML (see docs/training.md)."),
    preset: str | None = typer.Option(
        None, "--preset", help="A shipped preset instead of --config (see `fairage presets`)."
    ),
    scale: str = typer.Option("full", "--scale", help="Preset scale: full, cpu (resnet18, 64 px) or tiny."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (any layout fairage reads)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder to create, e.g. runs/NAME."),
    set_: list[str] | None = typer.Option(None, "--set", help="Config override, e.g. stage2.lr=5e-5 (repeatable)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
    devices: str | None = typer.Option(None, "--devices", help="Devices per node (Lightning), e.g. 2 or auto."),
    strategy: str | None = typer.Option(None, "--strategy", help="Lightning strategy, e.g. ddp."),
    num_nodes: int | None = typer.Option(None, "--num-nodes", min=1, help="Machines (Lightning num_nodes)."),
    accelerator: str | None = typer.Option(None, "--accelerator", help="cpu, gpu or auto."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Bitwise-repeatable kernels where torch allows."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=_TRACKING_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """Train a model (stage I and/or II), evaluate it on the test split, print a summary."""
    from ..store.run_folder import RunFolder
    from ..training import train
    from ..workflows.train import train_config, trainer_overrides

    progress = not quiet
    data_overrides = _as_overrides(_data_flags(skip_bad, extra_categories, allow_absolute_paths))
    if resume is not None:
        _resume(resume, bool(config or preset or data or out or set_ or data_overrides or tracking_uri), progress)
        return
    overrides = _tracking_overrides(tracking_uri) + list(set_ or []) + data_overrides
    overrides += trainer_overrides(accelerator, devices, strategy, num_nodes, deterministic)
    cfg = train_config(config, preset, scale, data, out, overrides)
    if preset is not None:
        _warn_full_scale(cfg, scale)
    with _sigterm_exits(f"continue with `fairage train --resume {out}`", RunFolder(out).file(RunFolder.RUN)):
        metrics = _interruptible(out, train, cfg, data, out, progress=progress)
    if metrics:  # None on non-zero DDP ranks
        _train_summary(out, metrics)


def _resume(resume: Path, other_options: bool, progress: bool) -> None:
    """``fairage train --resume``: continue the run in ``resume`` (no other option may be given)."""
    from ..store.run_folder import RunFolder
    from ..training import resume_run

    if other_options:
        fail("--resume takes only the run folder (its config.yaml and run.json hold the rest)")
    if RunFolder.exists(resume):
        _check_trainers([RunFolder.open(resume).config()])
    with _sigterm_exits(f"continue with `fairage train --resume {resume}`", RunFolder(resume).file(RunFolder.RUN)):
        metrics = _interruptible(resume, resume_run, resume, progress=progress)
    if metrics:
        _train_summary(resume, metrics)


@app.command("export-backbone")
def export_backbone_command(
    run: Path = typer.Argument(..., help="A finished run folder, or one of its checkpoint files (.ckpt)."),
    out: Path = typer.Option(..., "--out", help="Weights file to write (.safetensors or .pth)."),
) -> None:
    """Save a finished run's backbone for another config's model.weights (pretrain on one set, fine-tune on another)."""
    from ..training import export_backbone

    path = export_backbone(run, out)
    console.print(f"wrote {path}: use it with --set model.weights={path}", highlight=False)


@app.command("presets")
def presets_command() -> None:
    """List the shipped presets (M1..M5 and variants) with a one-line description."""
    from rich.table import Table

    from ..config.presets import list_presets

    table = Table(title="presets (fairage suite --presets NAME,...; scale with --scale full|cpu|tiny)")
    table.add_column("name")
    table.add_column("description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    console.print(table)
