"""Wiring of the methods of ``fairage.losses`` into training.

* ``face_arrays(train_faces, stage)``: the per-face arrays a stage's methods need (Group
  DRO group ids, the raters' ``age_std``, the invariance penalty's group codes), read
  from the training face table;
* ``build_objective(stage, model, train_ages, arrays, seed)``: the stage's
  ``StageObjective``, or None when no method beyond weighting is on (training then runs
  the plain weighted loss, numerically unchanged);
* ``DROHistoryCallback``: writes the Group DRO weights ``q`` after every epoch to
  ``dro_q.csv`` in the run folder (columns ``epoch``, ``stage``, ``q[<group>]``);
* ``InvarianceHistoryCallback``: writes, after every epoch, the share of the features'
  variance the groups explain and the linear probe's balanced accuracy per attribute to
  ``invariance.csv`` (``epoch``, ``stage``, ``explained[<attr>]``,
  ``probe_balanced_accuracy[<attr>]``, ``chance[<attr>]``), so one sees whether the
  features still give the groups away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from .atomic import write_text
from .config import StageConfig
from .errors import ConfigError, DataError
from .losses import GroupDRO, GroupInvariance, StageObjective

DRO_Q_FILE = "dro_q.csv"
INVARIANCE_FILE = "invariance.csv"


@dataclass
class FaceArrays:
    """Per-face arrays of the training split, aligned with its face table.

    ``groups``: (N,) int64 Group DRO group id (index into ``group_names``) or None;
    ``group_names``: the non-empty groups in scheme order; ``group_sizes``: (G,) faces per
    group; ``age_std``: (N,) float32 years or None; ``invariance_codes``: (N, A) int64 group
    index per invariance attribute (-1 = unknown) or None, with ``invariance_groups`` the
    groups of each attribute in order.
    """

    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    group_sizes: np.ndarray | None = None
    age_std: np.ndarray | None = None
    invariance_codes: np.ndarray | None = None
    invariance_groups: dict[str, list[str]] | None = None


def uses_methods(stage: StageConfig) -> bool:
    """Whether ``stage`` turns on any method beyond sample weighting."""
    return stage.loss in ("bmc", "ce") or stage.label_std != "off" or stage.dro.enabled or stage.invariance.enabled


def face_arrays(train_faces: pd.DataFrame, stage: StageConfig, stage_name: str = "stage") -> FaceArrays:
    """The per-face arrays ``stage`` needs from the training face table.

    Raises ConfigError when ``label_std`` is on but the table has no ``age_std`` column
    (only APPA-REAL-style data records the raters' spread), DataError when some faces lack it.
    """
    arrays = FaceArrays()
    if stage.dro.enabled:
        from .weighting import face_group_names, group_table

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
                "age_std, APPA-REAL's apparent_age_std), which this dataset does not record; set label_std: off")
        std = pd.to_numeric(train_faces["age_std"], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(std) | (std < 0))
        if bad.size:
            first = train_faces.iloc[int(bad[0])]
            raise DataError(f"{stage_name}.label_std: {bad.size} training face(s) have no valid age_std, first "
                            f"{first.get('image', int(bad[0]))!r} (value {first['age_std']!r})")
        arrays.age_std = std.astype(np.float32)
    if stage.invariance.enabled:
        arrays.invariance_codes, arrays.invariance_groups = _invariance_codes(train_faces, stage, stage_name)
    return arrays


def _invariance_codes(train_faces: pd.DataFrame, stage: StageConfig,
                      stage_name: str) -> tuple[np.ndarray, dict[str, list[str]]]:
    """(N, A) group index of every training face per invariance attribute (-1 = unknown) and the groups."""
    from .data.schema import UNKNOWN, group_order

    codes, groups = [], {}
    for attr in stage.invariance.attributes:
        if attr not in train_faces.columns:
            raise DataError(f"{stage_name}.invariance.attributes: the training faces have no column {attr!r} "
                            f"(have: {', '.join(map(str, train_faces.columns))})")
        values = np.array(["" if pd.isna(v) else str(v) for v in train_faces[attr]], dtype=object)
        known = (values != UNKNOWN) & (values != "")
        order = group_order(attr, [v for v in values[known]])
        order = [g for g in order if np.any(values == g)]
        if len(order) < 2:
            raise ConfigError(f"{stage_name}.invariance.attributes: {attr!r} has {len(order)} known group(s) among "
                              "the training faces; the penalty needs at least two")
        index = {g: k for k, g in enumerate(order)}
        codes.append(np.array([index.get(v, -1) for v in values], dtype=np.int64))
        groups[attr] = order
    return np.stack(codes, axis=1), groups


def build_objective(stage: StageConfig, label_scale: float, train_ages: np.ndarray,
                    arrays: FaceArrays | None, seed: int, feature_dim: int | None = None) -> StageObjective | None:
    """The stage's ``StageObjective``; None when ``uses_methods(stage)`` is false.

    ``label_scale``: years per label unit of the model; ``train_ages`` (N,) years;
    ``feature_dim``: width of the features the head sees (needed for ``invariance``).
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
    invariance = None
    if stage.invariance.enabled:
        if arrays.invariance_codes is None or feature_dim is None:
            raise ConfigError("invariance.enabled needs the training face table and the model's feature width")
        invariance = GroupInvariance(feature_dim, [len(g) for g in arrays.invariance_groups.values()],
                                     weight=stage.invariance.weight)
    as_tensor = (lambda a: None if a is None else torch.as_tensor(np.asarray(a)))
    return StageObjective(
        stage.loss, label_scale=label_scale, huber_delta=stage.huber_delta, bmc_sigma=stage.bmc_sigma,
        dex_sigma=stage.dex_sigma, dro=dro, face_groups=as_tensor(arrays.groups),
        face_ages=torch.as_tensor(np.asarray(train_ages, dtype=np.float32)), face_std=as_tensor(arrays.age_std),
        label_std=stage.label_std, age_std_floor=stage.age_std_floor, seed=seed,
        invariance=invariance, face_codes=as_tensor(arrays.invariance_codes))


class DROHistoryCallback(Callback):
    """Appends the Group DRO weights after each training epoch to ``run_dir/dro_q.csv`` (rank 0, atomic).

    Rows of other stages and of this stage's epochs up to a resume point are kept.
    """

    def __init__(self, run_dir: Path, stage: str, group_names: list[str]):
        self.path = Path(run_dir) / DRO_Q_FILE
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


class InvarianceHistoryCallback(Callback):
    """Appends the invariance statistics' epoch means to ``run_dir/invariance.csv`` (rank 0, atomic).

    Columns ``epoch``, ``stage``, then per attribute ``explained[<attr>]`` (the share of the
    features' variance its groups explain, 0..1), ``probe_balanced_accuracy[<attr>]`` (the
    linear probe's balanced accuracy, the mean of its per-group recalls, over the epoch's
    training batches) and ``chance[<attr>]`` (1 / groups: what naming one group always
    scores). A probe near chance: the features no longer give the groups away, linearly.
    Rows of other stages and of this stage's epochs up to a resume point are kept.
    """

    def __init__(self, run_dir: Path, stage: str, groups: dict[str, list[str]], codes: np.ndarray):
        self.path = Path(run_dir) / INVARIANCE_FILE
        self.stage = stage
        self.attributes = list(groups)
        self.chance = {attr: 1.0 / len(names) for attr, names in groups.items()}
        self.rows: list[dict] | None = None
        self.sums: np.ndarray | None = None
        self.counts: np.ndarray | None = None

    def on_train_start(self, trainer, pl_module):
        previous = pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame(columns=["epoch", "stage"])
        keep = (previous["stage"] != self.stage) | (previous["epoch"] <= trainer.current_epoch)
        self.rows = previous[keep].to_dict("records")

    def on_train_epoch_start(self, trainer, pl_module):
        self.sums = np.zeros((2, len(self.attributes)))
        self.counts = np.zeros((2, len(self.attributes)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = pl_module.objective.last_invariance
        if stats is None or self.sums is None:
            return
        values = np.stack([stats["explained"].float().cpu().numpy(), stats["accuracy"].float().cpu().numpy()])
        finite = np.isfinite(values)
        self.sums += np.where(finite, values, 0.0)
        self.counts += finite

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.rows is None or self.sums is None:
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums / self.counts
        row: dict = {"epoch": trainer.current_epoch + 1, "stage": self.stage}
        for a, attr in enumerate(self.attributes):
            row[f"explained[{attr}]"] = float(means[0, a])
            row[f"probe_balanced_accuracy[{attr}]"] = float(means[1, a])
            row[f"chance[{attr}]"] = self.chance[attr]
        self.rows.append(row)
        if trainer.is_global_zero:
            write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))
