"""Experiment suite and demo: train several presets, compare them, write the report.

``run_suite`` trains each preset (optionally with several seeds) into its own run
folder under ``out_dir``, reusing any folder that already holds a finished run of
exactly the same config on the same data, then builds the comparison report
(``fairage.outputs.report.build_report``) in ``out_dir``.

``run_demo`` is the newcomer's one command: it writes the built-in synthetic
benchmark at demo size, runs the suite at ``cpu`` scale on M1..M5 and prints the
table. Demo sizes and the ``cpu`` scale numbers (``fairage.config.presets.apply_scale``)
are chosen so that the whole demo fits in 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.presets import apply_scale, load_preset, preset_raw
from ..config.schema import ExperimentConfig
from ..errors import ConfigError, FairageError
from ..store.run_folder import RunFolder

#: the seed report's five configurations, in its order
REPORT_PRESETS: tuple[str, ...] = ("M1", "M2", "M3", "M4", "M5")
#: named preset groups for ``--presets``: the field's mitigation methods next to M1 and M5
PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "methods": ("M1", "M5", "M5-dro", "M5-bmc", "M5-std", "M5-dex", "M5-coral", "M5-corn"),
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
#: the demo's all-layers schedule at scale cpu: the one its synthetic faces were tuned with (8 epochs,
#: no augmentation, no warm-up or clipping, 64 px input), so its table and its few minutes stay as documented;
#: ``--scale cpu`` itself is tuned on real faces (docs/training.md)
DEMO_STAGE2 = (
    "stage2.max_epochs=8",
    "stage2.max_images=null",
    "stage2.patience=4",
    "stage2.lr_patience=2",
    "stage2.warmup_epochs=0",
    "stage2.grad_clip=null",
    "stage2.augment.enabled=false",
    "stage2.lr_schedule=plateau",
    "stage2.loss=mse",
    "model.flip_average=false",
    "data.image_size=64",
)


def run_name(preset: str, seed_index: int, seeds: int) -> str:
    """Run folder name: ``<preset>`` for one seed, ``<preset>-seed<k>`` for several.

    >>> run_name("M5", 0, 1), run_name("M5", 2, 3)
    ('M5', 'M5-seed2')
    """
    return preset if seeds == 1 else f"{preset}-seed{seed_index}"


def suite_configs(
    presets: Sequence[str] = REPORT_PRESETS, scale: str = "cpu", seeds: int = 1, overrides: Sequence[str] | None = None
) -> list[tuple[str, ExperimentConfig]]:
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


def is_finished_run(run_dir: str | Path, cfg: ExperimentConfig, data_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run of ``cfg`` on ``data_dir`` (``RunFolder.matches``)."""
    folder = _matching_run(run_dir, cfg, data_dir)
    return folder is not None and folder.is_finished()


def _matching_run(run_dir: str | Path, cfg: ExperimentConfig, data_dir: str | Path) -> RunFolder | None:
    """The run folder in ``run_dir`` when it holds a run (finished or not) of ``cfg`` on ``data_dir``."""
    if not RunFolder.exists(run_dir):
        return None
    try:
        folder = RunFolder.open(run_dir)
    except FairageError:  # a damaged folder is not this run
        return None
    return folder if folder.matches(cfg, data_dir) else None


@dataclass
class SuiteEvent:
    """One step of a suite, for its caller to show: ``message``, whether it is a warning, and
    whether it reports a failed run (``failed``: the run ended without a model, or a stage of it
    collapsed; the suite goes on with the other presets)."""

    message: str
    warning: bool = False
    failed: bool = False


SuiteListener = Callable[[SuiteEvent], None]


def _ignore(event: SuiteEvent) -> None:
    """The listener of a caller that shows nothing."""


# size: the suite's settings, each a CLI option of fairage suite
def run_suite(
    data_dir: str | Path,
    out_dir: str | Path,
    presets: Sequence[str] = REPORT_PRESETS,
    scale: str = "cpu",
    seeds: int = 1,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
    on_event: SuiteListener | None = None,
    plan: list[tuple[str, ExperimentConfig]] | None = None,
) -> Path:
    """Train and compare presets; return the path of ``out_dir/report.html``.

    Each (preset, seed) trains into ``out_dir/<preset>`` (``<preset>-seed<k>`` with
    several seeds) via ``fairage.training.train``, which also evaluates on the test
    split. A folder that already holds a finished run of the same config and data is
    reused, not retrained. Then ``comparison.csv``, ``comparison.md``, the plots and
    ``report.html`` are written into ``out_dir``, with the dataset's counts per
    attribute. ``progress``: Lightning's progress bars; ``on_event`` receives each step
    (training, reusing, and each run's warnings, stages stopped on a non-finite loss included).
    ``plan``: ``suite_configs(presets, scale, seeds, overrides)`` when the caller has resolved it already.
    """
    from ..data import load_faces
    from ..outputs.report import build_report
    from ..training.stage import CollapsedStageError

    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    notify = on_event or _ignore
    # resolve every config and read the data first, so a typo fails before hours of training
    if plan is None:
        plan = suite_configs(presets, scale, seeds, overrides)
    faces = load_faces(data_dir, **plan[0][1].data.loader_options())
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for i, (name, cfg) in enumerate(plan, start=1):
        run_dir = out_dir / name
        tag = f"[{i}/{len(plan)}] {name}"
        try:
            _train_or_reuse(run_dir, cfg, data_dir, tag, scale, notify, progress)
        except CollapsedStageError as err:  # no model to compare; the other presets still run
            notify(SuiteEvent(f"{tag}: failed: {err}", warning=True, failed=True))
            continue
        run_dirs.append(run_dir)
    if not run_dirs:
        raise FairageError("every run of the suite failed; see the messages above")
    return build_report(run_dirs, out_dir, dataset_summary=faces)


def _train_or_reuse(
    run_dir: Path, cfg: ExperimentConfig, data_dir: Path, tag: str, scale: str, notify: SuiteListener, progress: bool
) -> None:
    """Leave a finished run of ``cfg`` on ``data_dir`` in ``run_dir``: reuse it, resume it, or train it.

    A folder holding a run of another config or data is kept under ``<name>.replaced-<k>``.
    """
    from .. import training

    if is_finished_run(run_dir, cfg, data_dir):
        notify(SuiteEvent(f"{tag}: reusing the finished run in {run_dir}"))
        _notify_warnings(run_dir, tag, notify)
        return
    resume = _matching_run(run_dir, cfg, data_dir) is not None  # an interrupted run of this very config
    if not resume and run_dir.exists() and any(p.name != RunFolder.LOCK for p in run_dir.iterdir()):
        # another config or data set ran here: keep it, under a new name, and start afresh
        k = 1
        while run_dir.with_name(f"{run_dir.name}.replaced-{k}").exists():
            k += 1
        moved = run_dir.rename(run_dir.with_name(f"{run_dir.name}.replaced-{k}"))
        notify(SuiteEvent(f"{tag}: {run_dir} held a run of another config or data; moved it to {moved}"))
    verb = "resuming the interrupted run" if resume else "training"
    notify(SuiteEvent(f"{tag}: {verb} ({cfg.strategy}, scale {scale}, seed {cfg.seed}) in {run_dir}"))
    started = time.perf_counter()
    training.train(cfg, data_dir, run_dir, resume=resume, progress=progress)
    notify(SuiteEvent(f"{tag}: done in {time.perf_counter() - started:.0f} s"))
    _notify_warnings(run_dir, tag, notify)


def _notify_warnings(run_dir: Path, tag: str, notify: SuiteListener) -> None:
    """Each warning of the run in ``run_dir`` (stopped stages first) as a warning event."""
    if RunFolder.exists(run_dir):
        folder = RunFolder.open(run_dir)
        collapsed = set(folder.record.collapsed_stages.values())
        for message in folder.warnings():
            notify(SuiteEvent(f"{tag}: {message}", warning=True, failed=message in collapsed))


def _synthetic_once(
    out_dir: Path, n_train: int, n_valid: int, n_test: int, size: int, seed: int, notify: SuiteListener
) -> Path:
    """Write the synthetic benchmark into a folder named by its parameters, unless already complete."""
    from ..data import write_synthetic
    from ..data.synthetic import SYNTH_VERSION

    data_dir = out_dir / f"synthetic-v{SYNTH_VERSION}-{size}px-{n_train}-{n_valid}-{n_test}-seed{seed}"
    marker = data_dir / ".complete"
    if not marker.is_file():
        notify(
            SuiteEvent(
                f"writing the synthetic benchmark ({n_train}/{n_valid}/{n_test} faces, {size} px, "
                f"seed {seed}) to {data_dir}"
            )
        )
        write_synthetic(data_dir, n_train=n_train, n_valid=n_valid, n_test=n_test, size=size, seed=seed)
        marker.write_text("written by fairage demo\n", encoding="utf-8")
    else:
        notify(SuiteEvent(f"reusing the synthetic benchmark in {data_dir}"))
    return data_dir


def pretrain_backbone(
    out_dir: str | Path,
    scale: str = "cpu",
    size: int = DEMO_SIZES["size"],
    sizes: dict[str, int] | None = None,
    seed: int = PRETRAIN_SEED,
    progress: bool = True,
    on_event: SuiteListener | None = None,
) -> Path:
    """Train the demo's stand-in for a pretrained backbone; return its weights file.

    The report starts every model from a VGGFace2 ResNet50; nothing can be downloaded
    here, so the demo pretrains its own: preset M1 (at ``scale``) on a separate synthetic
    set drawn with another seed (no face in common with the demo's data), in the way
    apparent-age models are often pretrained on a large real-age set (IMDB-WIKI) first.
    Like a real pretrained network it has seen mostly the majority group. The run goes to
    ``out_dir/pretrain``, the backbone to ``out_dir/pretrained-backbone.safetensors``;
    both are reused when already there.
    """
    from .. import training

    out_dir = Path(out_dir)
    sizes = {**PRETRAIN_SIZES, **(sizes or {})}
    notify = on_event or _ignore
    weights = out_dir / "pretrained-backbone.safetensors"
    data_dir = _synthetic_once(out_dir, sizes["n_train"], sizes["n_valid"], sizes["n_test"], size, seed, notify)
    cfg = load_preset("M1", scale, ["name=pretrain", *(DEMO_STAGE2 if scale == "cpu" else ())])
    run_dir = out_dir / "pretrain"
    if weights.is_file() and is_finished_run(run_dir, cfg, data_dir):
        notify(SuiteEvent(f"reusing the pretrained backbone {weights}"))
        return weights
    _train_or_reuse(run_dir, cfg, data_dir, "pretraining the stand-in backbone (M1)", scale, notify, progress)
    return training.export_backbone(run_dir, weights)


# size: the demo's settings, each a CLI option of fairage demo
def run_demo(
    out_dir: str | Path = "runs/demo",
    presets: Sequence[str] = REPORT_PRESETS,
    scale: str = "cpu",
    n_train: int = DEMO_SIZES["n_train"],
    n_valid: int = DEMO_SIZES["n_valid"],
    n_test: int = DEMO_SIZES["n_test"],
    size: int = DEMO_SIZES["size"],
    seed: int = DEMO_SEED,
    pretrain: bool = True,
    pretrain_sizes: dict[str, int] | None = None,
    progress: bool = True,
    on_event: SuiteListener | None = None,
) -> Path:
    """Synthetic benchmark + suite at ``cpu`` scale on M1..M5; return report.html (its table: ``comparison.csv``).

    The data goes to ``out_dir/synthetic-v<version>-<size>px-<n_train>-<n_valid>-<n_test>-seed<seed>``
    (the name records its parameters, so runs trained on other data are never reused)
    and is only generated when that folder is not complete yet. With ``pretrain`` (the
    default) every preset starts from the stand-in pretrained backbone of
    ``pretrain_backbone``, as the report's models start from VGGFace2; without it they
    start from random init and the frozen-backbone presets M2/M4 have nothing to build on.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    notify = on_event or _ignore
    data_dir = _synthetic_once(out_dir, n_train, n_valid, n_test, size, seed, notify)
    overrides = list(DEMO_STAGE2) if scale == "cpu" else []
    if pretrain:
        weights = pretrain_backbone(out_dir, scale, size, pretrain_sizes, progress=progress, on_event=on_event)
        # fine-tuning a trained backbone wants a smaller step than cpu scale's 1e-3 from random init
        overrides += [f"model.weights={weights.resolve()}", f"stage2.lr={PRETRAINED_STAGE2_LR}"]
    report = run_suite(
        data_dir,
        out_dir,
        presets=presets,
        scale=scale,
        seeds=1,
        overrides=overrides,
        progress=progress,
        on_event=on_event,
    )
    notify(SuiteEvent(f"demo wall time {time.perf_counter() - started:.0f} s"))
    return report
