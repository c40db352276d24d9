"""Two-stage training on Lightning: stage I (head on a frozen backbone), stage II (all layers).

The package in pieces:

* ``module``: the Lightning module (``AgeModule``), the dataset and the augmentation;
* ``factories``: ``StageArrays`` and the loader, callback and Trainer factories;
* ``spec``: ``StageSpec`` (a stage: name, config, whether its feature extractor is frozen),
  ``RunContext`` (what a run's stages share), ``StageFolder`` (where a stage writes) and ``stage_specs``;
* ``stage``: ``fit_stage``, one stage on in-memory arrays;
* ``lean``: the lean loop of a feature-cached stage I (``fit_lean``);
* ``inference``: ``predict``, ``predict_with_spread`` and ``extract_features``;
* ``run``: ``train``, ``resume_run`` and ``export_backbone``, which work on a run folder (``fairage.store.run_folder.RunFolder``).
"""

from .factories import (
    COLLAPSE_STD,
    AtomicCheckpointIO,
    BestCheckpoint,
    CollapseStop,
    HistoryCallback,
    LastCheckpoint,
    StageArrays,
    make_callbacks,
    make_loaders,
    make_trainer,
    resolve_precision,
)
from .inference import extract_features, predict, predict_with_spread
from .module import (
    AgeModule,
    FaceArrayDataset,
    build_augment,
    images_to_input,
    memory_format,
)
from .run import (
    calibrate_folder,
    collapse_warning,
    export_backbone,
    load_run_data,
    resume_run,
    train,
)
from .spec import RunContext, StageFolder, StageSpec, stage_specs
from .stage import (
    CollapsedStageError,
    NonFiniteLossError,
    StageResult,
    fit_stage,
)

__all__ = [
    "COLLAPSE_STD",
    "AgeModule",
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "CollapseStop",
    "CollapsedStageError",
    "FaceArrayDataset",
    "HistoryCallback",
    "LastCheckpoint",
    "NonFiniteLossError",
    "RunContext",
    "StageArrays",
    "StageFolder",
    "StageResult",
    "StageSpec",
    "build_augment",
    "calibrate_folder",
    "collapse_warning",
    "export_backbone",
    "extract_features",
    "fit_stage",
    "images_to_input",
    "load_run_data",
    "make_callbacks",
    "make_loaders",
    "make_trainer",
    "memory_format",
    "predict",
    "predict_with_spread",
    "resolve_precision",
    "resume_run",
    "stage_specs",
    "train",
]
