"""Experiment suite and demo: train several presets, compare them, write the report.

``run_suite`` trains each preset (optionally with several seeds) into its own run
folder under ``out_dir``, reusing any folder that already holds a finished run of
exactly the same config on the same data, then builds the comparison report
(``fairage.report.build_report``) in ``out_dir``.

``run_demo`` is the newcomer's one command: it writes the built-in synthetic
benchmark at demo size, runs the suite at ``cpu`` scale on M1..M5 and prints the
table. Demo sizes and the ``cpu`` scale numbers (``fairage.config.apply_scale``)
are chosen so that the whole demo fits in 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from .config import ExperimentConfig, apply_scale, dump_config, load_preset, preset_raw
from .errors import ConfigError

#: the seed report's five configurations, in its order
REPORT_PRESETS: tuple[str, ...] = ("M1", "M2", "M3", "M4", "M5")
#: named preset groups for ``--presets``: the field's mitigation methods next to M1 and M5
PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "methods": ("M1", "M5", "M5-dro", "M5-bmc", "M5-std", "M5-dex"),
}


def expand_presets(names: Sequence[str]) -> list[str]:
    """Preset names with each group name (``PRESET_GROUPS``) replaced by its members, in order."""
    out: list[str] = []
    for name in names:
        out.extend(PRESET_GROUPS.get(name, (name,)))
    return out

#: synthetic benchmark size for ``fairage demo`` (faces per split, image side in px)
DEMO_SIZES: dict[str, int] = {"n_train": 1200, "n_valid": 300, "n_test": 1000, "size": 64}
DEMO_SEED = 0
#: the demo's stand-in for a pretrained backbone: M1 trained on disjoint synthetic faces
PRETRAIN_SIZES: dict[str, int] = {"n_train": 1500, "n_valid": 300, "n_test": 200}
PRETRAIN_SEED = 1
#: all-layers learning rate of the demo's presets when they start from the pretrained backbone
PRETRAINED_STAGE2_LR = 3e-4


def run_name(preset: str, seed_index: int, seeds: int) -> str:
    """Run folder name: ``<preset>`` for one seed, ``<preset>-seed<k>`` for several."""
    return preset if seeds == 1 else f"{preset}-seed{seed_index}"


def suite_configs(presets: Sequence[str] = REPORT_PRESETS, scale: str = "cpu", seeds: int = 1,
                  overrides: Sequence[str] | None = None) -> list[tuple[str, ExperimentConfig]]:
    """Resolve every (preset, seed) of a suite: list of (run folder name, config).

    With ``seeds`` K > 1, run k (0..K-1) uses seed = the preset's seed + k (after
    ``overrides``, so ``--set seed=10`` shifts all of them).
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    presets = expand_presets(presets)
    if not presets:
        raise ConfigError("no presets given")
    dupes = sorted({p for p in presets if presets.count(p) > 1})
    if dupes:
        raise ConfigError(f"preset listed twice: {', '.join(dupes)}")
    out = []
    for preset in presets:
        base = load_preset(preset, scale, _overrides_for(preset, scale, overrides or []))
        for k in range(seeds):
            cfg = base if k == 0 else base.model_copy(update={"seed": base.seed + k})
            out.append((run_name(preset, k, seeds), cfg))
    return out


def _overrides_for(preset: str, scale: str, overrides: Sequence[str]) -> list[str]:
    """The overrides that apply to ``preset``: suite overrides go to every preset, but
    one inside a stage the preset does not have (``stage2.lr=...`` for head-only M2)
    is left out rather than adding that stage. ``stage2=...`` itself still applies.
    """
    raw = apply_scale(preset_raw(preset), scale)
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if len(parts) > 1 and parts[0] in ("stage1", "stage2") and raw.get(parts[0]) is None:
            continue
        kept.append(item)
    return kept


def _same_run(run_dir: Path, cfg: ExperimentConfig, data_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a run (finished or not) of ``cfg`` on ``data_dir``."""
    cfg_path, info_path = run_dir / "config.yaml", run_dir / "run.json"
    if not cfg_path.is_file() or not info_path.is_file():
        return False
    try:
        stored = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    # compare as the YAML the training wrote (dump_config), so float/path formatting matches
    if stored != yaml.safe_load(dump_config(cfg)):
        return False
    recorded = info.get("data_dir")
    return bool(recorded) and Path(recorded).resolve() == Path(data_dir).resolve()


def is_finished_run(run_dir: str | Path, cfg: ExperimentConfig, data_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run of ``cfg`` on ``data_dir``.

    Finished = ``metrics_test.json`` exists (training writes it last); same run =
    its ``config.yaml`` equals ``cfg`` and its ``run.json`` names ``data_dir``.
    """
    run_dir = Path(run_dir)
    return (run_dir / "metrics_test.json").is_file() and _same_run(run_dir, cfg, data_dir)


def _console(progress: bool):
    from rich.console import Console

    return Console(quiet=not progress)


def run_suite(data_dir: str | Path, out_dir: str | Path, presets: Sequence[str] = REPORT_PRESETS,
              scale: str = "cpu", seeds: int = 1, overrides: Sequence[str] | None = None,
              progress: bool = True) -> Path:
    """Train and compare presets; return the path of ``out_dir/report.html``.

    Each (preset, seed) trains into ``out_dir/<preset>`` (``<preset>-seed<k>`` with
    several seeds) via ``fairage.training.train``, which also evaluates on the test
    split. A folder that already holds a finished run of the same config and data is
    reused, not retrained. Then ``comparison.csv``, ``comparison.md``, the plots and
    ``report.html`` are written into ``out_dir``, with the dataset's counts per
    attribute.
    """
    from .data import load_faces
    from .report import build_report

    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    console = _console(progress)
    # resolve every config and read the data first, so a typo fails before hours of training
    plan = suite_configs(presets, scale, seeds, overrides)
    faces = load_faces(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for i, (name, cfg) in enumerate(plan, start=1):
        run_dir = out_dir / name
        _train_or_reuse(run_dir, cfg, data_dir, f"[{i}/{len(plan)}] {name}", scale, console, progress)
        run_dirs.append(run_dir)
    return build_report(run_dirs, out_dir, dataset_summary=faces)


def _train_or_reuse(run_dir: Path, cfg: ExperimentConfig, data_dir: Path, tag: str, scale: str, console,
                    progress: bool) -> None:
    """Leave a finished run of ``cfg`` on ``data_dir`` in ``run_dir``: reuse it, resume it, or train it.

    A folder holding a run of another config or data is kept under ``<name>.replaced-<k>``.
    """
    from . import training

    if is_finished_run(run_dir, cfg, data_dir):
        console.print(f"{tag}: reusing the finished run in {run_dir}")
        return
    resume = _same_run(run_dir, cfg, data_dir)  # an interrupted run of this very config
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        # another config or data set ran here: keep it, under a new name, and start afresh
        k = 1
        while run_dir.with_name(f"{run_dir.name}.replaced-{k}").exists():
            k += 1
        moved = run_dir.rename(run_dir.with_name(f"{run_dir.name}.replaced-{k}"))
        console.print(f"{tag}: {run_dir} held a run of another config or data; moved it to {moved}")
    verb = "resuming the interrupted run" if resume else "training"
    console.print(f"{tag}: {verb} ({cfg.strategy}, scale {scale}, seed {cfg.seed}) in {run_dir}")
    started = time.perf_counter()
    training.train(cfg, data_dir, run_dir, resume=resume, progress=progress)
    console.print(f"{tag}: done in {time.perf_counter() - started:.0f} s")
    run_json = run_dir / "run.json"
    warnings = json.loads(run_json.read_text(encoding="utf-8")).get("warnings", []) if run_json.is_file() else []
    for message in warnings:
        console.print(f"[yellow]{tag}: warning:[/yellow] {message}", highlight=False)


def _synthetic_once(out_dir: Path, n_train: int, n_valid: int, n_test: int, size: int, seed: int,
                    console) -> Path:
    """Write the synthetic benchmark into a folder named by its parameters, unless already complete."""
    from .data import write_synthetic
    from .data.synthetic import SYNTH_VERSION

    data_dir = out_dir / f"synthetic-v{SYNTH_VERSION}-{size}px-{n_train}-{n_valid}-{n_test}-seed{seed}"
    marker = data_dir / ".complete"
    if not marker.is_file():
        console.print(f"writing the synthetic benchmark ({n_train}/{n_valid}/{n_test} faces, {size} px, "
                      f"seed {seed}) to {data_dir}")
        write_synthetic(data_dir, n_train=n_train, n_valid=n_valid, n_test=n_test, size=size, seed=seed)
        marker.write_text("written by fairage demo\n", encoding="utf-8")
    else:
        console.print(f"reusing the synthetic benchmark in {data_dir}")
    return data_dir


def pretrain_backbone(out_dir: str | Path, scale: str = "cpu", size: int = DEMO_SIZES["size"],
                      sizes: dict[str, int] | None = None, seed: int = PRETRAIN_SEED,
                      progress: bool = True) -> Path:
    """Train the demo's stand-in for a pretrained backbone; return its weights file.

    The report starts every model from a VGGFace2 ResNet50; nothing can be downloaded
    here, so the demo pretrains its own: preset M1 (at ``scale``) on a separate synthetic
    set drawn with another seed (no face in common with the demo's data), in the way
    apparent-age models are often pretrained on a large real-age set (IMDB-WIKI) first.
    Like a real pretrained network it has seen mostly the majority group. The run goes to
    ``out_dir/pretrain``, the backbone to ``out_dir/pretrained-backbone.safetensors``;
    both are reused when already there.
    """
    from . import training

    out_dir = Path(out_dir)
    sizes = {**PRETRAIN_SIZES, **(sizes or {})}
    console = _console(progress)
    weights = out_dir / "pretrained-backbone.safetensors"
    data_dir = _synthetic_once(out_dir, sizes["n_train"], sizes["n_valid"], sizes["n_test"], size, seed, console)
    cfg = load_preset("M1", scale, ["name=pretrain"])
    run_dir = out_dir / "pretrain"
    if weights.is_file() and is_finished_run(run_dir, cfg, data_dir):
        console.print(f"reusing the pretrained backbone {weights}")
        return weights
    _train_or_reuse(run_dir, cfg, data_dir, "pretraining the stand-in backbone (M1)", scale, console, progress)
    return training.export_backbone(run_dir, weights)


def run_demo(out_dir: str | Path = "runs/demo", presets: Sequence[str] = REPORT_PRESETS,
             scale: str = "cpu", n_train: int = DEMO_SIZES["n_train"], n_valid: int = DEMO_SIZES["n_valid"],
             n_test: int = DEMO_SIZES["n_test"], size: int = DEMO_SIZES["size"], seed: int = DEMO_SEED,
             pretrain: bool = True, pretrain_sizes: dict[str, int] | None = None,
             progress: bool = True) -> Path:
    """Synthetic benchmark + suite at ``cpu`` scale on M1..M5; print the table; return report.html.

    The data goes to ``out_dir/synthetic-v<version>-<size>px-<n_train>-<n_valid>-<n_test>-seed<seed>``
    (the name records its parameters, so runs trained on other data are never reused)
    and is only generated when that folder is not complete yet. With ``pretrain`` (the
    default) every preset starts from the stand-in pretrained backbone of
    ``pretrain_backbone``, as the report's models start from VGGFace2; without it they
    start from random init and the frozen-backbone presets M2/M4 have nothing to build on.
    """
    from .report import comparison_table, rich_table

    started = time.perf_counter()
    out_dir = Path(out_dir)
    console = _console(progress)
    data_dir = _synthetic_once(out_dir, n_train, n_valid, n_test, size, seed, console)
    overrides = []
    if pretrain:
        weights = pretrain_backbone(out_dir, scale, size, pretrain_sizes, progress=progress)
        # fine-tuning a trained backbone wants a smaller step than cpu scale's 1e-3 from random init
        overrides += [f"model.weights={weights.resolve()}", f"stage2.lr={PRETRAINED_STAGE2_LR}"]
    report = run_suite(data_dir, out_dir, presets=presets, scale=scale, seeds=1, overrides=overrides,
                       progress=progress)
    run_dirs = [out_dir / p for p in presets]
    console.print(rich_table(comparison_table(run_dirs),
                             title="synthetic benchmark: MAE and bias scores (years), test split"))
    console.print("[bold]The data is synthetic: these numbers say nothing about real faces.[/bold]")
    console.print(f"report: {report}  (demo wall time {time.perf_counter() - started:.0f} s)")
    return report
