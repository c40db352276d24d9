"""Wiring of the methods of ``fairage.models.losses`` into training.

* ``face_arrays(train_faces, stage)``: the per-face arrays a stage's methods need (Group
  DRO group ids, the raters' ``age_std``), read from the training face table;
* ``build_objective(stage, model, train_ages, arrays, seed)``: the stage's
  ``StageObjective``, or None when no method beyond weighting is on (training then runs
  the plain weighted loss, numerically unchanged);
* ``DROHistoryCallback``: writes the Group DRO weights ``q`` after every epoch to
  ``dro_q.csv`` in the run folder (columns ``epoch``, ``stage``, ``q[<group>]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from ..atomic import write_text
from ..config.schema import StageConfig
from ..errors import ConfigError, DataError
from ..models.losses import GroupDRO, StageObjective
from ..store.run_folder import RunFolder


@dataclass
class FaceArrays:
    """Per-face arrays of the training split, aligned with its face table.

    ``groups``: (N,) int64 Group DRO group id (index into ``group_names``) or None;
    ``group_names``: the non-empty groups in scheme order; ``group_sizes``: (G,) faces per
    group; ``age_std``: (N,) float32 years or None.
    """

    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    group_sizes: np.ndarray | None = None
    age_std: np.ndarray | None = None


def uses_methods(stage: StageConfig) -> bool:
    """Whether ``stage`` turns on any method beyond sample weighting."""
    return stage.loss in ("bmc", "ce", "coral", "corn") or stage.label_std != "off" or stage.dro.enabled


def face_arrays(train_faces: pd.DataFrame, stage: StageConfig, stage_name: str = "stage") -> FaceArrays:
    """The per-face arrays ``stage`` needs from the training face table.

    Raises ConfigError when ``label_std`` is on but the table has no ``age_std`` column
    (only APPA-REAL-style data records the raters' spread), DataError when some faces lack it.
    """
    arrays = FaceArrays()
    if stage.dro.enabled:
        from ..fairness.weighting import face_group_names, group_table

        grouping = stage.dro.grouping()
        table = group_table(train_faces, grouping)
        table = table[table["n"] > 0]
        names = list(table["name"])
        ids = {name: k for k, name in enumerate(names)}
        arrays.groups = np.array([ids[g] for g in face_group_names(train_faces, grouping)], dtype=np.int64)
        arrays.group_names = names
        arrays.group_sizes = table["n"].to_numpy(dtype=np.float64)
    if stage.label_std != "off":
        if "age_std" not in train_faces.columns:
            raise ConfigError(
                f"{stage_name}.label_std '{stage.label_std}' needs each face's rater spread (face table column "
                "age_std, APPA-REAL's apparent_age_std), which this dataset does not record; set label_std: off"
            )
        std = pd.to_numeric(train_faces["age_std"], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(std) | (std < 0))
        if bad.size:
            first = train_faces.iloc[int(bad[0])]
            raise DataError(
                f"{stage_name}.label_std: {bad.size} training face(s) have no valid age_std, first "
                f"{first.get('image', int(bad[0]))!r} (value {first['age_std']!r})"
            )
        arrays.age_std = std.astype(np.float32)
    return arrays


def build_objective(
    stage: StageConfig, label_scale: float, train_ages: np.ndarray, arrays: FaceArrays | None, seed: int
) -> StageObjective | None:
    """The stage's ``StageObjective``; None when ``uses_methods(stage)`` is false.

    ``label_scale``: years per label unit of the model; ``train_ages`` (N,) years.
    """
    if not uses_methods(stage):
        return None
    arrays = arrays or FaceArrays()
    dro = None
    if stage.dro.enabled:
        if arrays.groups is None:
            raise ConfigError("dro.enabled needs the training face table (group of every face)")
        dro = GroupDRO(arrays.group_sizes, eta=stage.dro.eta, size_adjustment=stage.dro.size_adjustment)
    if stage.label_std != "off" and arrays.age_std is None:
        raise ConfigError(f"label_std '{stage.label_std}' needs the age_std of every training face")
    as_tensor = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    return StageObjective(
        stage.loss,
        label_scale=label_scale,
        huber_delta=stage.huber_delta,
        bmc_sigma=stage.bmc_sigma,
        dex_sigma=stage.dex_sigma,
        dex_l1=stage.dex_l1,
        dro=dro,
        face_groups=as_tensor(arrays.groups),
        face_ages=torch.as_tensor(np.asarray(train_ages, dtype=np.float32)),
        face_std=as_tensor(arrays.age_std),
        label_std=stage.label_std,
        age_std_floor=stage.age_std_floor,
        seed=seed,
    )


class DROHistoryCallback(Callback):
    """Appends the Group DRO weights after each training epoch to ``run_dir/dro_q.csv`` (rank 0, atomic).

    Rows of other stages and of this stage's epochs up to a resume point are kept.
    """

    def __init__(self, run_dir: Path, stage: str, group_names: list[str]):
        self.path = RunFolder(run_dir).file(RunFolder.DRO_Q)
        self.stage = stage
        self.columns = [f"q[{name}]" for name in group_names]
        self.rows: list[dict] | None = None

    def on_train_start(self, trainer, pl_module):
        previous = pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame(columns=["epoch", "stage"])
        keep = (previous["stage"] != self.stage) | (previous["epoch"] <= trainer.current_epoch)
        self.rows = previous[keep].to_dict("records")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.rows is None:
            return
        q = pl_module.objective.dro.q.detach().cpu().tolist()
        self.rows.append({"epoch": trainer.current_epoch + 1, "stage": self.stage, **dict(zip(self.columns, q))})
        if trainer.is_global_zero:
            write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))
