"""The run folder: one object owns its files, its record and its rules.

A run folder, as written by ``fairage.training.train``::

    config.yaml              the resolved ExperimentConfig (paths made absolute)
    run.json                 the RunRecord: status, stage, completed stages, data_dir, weights, warnings
    history.csv              one row per epoch (HISTORY_COLUMNS), both stages
    checkpoints/{stage}-best.ckpt, checkpoints/{stage}-last.ckpt
    curves.png, weights_{stage}.png
    conformal.json           the conformal calibration (fairage.fairness.conformal), fitted on the valid split
    predictions_test.csv     written before metrics_test.json (age_lo, age_hi: the conformal intervals)
    metrics_test.json        written last: its presence means the run is finished
    .lock                    the PID of the process training in it (held with fcntl.flock)

Training, report, suite and CLI read and write run folders through ``RunFolder`` only.
Every write is atomic and, under DDP, done by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..atomic import write_text
from ..config.files import dump_config, read_yaml
from ..config.schema import ExperimentConfig, validate_config
from ..errors import ConfigError, DataError, FairageError
from ..fairness.conformal import CONFORMAL as CONFORMAL_FILE

if TYPE_CHECKING:
    from ..fairness.metrics import EvaluationResult

#: per-epoch columns of ``history.csv``; losses in the model's label units, MAEs in years
HISTORY_COLUMNS = ["epoch", "stage", "train_loss", "val_loss", "train_mae", "val_mae", "lr"]
STAGES = ("stage1", "stage2")


class RunInUseError(FairageError):
    """Another live process holds the run folder's lock."""


class RunRecord(BaseModel):
    """The contents of ``run.json``.

    ``stage`` is the stage being trained (``"test"`` while predicting the test split);
    ``stopped_stages`` maps a stage that stopped on a non-finite loss to its message;
    ``warnings`` holds the others (a collapsed model). Unknown keys are kept, so a newer
    fairage's record survives an older reader's update.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    status: Literal["running", "finished"] = "running"
    stage: str = ""
    completed_stages: list[str] = Field(default_factory=list)
    data_dir: str
    weights_loaded: bool = False
    weights: str | None = None
    missing_keys: list[str] = Field(default_factory=list)
    unexpected_keys: list[str] = Field(default_factory=list)
    device: str = ""
    #: the Lightning precision the run trained with ("32-true", "bf16-mixed", ...)
    precision: str | None = None
    seed: int = 0
    warnings: list[str] = Field(default_factory=list)
    stopped_stages: dict[str, str] = Field(default_factory=dict, alias="stopped")
    #: stages stopped because their predictions collapsed (constant), with the message
    collapsed_stages: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON-ready object of ``run.json``."""
        return self.model_dump(mode="json", by_alias=False, exclude_none=True)


def is_rank_zero() -> bool:
    """True on the process that writes (rank 0 of a DDP run, or a single process)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def absolute_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """``cfg`` with every relative path field (``model.weights``, ``data.cache_dir``, ...) made absolute.

    Paths are resolved against ``base`` (default: the current directory), so a run's
    ``config.yaml`` means the same files whatever directory ``--resume`` is run from.
    """
    base = Path(base or Path.cwd())

    def walk(value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else (base / value).resolve()
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return ExperimentConfig.model_validate(walk(cfg.model_dump()))


def config_faces(cfg: ExperimentConfig, data_dir: str | Path) -> pd.DataFrame:
    """The face table of ``data_dir`` as a run of ``cfg`` loads it (its ``data.*`` settings)."""
    from ..data import load_faces

    return load_faces(data_dir, **cfg.data.loader_options())


def same_config(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """True when two configs describe the same run (compared as the YAML a run folder stores)."""
    return yaml.safe_load(dump_config(absolute_paths(a))) == yaml.safe_load(dump_config(absolute_paths(b)))


class RunFolder:
    """A training run folder (see the module docstring). Open one with ``create`` or ``open``."""

    CONFIG = "config.yaml"
    RUN = "run.json"
    HISTORY = "history.csv"
    PREDICTIONS = "predictions_test.csv"
    METRICS = "metrics_test.json"
    CHECKPOINTS = "checkpoints"
    CURVES = "curves.png"
    CONFORMAL = CONFORMAL_FILE
    DRO_Q = "dro_q.csv"
    LOGS = "logs"
    LOCK = ".lock"

    def __init__(self, path: str | Path, record: RunRecord | None = None):
        self.path = Path(path)
        self.record = record

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: str | Path, cfg: ExperimentConfig, data_dir: str | Path, **fields) -> RunFolder:
        """Start a new run in ``path``: write ``config.yaml`` (absolute paths) and ``run.json``.

        ``fields`` go into the record (weights info, device, precision, ...). Any
        ``history.csv`` left by an earlier attempt that never got a ``run.json`` is removed.
        On non-zero DDP ranks nothing is written.
        """
        folder = cls(path)
        record = RunRecord(data_dir=str(Path(data_dir).resolve()), stage=cfg.stages()[0][0], seed=cfg.seed, **fields)
        folder.record = record
        if is_rank_zero():
            folder.path.mkdir(parents=True, exist_ok=True)
            write_text(folder.file(cls.CONFIG), dump_config(absolute_paths(cfg)))
            write_text(folder.file(cls.RUN), json.dumps(record.to_json(), indent=2) + "\n")
            folder.file(cls.HISTORY).unlink(missing_ok=True)
        return folder

    @classmethod
    def open(cls, path: str | Path, record_required: bool = True) -> RunFolder:
        """An existing run folder; DataError naming the file when it is not one or its run.json is corrupt.

        ``record_required=False`` also opens a folder without ``run.json`` (``record`` is then None).
        """
        folder = cls(path)
        if not folder.path.is_dir():
            raise DataError(f"run folder not found: {folder.path}")
        for name in (cls.RUN, cls.CONFIG) if record_required else (cls.CONFIG,):
            if not folder.file(name).is_file():
                raise DataError(f"{folder.path} is not a fairage run folder (no {name})")
        if folder.file(cls.RUN).is_file():
            folder.record = folder._read_record()
        return folder

    @classmethod
    def check_out(cls, path: str | Path) -> None:
        """ConfigError unless ``path`` can take a new run: absent, empty, or a fairage run folder.

        A folder holding anything else (the user's own files) is refused before anything is
        written or deleted in it; a folder holding only the ``.lock`` of a run killed before
        it wrote its record counts as empty.
        """
        path = Path(path)
        if not path.exists():
            return
        if not path.is_dir():
            raise ConfigError(f"--out {path} exists and is not a folder; choose a new folder for the run")
        if cls.exists(path):
            return
        names = sorted(p.name for p in path.iterdir() if p.name != cls.LOCK)
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ConfigError(
                f"--out {path} is a folder that is not a fairage run (it holds {shown}); fairage "
                "would overwrite files there: choose a new or empty folder for the run"
            )

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """True when ``path`` holds a run folder (a ``run.json`` and a ``config.yaml``)."""
        path = Path(path)
        return (path / cls.RUN).is_file() and (path / cls.CONFIG).is_file()

    def _read_record(self) -> RunRecord:
        path = self.file(self.RUN)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is not valid JSON ({err}); the run folder is damaged") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path} does not hold a JSON object; the run folder is damaged")
        try:
            return RunRecord.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise DataError(f"{path}: '{key}': {first['msg']}") from None

    # ------------------------------------------------------------------ files

    def file(self, name: str) -> Path:
        """Path of a file of the run folder, e.g. ``run.file(RunFolder.METRICS)``."""
        return self.path / name

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, stage: str, kind: Literal["best", "last"] = "best") -> Path:
        """Path of ``checkpoints/{stage}-{kind}.ckpt`` (which may not exist yet)."""
        if kind not in ("best", "last"):
            raise ValueError(f"kind must be 'best' or 'last', got {kind!r}")
        return self.checkpoints_dir / f"{stage}-{kind}.ckpt"

    def weights_plot(self, stage: str) -> Path:
        """Path of ``weights_{stage}.png``, the stage's group sizes and weights."""
        return self.path / f"weights_{stage}.png"

    def best_checkpoint(self) -> Path:
        """The best checkpoint of the last completed stage; DataError when there is none."""
        completed = self.record.completed_stages if self.record else []
        if not completed:
            raise DataError(f"{self.file(self.RUN)}: no stage completed yet, so no best checkpoint")
        path = self.checkpoint(completed[-1], "best")
        if not path.is_file():
            raise DataError(f"{path} not found: the run's best checkpoint of {completed[-1]} is missing")
        return path

    def config(self) -> ExperimentConfig:
        """The run's validated ``config.yaml`` (ConfigError naming it when invalid)."""
        path = self.file(self.CONFIG)
        try:
            raw = read_yaml(path)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not a UTF-8 text file; the run folder is damaged") from None
        return validate_config(raw, str(path))

    @property
    def data_dir(self) -> Path:
        return Path(self.record.data_dir)

    # ------------------------------------------------------------------ record

    def update(self, **fields) -> RunRecord:
        """Change fields of the record and rewrite ``run.json`` atomically (rank 0 only)."""
        data = {**self.record.model_dump(by_alias=False), **fields}
        self.record = RunRecord.model_validate(data)
        if is_rank_zero():
            write_text(self.file(self.RUN), json.dumps(self.record.to_json(), indent=2) + "\n")
        return self.record

    def is_finished(self) -> bool:
        """True when the run wrote its test metrics (``metrics_test.json`` comes last)."""
        return self.file(self.METRICS).is_file()

    def matches(self, cfg: ExperimentConfig, data_dir: str | Path) -> bool:
        """True when this folder holds a run of ``cfg`` on ``data_dir`` (finished or not).

        A folder whose files cannot be read does not match.
        """
        try:
            stored = self.config()
        except FairageError:
            return False
        if self.record is None:
            return False
        return same_config(stored, cfg) and Path(self.record.data_dir).resolve() == Path(data_dir).resolve()

    def warnings(self) -> list[str]:
        """Everything the run warns about: stages stopped on a non-finite loss, then the others."""
        if self.record is None:
            return []
        return [*self.record.stopped_stages.values(), *self.record.collapsed_stages.values(), *self.record.warnings]

    # ------------------------------------------------------------------ history, metrics, data

    def history(self) -> pd.DataFrame:
        """``history.csv`` (empty with HISTORY_COLUMNS when absent); DataError naming it when unreadable."""
        path = self.file(self.HISTORY)
        if not path.is_file():
            return pd.DataFrame(columns=HISTORY_COLUMNS)
        try:
            history = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{path} is not a readable CSV ({reason})") from None
        missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
        if missing:
            raise DataError(f"{path} lacks columns {missing}")
        epochs = pd.to_numeric(history["epoch"], errors="coerce")
        bad = history.index[epochs.isna() | (epochs % 1 != 0) | (epochs < 0)]
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{path}: row {row + 2}: epoch {str(history.at[bad[0], 'epoch'])[:40]!r} is not an "
                "epoch number; the run folder is damaged (restore history.csv or start a new run)"
            )
        stages = history["stage"].astype(str)
        bad = history.index[~stages.isin(STAGES)]
        if len(bad):
            raise DataError(
                f"{path}: row {int(bad[0]) + 2}: stage {stages[bad[0]][:40]!r} is not one of "
                f"{', '.join(STAGES)}; the run folder is damaged"
            )
        history["epoch"] = epochs.astype(int)
        history["stage"] = stages
        return history

    def best_epochs(self) -> dict[str, dict]:
        """Per stage, the epoch its best checkpoint keeps: ``{stage: {"epoch", "val_mae", "epochs_run"}}``.

        The best checkpoint monitors ``val_loss`` (lowest wins, first on ties), so the quoted
        validation MAE (years) is the one at that epoch, not the lowest ``val_mae`` of the stage;
        a stage without any finite ``val_loss`` quotes its last epoch.
        """
        history = self.history()
        out: dict[str, dict] = {}
        for stage, rows in history.groupby("stage", sort=False):
            losses = pd.to_numeric(rows["val_loss"], errors="coerce")
            best = losses.idxmin() if losses.notna().any() else rows.index[-1]
            val_mae = pd.to_numeric(rows["val_mae"], errors="coerce")[best]
            out[str(stage)] = {
                "epoch": int(rows.at[best, "epoch"]),
                "val_mae": None if pd.isna(val_mae) else float(val_mae),
                "epochs_run": len(rows),
            }
        return out

    def metrics(self) -> EvaluationResult | None:
        """The test metrics (``metrics_test.json``) as an EvaluationResult; None before the run finishes."""
        from ..fairness.metrics import EvaluationResult

        path = self.file(self.METRICS)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is not valid JSON: {err}") from None
        return EvaluationResult.from_json(raw, source=str(path))

    def calibration(self):
        """The run's conformal calibration (``conformal.json``, ``fairage.fairness.conformal.Calibration``);
        None when the run has none (written before intervals existed, or ``eval.conformal.enabled`` off)."""
        from ..fairness.conformal import read_calibration

        return read_calibration(self.file(self.CONFORMAL))

    def write_calibration(self, calibration) -> None:
        """Store ``calibration`` as ``conformal.json`` (atomically, rank 0 only)."""
        from ..fairness.conformal import write_calibration

        if is_rank_zero():
            write_calibration(self.file(self.CONFORMAL), calibration)

    def faces(self, split: str = "test") -> pd.DataFrame:
        """The faces of ``split`` loaded as the run loaded them: its data_dir and its own ``data.*`` settings."""
        faces = config_faces(self.config(), self.data_dir)
        faces = faces[faces["split"] == split].reset_index(drop=True)
        if len(faces) == 0:
            raise DataError(f"dataset {self.data_dir} has no {split!r} faces")
        return faces

    def evaluation_settings(self, cfg: ExperimentConfig | None = None, columns=None) -> dict:
        """The ``fairage.fairness.metrics.evaluate`` arguments the run scores its test split with: its
        ``eval.*`` (``EvalConfig.metric_settings``) and its seed; ``columns`` of the scored table."""
        cfg = cfg or self.config()
        return cfg.eval.metric_settings(cfg.seed, columns)

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold an exclusive lock on the folder while training in it.

        ``fcntl.flock`` on ``.lock`` (which records the holder's PID): the kernel drops
        the lock when its process dies, so a lock file left by a killed run never
        blocks. Raises RunInUseError ("in use by PID n") when a live process holds it.
        On acquiring it, temporary files left by an interrupted atomic write are removed.
        A folder this call created is removed again when the block fails before writing
        anything into it (bad data, a bad config), so it does not block the corrected command.
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.file(self.LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise RunInUseError(f"run folder {self.path} is in use by PID {holder}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            self.remove_stale_temp_files()
            try:
                yield self
            except BaseException:
                if created and [p.name for p in self.path.iterdir()] == [self.LOCK]:
                    path.unlink()
                    self.path.rmdir()
                raise
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files an interrupted atomic write of fairage left in the folder; return them.

        Only names ``fairage.atomic`` makes for the files a run writes (``.run.json.x1y2.tmp.json``,
        ``checkpoints/.stage1-last.ckpt.x1y2.tmp.ckpt``): any other file, even one that looks
        temporary, is not fairage's to delete. Only call this while holding the lock: a live
        writer's temp file looks the same.
        """
        removed = []
        for folder, pattern in ((self.path, _RUN_TEMP), (self.checkpoints_dir, _CHECKPOINT_TEMP)):
            if folder.is_dir():
                for p in folder.glob(".*.tmp*"):
                    if pattern.fullmatch(p.name) and p.is_file():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed


def _temp_pattern(names: str) -> re.Pattern:
    """``fairage.atomic``'s temporary names (``.NAME.RANDOM.tmp.SUFFIX``) for targets matching ``names``."""
    return re.compile(rf"\.(?P<name>{names})\.[A-Za-z0-9_]+\.tmp(?P<suffix>\.[A-Za-z0-9]+)?")


#: the files a run writes in its folder, and in its checkpoints folder
_RUN_TEMP = _temp_pattern(
    r"config\.yaml|run\.json|history\.csv|predictions_test\.csv|metrics_test\.json|"
    r"curves\.png|weights_stage[12]\.png|dro_q\.csv"
)
_CHECKPOINT_TEMP = _temp_pattern(r"stage[12]-(best|last)(-v\d+)?\.ckpt")
