"""Multi-objective search of a config space: the accuracy-fairness Pareto front (Optuna).

``run_tune(data_dir, out_dir, base, space, objectives, n_trials)`` samples configs from a
search space (``SearchSpace``, YAML over config keys) with Optuna's NSGA-II or TPE sampler,
trains each as an ordinary run folder (``fairage.training.train`` into
``OUT/trials/trial-NNNN``) and scores it on the **validation** split (``fairage.fairness.metrics.evaluate``
of the best checkpoint's validation predictions); every objective is minimised.

This module owns the tune output folder:

* ``study.db``: the default Optuna storage (SQLite); any Optuna storage URL, or
  ``journal:///path/file.log`` (a journal file on a shared filesystem), may hold the study instead,
  so workers on several machines share one study by naming the same storage and study name.
* ``trials.csv``: every trial: ``number, state, <parameter keys>, val_<objective>..., run_dir,
  error, retry_of, duration_s`` (years for MAE and bias scores).
* ``front.csv``: the Pareto trials of the validation objectives, with the same objectives on the
  test split beside them (``test_<objective>`` and its bootstrap interval ``test_<objective>_ci_low/high``).
* ``front.png``: the first two objectives of every finished trial on the test split, with their
  bootstrap intervals, the Pareto trials highlighted and reference runs (``references``) as crosses.
* ``trials/trial-NNNN/``: the run folders; ``picked.yaml`` (``pick``).

A tune killed mid-trial resumes when started again: finished trials are kept (the storage), the
trial whose process died on this host is marked failed and retried with the same parameters in
its own run folder, which resumes from its last checkpoint. A trial that raises is recorded as
failed with its message and the study goes on. ``--trials N`` is the size of the study, whatever
the number of workers: each worker stops once N trials are finished or running.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel

from ..atomic import write_text
from ..config.files import dump_config, read_yaml
from ..config.schema import ExperimentConfig, validate_config
from ..errors import ConfigError, DataError
from ..fairness.metrics import DEFAULT_ATTRIBUTES, EvaluationResult

TRIALS = "trials.csv"
FRONT = "front.csv"
STUDY_DB = "study.db"
PICKED = "picked.yaml"
FRONT_PLOT = "front.png"
TRIALS_DIR = "trials"
DEFAULT_OBJECTIVES = ("mae", "age_bias")
SAMPLERS = ("nsga2", "tpe")
#: keys a range may have
_RANGE_KEYS = ("low", "high", "log", "step")


# =========================================================================== objectives


def objective_names() -> list[str]:
    """Every objective ``--objectives`` accepts: ``mae``, ``<attr>_bias`` and ``worst_<attr>_mae``."""
    return ["mae", *[f"{a}_bias" for a in DEFAULT_ATTRIBUTES], *[f"worst_{a}_mae" for a in DEFAULT_ATTRIBUTES]]


def parse_objectives(text: str | Sequence[str]) -> list[str]:
    """``"mae,age_bias"`` -> ``["mae", "age_bias"]``; ConfigError naming an unknown objective."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    valid = objective_names()
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown objective '{name}'; choose from {', '.join(valid)}")
    if not names:
        raise ConfigError("give at least one objective, e.g. mae,age_bias")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives repeat a name: {','.join(names)}")
    return names


def objective_value(result: EvaluationResult, name: str) -> tuple[float | None, list[float] | None]:
    """The value (years) of objective ``name`` in ``result`` and its interval (None without one).

    ``mae``: the MAE; ``<attr>_bias``: the bias score (None when fewer than two groups have faces);
    ``worst_<attr>_mae``: the largest MAE among the attribute's groups with faces.
    """
    if name == "mae":
        return result.mae, result.mae_ci
    if name.endswith("_bias"):
        attr = name[: -len("_bias")]
        return result.bias.get(attr), result.bias_ci.get(attr)
    attr = name[len("worst_") : -len("_mae")]
    scores = [g for g in result.groups.get(attr, {}).values() if g.n > 0]
    if not scores:
        return None, None
    worst = max(scores, key=lambda g: g.mae)
    return worst.mae, worst.ci


# =========================================================================== search space


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``choices`` (a list) or a range ``low..high`` (``log``, ``step``)."""

    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def spec(self) -> Any:
        """The YAML form of this dimension."""
        if self.choices is not None:
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def suggest(self, trial) -> Any:
        """Draw this key's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def corner_values(self) -> list:
        """The values checked against the config schema before any trial: every choice, or both ends."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.integer else [float(self.low), float(self.high)]


def _leaf_annotation(key: str, source: str) -> Any:
    """The type annotation of config key ``key`` (``stage2.weighting.scheme``); ConfigError naming it."""
    current: type[BaseModel] = ExperimentConfig
    parts = key.split(".")
    annotation: Any = None
    i = 0
    while i < len(parts):
        part = parts[i]
        fields = current.model_fields
        if part not in fields:
            valid = ", ".join(sorted(fields))
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"search space {source}: unknown key '{key}' ('{part}' is not a setting of "
                f"{where}; valid there: {valid})"
            )
        annotation = fields[part].annotation
        model = _model_of(annotation)
        if typing.get_origin(annotation) is list and model is not None:
            # a list of blocks (model.head): "model.head.dropout" sets every block, "model.head.0.dropout" one
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                i += 1
            if i + 1 == len(parts):
                raise ConfigError(
                    f"search space {source}: key '{key}' is a list of blocks, not one setting; "
                    f"name a setting of its blocks, e.g. {key}.{next(iter(model.model_fields))}"
                )
            current = model
        elif model is not None and i + 1 < len(parts):
            current = model
        elif i + 1 < len(parts):
            raise ConfigError(
                f"search space {source}: unknown key '{key}' ('{'.'.join(parts[: i + 1])}' is a setting, not a section)"
            )
        elif model is not None:
            raise ConfigError(
                f"search space {source}: key '{key}' is a section, not a setting; name one of "
                f"its settings: {', '.join(sorted(model.model_fields))}"
            )
        i += 1
    return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted; ``model.head.dropout`` sets every head block) in a raw config dict in place."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list) and not parts[i + 1].isdigit():
            rest = ".".join(parts[i + 1 :])
            for block in node:
                set_key(block, rest, value)
            return
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


class SearchSpace:
    """A search space over config keys, checked against the config schema and a base config.

    ``spec`` maps a dotted config key to a list of choices or a range
    ``{low, high, log: false, step: null}`` (integer keys give integer ranges)::

        stage2.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        stage2.weighting.scheme: [none, age, age_ethnicity]
        model.head.dropout: {low: 0.0, high: 0.3}      # every head block

    Any problem (unknown key, empty range, a range for a choice setting, a value the config
    refuses, a stage the base config lacks) is a ConfigError naming the key.
    """

    def __init__(self, spec: dict, base: ExperimentConfig, source: str = "<space>"):
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"search space {source}: expected a mapping of config keys to choices or ranges")
        self.source = source
        self.base = base
        self.dimensions = [self._dimension(str(k), v) for k, v in spec.items()]
        for dim in self.dimensions:
            for value in dim.corner_values():
                raw = base.model_dump(mode="json")
                set_key(raw, dim.key, value)
                try:
                    validate_config(raw, f"{source} key '{dim.key}' = {value!r}")
                except ConfigError as err:
                    raise ConfigError(
                        f"search space {source}: key '{dim.key}': the value {value!r} is not valid:\n{err}"
                    ) from None

    @classmethod
    def from_file(cls, path: str | Path, base: ExperimentConfig) -> SearchSpace:
        return cls(read_yaml(path), base, str(path))

    @classmethod
    def default(cls, scale: str, base: ExperimentConfig) -> SearchSpace:
        """The shipped space of ``scale`` (``fairage/workflows/tune_spaces/{scale}.yaml``)."""
        entry = resources.files("fairage.workflows") / "tune_spaces" / f"{scale}.yaml"
        if not entry.is_file():
            raise ConfigError(f"no shipped search space for scale '{scale}'; give --space")
        return cls(yaml.safe_load(entry.read_text(encoding="utf-8")), base, f"default space ({scale})")

    def _dimension(self, key: str, value: Any) -> Dimension:
        annotation = _leaf_annotation(key, self.source)
        parts = key.split(".")
        if parts[0] in ("stage1", "stage2") and getattr(self.base, parts[0]) is None:
            raise ConfigError(
                f"search space {self.source}: key '{key}': the base config has no {parts[0]} "
                f"(stages: {', '.join(n for n, _ in self.base.stages())})"
            )
        args = set(typing.get_args(annotation)) - {type(None)} or {annotation}
        integer = args <= {int}
        numeric = args <= {int, float}
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"search space {self.source}: key '{key}': empty list of choices")
            if any(isinstance(v, dict | list) for v in value):
                raise ConfigError(f"search space {self.source}: key '{key}': choices must be plain values")
            return Dimension(key, choices=tuple(value))
        if not isinstance(value, dict):
            raise ConfigError(
                f"search space {self.source}: key '{key}': give a list of choices or a range "
                f"{{low, high}}, not {value!r}"
            )
        unknown = sorted(set(value) - set(_RANGE_KEYS))
        if unknown:
            raise ConfigError(
                f"search space {self.source}: key '{key}': unknown range key '{unknown[0]}' "
                f"(a range has {', '.join(_RANGE_KEYS)})"
            )
        if not numeric:
            raise ConfigError(
                f"search space {self.source}: key '{key}' is not a number setting; give its choices as a list"
            )
        if "low" not in value or "high" not in value:
            raise ConfigError(f"search space {self.source}: key '{key}': a range needs low and high")
        low, high, step, log = value["low"], value["high"], value.get("step"), value.get("log", False)
        for name, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
            if not _is_number(v):
                raise ConfigError(f"search space {self.source}: key '{key}': {name} must be a number, got {v!r}")
        if not isinstance(log, bool):
            raise ConfigError(f"search space {self.source}: key '{key}': log must be true or false, got {log!r}")
        if low > high:
            raise ConfigError(f"search space {self.source}: key '{key}': empty range (low {low} > high {high})")
        if log and low <= 0:
            raise ConfigError(f"search space {self.source}: key '{key}': a log range needs low > 0, got {low}")
        if log and step is not None:
            raise ConfigError(f"search space {self.source}: key '{key}': a range takes log or step, not both")
        if step is not None and step <= 0:
            raise ConfigError(f"search space {self.source}: key '{key}': step must be > 0, got {step}")
        if integer and not all(float(v).is_integer() for v in (low, high, step or 1)):
            raise ConfigError(
                f"search space {self.source}: key '{key}' is an integer setting: low, high and "
                "step must be whole numbers"
            )
        return Dimension(key, low=low, high=high, log=log, step=step, integer=integer)

    def spec(self) -> dict:
        return {d.key: d.spec() for d in self.dimensions}

    def suggest(self, trial) -> dict[str, Any]:
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def config(self, params: dict[str, Any], name: str) -> ExperimentConfig:
        """The base config with ``params`` set, named ``name`` (ConfigError when they do not fit together)."""
        raw = self.base.model_dump(mode="json")
        for key, value in params.items():
            set_key(raw, key, value)
        raw["name"] = name
        return validate_config(raw, f"trial {name}")


# =========================================================================== storage


def make_storage(url: str):
    """An Optuna storage for ``url``: ``journal:///path`` a journal file, ``sqlite:///...`` with a long
    lock timeout (several workers), anything else as Optuna reads it (PostgreSQL, MySQL)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"--storage {url}: {err}") from None
    except SQLAlchemyError as err:  # an unreachable server, a bad URL, a folder that does not exist
        raise ConfigError(f"--storage {url}: cannot open the storage ({type(err).__name__}: {err})") from None


def default_storage(out_dir: str | Path) -> str:
    return f"sqlite:///{(Path(out_dir).resolve() / STUDY_DB)}"


def _sampler(name: str, seed: int, n_trials: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    if name == "nsga2":
        # a few generations even in a small study (Optuna's default population is 50)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 3)))
    raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")


def open_study(
    storage: str,
    study_name: str,
    objectives: Sequence[str] | None = None,
    space: SearchSpace | None = None,
    sampler=None,
):
    """Create or load the study; ConfigError when an existing one has other objectives or another space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = make_storage(storage)
    if objectives is None:  # read only
        try:
            return optuna.load_study(study_name=study_name, storage=store)
        except KeyError:
            raise ConfigError(f"no study '{study_name}' in {storage}") from None
    study = optuna.create_study(
        study_name=study_name,
        storage=store,
        directions=["minimize"] * len(objectives),
        sampler=sampler,
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if "objectives" not in attrs:
        # space first: "objectives" marks a set-up study, so a worker that sees it also sees the space
        study.set_user_attr("space", space.spec() if space else {})
        study.set_user_attr("objectives", list(objectives))
    elif list(attrs["objectives"]) != list(objectives):
        raise ConfigError(
            f"study '{study_name}' in {storage} optimises {','.join(attrs['objectives'])}, not "
            f"{','.join(objectives)}; give the same --objectives or another --study"
        )
    elif space is not None and attrs.get("space") != json.loads(json.dumps(space.spec())):
        raise ConfigError(
            f"study '{study_name}' in {storage} was started with another search space: "
            f"{attrs.get('space')}; give the same space or another --study"
        )
    return study


# =========================================================================== trials


def validation_scores(run_dir: str | Path) -> EvaluationResult:
    """Point scores (no bootstrap) of a finished run's best checkpoint on its validation split."""
    from ..data import load_images
    from ..fairness.metrics import evaluate
    from ..store.checkpoint import model_from_checkpoint
    from ..store.run_folder import RunFolder
    from ..training import predict

    folder = RunFolder.open(run_dir)
    cfg = folder.config()
    faces = folder.faces("valid")
    images = load_images(faces, cfg.data.image_size, cache_dir=cfg.data.cache_dir, workers=1, progress=False)
    model, _ = model_from_checkpoint(folder.best_checkpoint())
    from ..config.runtime import RuntimeSettings

    df = faces.copy()
    df["prediction"] = predict(model, images, device=RuntimeSettings.resolve(cfg.trainer).device)
    return evaluate(df, n_boot=0, n_perm=0, seed=cfg.seed)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError):
        return False
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class TuneEvent:
    """One step of a tune, for a listener (the CLI prints them)."""

    message: str
    warning: bool = False


class Tuner:
    """Runs trials of one study into ``out_dir`` (see the module docstring)."""

    # size: the study's settings, each a CLI option of fairage tune
    def __init__(
        self,
        data_dir: str | Path,
        out_dir: str | Path,
        space: SearchSpace,
        objectives: Sequence[str],
        n_trials: int,
        storage: str | None = None,
        study_name: str = "fairage-tune",
        sampler: str = "nsga2",
        seed: int | None = None,
        on_event: Callable[[TuneEvent], None] | None = None,
        callbacks: Sequence = (),
        references: Sequence[str | Path] = (),
    ):
        if n_trials < 0:
            raise ConfigError(f"--trials must be >= 0, got {n_trials}")
        self.data_dir = Path(data_dir).resolve()
        self.out = Path(out_dir)
        self.space = space
        self.objectives = list(objectives)
        self.n_trials = n_trials
        self.storage = storage or default_storage(self.out)
        self.study_name = study_name
        self.seed = space.base.seed if seed is None else seed
        self.sampler_name = sampler
        self.on_event = on_event or (lambda event: None)
        self.callbacks = callbacks
        self.references = [Path(r) for r in references]
        self.host = socket.gethostname()

    # ------------------------------------------------------------------ study

    def open(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.study = open_study(self.storage, self.study_name, self.objectives, self.space)
        # a fresh sampler stream per start, so a resumed or second worker does not redraw the first trials
        existing = len(self.study.get_trials(deepcopy=False))
        seed = int(np.random.SeedSequence([self.seed, existing]).generate_state(1)[0])
        self.study.sampler = _sampler(self.sampler_name, seed, self.n_trials)
        return self.study

    def _counted(self) -> list[int]:
        """Numbers of the trials that count towards ``n_trials``: finished, failed with a message, running."""
        from optuna.trial import TrialState

        out = []
        for t in self.study.get_trials(deepcopy=False):
            if (
                t.state == TrialState.COMPLETE
                or t.state == TrialState.RUNNING
                or t.state == TrialState.FAIL
                and not t.user_attrs.get("interrupted")
            ):
                out.append(t.number)
        return sorted(out)

    def _retry(self, number: int, trial_id: int, params: dict, run_dir: str | None, why: str) -> None:
        """Mark a running trial failed (interrupted) and queue its parameters again, same run folder."""
        import optuna
        from optuna.trial import TrialState

        optuna.trial.Trial(self.study, trial_id).set_user_attr("interrupted", why)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        attrs = {"retry_of": number}
        if run_dir:
            attrs["run_dir"] = run_dir
        self.study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)

    def recover_interrupted(self) -> list[int]:
        """Trials left running by a dead process of this host: failed (interrupted), queued again."""
        from optuna.trial import TrialState

        found = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") == self.host and not _pid_alive(t.user_attrs.get("pid")):
                self._retry(
                    t.number,
                    t._trial_id,
                    t.params,
                    t.user_attrs.get("run_dir"),
                    f"its process {t.user_attrs.get('pid')} ended",
                )
                found.append(t.number)
        return found

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Run trials until the study holds ``n_trials``; writes ``trials.csv`` and ``front.csv`` after each."""
        from optuna.trial import TrialState

        from ..store.run_folder import config_faces

        for ref in self.references:  # refused before any trial, not after the last
            if objective_point(ref, self.objectives[:2]) is None:
                raise DataError(f"--reference {ref} is not a finished run folder")
        config_faces(self.space.base, self.data_dir)  # a bad dataset fails before the study is opened
        self.open()
        for number in self.recover_interrupted():
            self.on_event(
                TuneEvent(f"trial {number} was interrupted: queued again, its run folder resumes", warning=True)
            )
        while len(self._counted()) < self.n_trials:
            trial = self.study.ask()
            # another worker may have asked at the same moment: the first n_trials numbers run
            if trial.number not in self._counted()[: self.n_trials]:
                trial.set_user_attr("skipped", f"the study already had {self.n_trials} trials")
                self.study.tell(trial, state=TrialState.PRUNED)
                break
            self._run_trial(trial)
            self.write_tables()
        self.write_tables()

    def _run_trial(self, trial) -> None:
        from optuna.trial import TrialState

        from ..store.run_folder import RunFolder
        from ..training import train

        start = time.time()
        # absolute: trials.csv and front.csv then name the folder whatever directory reads them
        run_dir = Path(
            trial.user_attrs.get("run_dir") or (self.out / TRIALS_DIR / f"trial-{trial.number:04d}").absolute()
        )
        trial.set_user_attr("run_dir", str(run_dir))
        # pid before host: another worker on this host recovers a running trial that has a host and
        # no live pid, so a trial must never be seen with its host and without its pid
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", self.host)
        try:
            params = self.space.suggest(trial)
            self.on_event(TuneEvent(f"trial {trial.number}: {_params_text(params)}"))
            cfg = self.tracked(self.space.config(params, name=run_dir.name), run_dir)
            train(
                cfg, self.data_dir, run_dir, resume=RunFolder.exists(run_dir), progress=False, callbacks=self.callbacks
            )
            scores = validation_scores(run_dir)
            values = []
            for name in self.objectives:
                value, _ = objective_value(scores, name)
                if value is None:
                    raise DataError(
                        f"objective {name} is undefined on the validation split (fewer than two groups with faces)"
                    )
                trial.set_user_attr(f"val_{name}", float(value))
                values.append(float(value))
        except Exception as err:  # noqa: BLE001 - a failing trial is recorded with its message; the study goes on
            message = f"{type(err).__name__}: {err}" if not str(err).startswith(type(err).__name__) else str(err)
            trial.set_user_attr("error", message)
            trial.set_user_attr("duration_s", round(time.time() - start, 1))
            self.study.tell(trial, state=TrialState.FAIL)
            self.on_event(TuneEvent(f"trial {trial.number} failed: {message}", warning=True))
            return
        except BaseException:  # Ctrl-C, SIGTERM: the next start retries this trial
            self._retry(trial.number, trial._trial_id, trial.params, str(run_dir), "interrupted")
            raise
        trial.set_user_attr("duration_s", round(time.time() - start, 1))
        self.study.tell(trial, values)
        self.on_event(
            TuneEvent(
                f"trial {trial.number} finished in {time.time() - start:.0f} s: "
                + ", ".join(f"val {n} {v:.3f}" for n, v in zip(self.objectives, values))
            )
        )

    def tracked(self, cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
        """A trial's config with its MLflow settings (``trainer.logger: mlflow`` only; else unchanged).

        The study's trials share one experiment (the study's name, unless the base config names
        one) in one store (``sqlite:///OUT/mlflow.db`` unless ``trainer.tracking_uri`` names one),
        tagged ``fairage.study`` and ``fairage.trial`` (the number in the run folder's name, so a
        retried trial keeps its first number and its run folder still matches its config).
        """
        if cfg.trainer.logger != "mlflow":
            return cfg
        from ..training.factories import sqlite_tracking_uri

        raw = cfg.model_dump(mode="json")
        trainer = raw["trainer"]
        trainer["tracking_uri"] = trainer["tracking_uri"] or sqlite_tracking_uri(self.out)
        trainer["experiment_name"] = trainer["experiment_name"] or self.study_name
        number = run_dir.name.removeprefix("trial-")
        trainer["tracking_tags"] = {
            **trainer["tracking_tags"],
            "fairage.study": self.study_name,
            "fairage.trial": str(int(number)) if number.isdigit() else run_dir.name,
        }
        return validate_config(raw, f"trial {run_dir.name}")

    # ------------------------------------------------------------------ tables

    def write_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        trials = trials_table(self.study, self.objectives, [d.key for d in self.space.dimensions])
        front = front_table(self.study, self.objectives)
        write_text(self.out / TRIALS, trials.to_csv(index=False))
        write_text(self.out / FRONT, front.to_csv(index=False))
        if len(self.objectives) >= 2:
            plot_front(self.study, self.objectives[:2], self.out / FRONT_PLOT, self.references)
        return trials, front


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trials_table(study, objectives: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """One row per trial: ``number, state, <keys>, val_<objective>..., run_dir, error, retry_of, duration_s``."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for key in keys:
            row[key] = t.params.get(key)
        for name in objectives:
            row[f"val_{name}"] = t.user_attrs.get(f"val_{name}")
        row["run_dir"] = t.user_attrs.get("run_dir")
        row["error"] = t.user_attrs.get("error") or t.user_attrs.get("interrupted") or t.user_attrs.get("skipped")
        row["retry_of"] = t.user_attrs.get("retry_of")
        row["duration_s"] = t.user_attrs.get("duration_s")
        rows.append(row)
    columns = [
        "number",
        "state",
        *keys,
        *[f"val_{n}" for n in objectives],
        "run_dir",
        "error",
        "retry_of",
        "duration_s",
    ]
    return pd.DataFrame(rows, columns=columns)


def front_table(study, objectives: Sequence[str]) -> pd.DataFrame:
    """The Pareto trials (validation objectives, all minimised), with the test split's objectives beside.

    Test values come from each trial's ``metrics_test.json``; they are empty where the run folder
    is not on this machine (a trial another machine ran into its own output folder).
    """
    from ..store.run_folder import RunFolder

    rows = []
    for t in sorted(study.best_trials, key=lambda t: t.number):
        row: dict[str, Any] = {"number": t.number}
        for name, value in zip(objectives, t.values):
            row[f"val_{name}"] = value
        metrics = None
        run_dir = t.user_attrs.get("run_dir")
        if run_dir and RunFolder.exists(run_dir):
            metrics = RunFolder.open(run_dir).metrics()
        for name in objectives:
            value, ci = objective_value(metrics, name) if metrics is not None else (None, None)
            row[f"test_{name}"] = value
            row[f"test_{name}_ci_low"] = ci[0] if ci else None
            row[f"test_{name}_ci_high"] = ci[1] if ci else None
        row["run_dir"] = run_dir
        rows.append(row)
    columns = [
        "number",
        *[f"val_{n}" for n in objectives],
        *[c for n in objectives for c in (f"test_{n}", f"test_{n}_ci_low", f"test_{n}_ci_high")],
        "run_dir",
    ]
    return pd.DataFrame(rows, columns=columns)


def objective_point(run_dir: Path, objectives: Sequence[str]) -> dict | None:
    """``x, x_low, x_high, y, y_low, y_high`` of a finished run's test metrics (None when it has none)."""
    from ..store.run_folder import RunFolder

    if not RunFolder(run_dir).file(RunFolder.CONFIG).is_file():
        return None
    metrics = RunFolder.open(run_dir, record_required=False).metrics()
    if metrics is None:
        return None
    row = {}
    for axis, name in zip("xy", objectives):
        value, ci = objective_value(metrics, name)
        if value is None:
            return None
        row.update({axis: value, f"{axis}_low": ci[0] if ci else math.nan, f"{axis}_high": ci[1] if ci else math.nan})
    return row


def plot_front(study, objectives: Sequence[str], path: Path, references: Sequence[Path] = ()) -> Path | None:
    """``front.png``: two objectives of the finished trials whose run folders are here (test split)."""
    from optuna.trial import TrialState

    from ..outputs.plots import plot_pareto
    from ..store.run_folder import RunFolder

    on_front = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        point = objective_point(Path(t.user_attrs.get("run_dir", "")), objectives)
        if point is not None:
            rows.append({"number": t.number, **point, "front": t.number in on_front})
    if not rows:
        return None
    refs = []
    for ref in references:
        point = objective_point(ref, objectives)
        if point is None:
            raise DataError(f"reference {ref} is not a finished run folder with {', '.join(objectives)}")
        refs.append({"name": RunFolder.open(ref, record_required=False).config().name, **point})
    return plot_pareto(
        pd.DataFrame(rows),
        path,
        f"{objectives[0]} (years, test)",
        f"{objectives[1]} (years, test)",
        pd.DataFrame(refs) if refs else None,
        title=f"study '{study.study_name}': trials on the test split (bootstrap intervals)",
    )


# =========================================================================== reading a tune folder


@dataclass
class TuneFolder:
    """A tune folder read back from its tables (no Optuna needed; see ``read_tune_folder``).

    ``objectives``: the study's objectives in order (from ``front.csv``'s ``val_<objective>``
    columns); ``front``: ``front.csv`` (numeric columns as floats, ``number`` as int);
    ``trials``: ``trials.csv`` or None without one.
    """

    path: Path
    objectives: list[str]
    front: pd.DataFrame
    trials: pd.DataFrame | None

    def run_dir(self, recorded: Any) -> Path | None:
        """The run folder of a trial whose table names ``recorded``: that path, else
        ``TUNE/trials/<its name>`` (a tune folder copied or moved); None when neither is a run folder."""
        from ..store.run_folder import RunFolder

        if not isinstance(recorded, str) or not recorded:
            return None
        for path in (Path(recorded), self.path / TRIALS_DIR / Path(recorded).name):
            if RunFolder(path).file(RunFolder.CONFIG).is_file():
                return path
        return None


def _read_table(path: Path) -> pd.DataFrame:
    from ..csvcells import unquote

    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    for column in table.columns[table.dtypes == object]:
        table[column] = table[column].map(unquote)
    return table


def _numeric_columns(table: pd.DataFrame, columns: Sequence[str], path: Path, integer: Sequence[str] = ()) -> None:
    """Columns as floats in place (empty cells NaN); DataError naming the file, line and column of a bad cell."""
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = np.flatnonzero(
            values.isna().to_numpy() & table[column].notna().to_numpy()
            | (~np.isfinite(values.to_numpy(dtype=float)) & values.notna().to_numpy())
        )
        if column in integer:
            bad = np.union1d(bad, np.flatnonzero(values.isna().to_numpy() | (values.fillna(0) % 1 != 0).to_numpy()))
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f"{path}: line {row + 2}, column {column}: {table[column].iloc[row]!r} is not "
                + ("a trial number" if column in integer else "a finite number")
            )
        table[column] = values.astype(int) if column in integer else values.astype(float)


def read_tune_folder(path: str | Path) -> TuneFolder:
    """Read ``front.csv`` (required) and ``trials.csv`` (optional) of a tune folder.

    DataError naming the file for a folder without ``front.csv``, an unreadable table, a missing
    column (``number``, a ``val_<objective>`` per objective, its ``test_<objective>`` and
    ``_ci_low``/``_ci_high``), an unknown objective, or a cell that is not a number (line and column).
    """
    path = Path(path)
    front_path = path / FRONT
    if not front_path.is_file():
        raise DataError(f"{path} is not a tune folder: no {FRONT} (written by fairage tune --out {path})")
    front = _read_table(front_path)
    objectives = [c[len("val_") :] for c in front.columns if str(c).startswith("val_")]
    if "number" not in front.columns or not objectives:
        raise DataError(
            f"{front_path}: expected the columns number, val_<objective>..., test_<objective>...; "
            f"found {', '.join(map(str, front.columns))}"
        )
    unknown = [o for o in objectives if o not in objective_names()]
    if unknown:
        raise DataError(f"{front_path}: column val_{unknown[0]} names no objective fairage tune has")
    numeric = [f"val_{o}" for o in objectives] + [
        f"test_{o}{end}" for o in objectives for end in ("", "_ci_low", "_ci_high")
    ]
    missing = [c for c in numeric if c not in front.columns]
    if missing:
        raise DataError(f"{front_path}: missing column {missing[0]}")
    _numeric_columns(front, ["number", *numeric], front_path, integer=["number"])
    trials = None
    trials_path = path / TRIALS
    if trials_path.is_file():
        trials = _read_table(trials_path)
        missing = [c for c in ("number", "state", *[f"val_{o}" for o in objectives]) if c not in trials.columns]
        if missing:
            raise DataError(
                f"{trials_path}: missing column {missing[0]} (objectives of {FRONT}: {', '.join(objectives)})"
            )
        _numeric_columns(trials, ["number", *[f"val_{o}" for o in objectives]], trials_path, integer=["number"])
    return TuneFolder(path, objectives, front, trials)


def front_points(tune: TuneFolder, objectives: Sequence[str]) -> pd.DataFrame:
    """The test-split points of ``plots.plot_pareto``: the front's rows (``front.csv``), then every other
    finished trial of ``trials.csv`` whose run folder is here (its ``metrics_test.json``).

    Columns ``number, x, x_low, x_high, y, y_low, y_high, front`` (x, y: the two ``objectives``,
    years); trials without test figures are left out.
    """
    rows = []
    x, y = objectives[:2]
    for r in tune.front.to_dict("records"):
        if not (math.isnan(r[f"test_{x}"]) or math.isnan(r[f"test_{y}"])):
            rows.append(
                {
                    "number": int(r["number"]),
                    "front": True,
                    **{
                        f"{axis}{end}": r[f"test_{name}{ci}"]
                        for axis, name in (("x", x), ("y", y))
                        for end, ci in (("", ""), ("_low", "_ci_low"), ("_high", "_ci_high"))
                    },
                }
            )
    on_front = set(tune.front["number"])
    if tune.trials is not None and "run_dir" in tune.trials.columns:
        for r in tune.trials.to_dict("records"):
            run_dir = tune.run_dir(r["run_dir"])
            if r["state"] != "COMPLETE" or r["number"] in on_front or run_dir is None:
                continue
            point = objective_point(run_dir, (x, y))
            if point is not None:
                rows.append({"number": int(r["number"]), "front": False, **point})
    columns = ["number", "x", "x_low", "x_high", "y", "y_low", "y_high", "front"]
    return pd.DataFrame(rows, columns=columns)


def paired_differences(baseline: str | Path, run_dir: str | Path, objectives: Sequence[str]) -> dict[str, Any]:
    """Each objective of ``run_dir`` minus ``baseline`` on the same test faces, a paired bootstrap.

    ``fairage.fairness.metrics.compare`` of both runs' ``predictions_test.csv`` (A = the baseline, B = the
    run; negative: the run is lower) with the baseline's ``eval.*`` settings and seed. Returns
    ``{objective: metrics.Difference | None}``: ``mae`` and ``<attr>_bias`` objectives (None for a bias
    undefined on the test split; ``worst_<attr>_mae`` objectives are None too: compare's worst group
    leaves small groups out, the objective does not). DataError when a run has no predictions or
    the two cover different faces.
    """
    from ..csvcells import unquote
    from ..fairness.metrics import compare
    from ..store.predictions import read_predictions
    from ..store.run_folder import RunFolder

    tables = []
    for run in (baseline, run_dir):
        table = read_predictions(RunFolder(run).file(RunFolder.PREDICTIONS))
        for column in table.columns[table.dtypes == object]:
            table[column] = table[column].map(unquote)
        if "age" not in table.columns:
            raise DataError(f"{RunFolder(run).file(RunFolder.PREDICTIONS)}: no age column to compare on")
        tables.append(table)
    folder = RunFolder.open(baseline, record_required=False)
    settings = folder.evaluation_settings(columns=tables[0].columns)
    result = compare(
        tables[0],
        tables[1],
        attributes=settings["attributes"],
        n_boot=settings["n_boot"],
        level=settings["level"],
        seed=settings["seed"],
        intersections=settings["intersections"],
        min_group=settings["min_group"],
        cs_k=settings["cs_k"],
    )
    out: dict[str, Any] = {}
    for name in objectives:
        if name == "mae":
            out[name] = result.mae_diff
        elif name.endswith("_bias"):
            out[name] = result.bias_diff.get(name[: -len("_bias")])
        else:
            out[name] = None
    return out


# =========================================================================== choosing


_RULE = re.compile(r"^\s*([a-z_]+)\s*<=\s*(\+)?\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass
class Pick:
    """The trial ``pick`` chose: its number, run folder, validation objectives and the written config."""

    number: int
    run_dir: Path
    values: dict[str, float]
    config_path: Path
    rule: str


def pick_trial(study, rule: str, out_dir: str | Path) -> Pick:
    """Choose a finished trial by a rule on the **validation** objectives; write its config as YAML.

    ``"age_bias<=1.0"``: among trials with validation age bias at most 1.0 years, the one lowest
    in the other objectives (in ``--objectives`` order); ``"mae<=+0.3"`` (a ``+``): within 0.3 of
    the best validation MAE, the lowest in the others. The chosen run's ``config.yaml`` is written
    to ``OUT/picked.yaml`` (a config for ``fairage train --config``); the run folder itself is a
    model for ``predict``, ``serve`` and ``export``. Ties go to the lower trial number.
    """
    from optuna.trial import TrialState

    from ..store.run_folder import RunFolder

    objectives = list(study.user_attrs.get("objectives", []))
    match = _RULE.match(rule)
    if not match:
        raise ConfigError(f"--pick '{rule}': expected OBJECTIVE<=VALUE or OBJECTIVE<=+DELTA, e.g. age_bias<=1.0")
    name, relative, number = match.group(1), match.group(2), float(match.group(3))
    if name not in objectives:
        raise ConfigError(f"--pick '{rule}': '{name}' is not an objective of this study ({', '.join(objectives)})")
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        raise ConfigError("--pick: the study has no finished trial yet")
    k = objectives.index(name)
    best = min(t.values[k] for t in done)
    limit = best + number if relative else number
    candidates = [t for t in done if t.values[k] <= limit + 1e-12]
    if not candidates:
        raise ConfigError(
            f"--pick '{rule}': no finished trial has validation {name} <= {limit:.4g} (the lowest is {best:.4g})"
        )
    others = [i for i in range(len(objectives)) if i != k] + [k]
    chosen = min(candidates, key=lambda t: (*[t.values[i] for i in others], t.number))
    run_dir = Path(chosen.user_attrs["run_dir"])
    if not RunFolder.exists(run_dir):
        raise DataError(f"--pick: trial {chosen.number}'s run folder {run_dir} is not on this machine")
    cfg = RunFolder.open(run_dir).config()
    if cfg.trainer.tracking_tags:  # a retrained pick is not the trial: it keeps the study's experiment only
        tags = {k: v for k, v in cfg.trainer.tracking_tags.items() if k not in ("fairage.study", "fairage.trial")}
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"tracking_tags": tags})})
    values = dict(zip(objectives, chosen.values))
    text = ", ".join(f"validation {n} {v:.3f}" for n, v in values.items())
    cfg = cfg.model_copy(
        update={
            "name": f"tuned-{run_dir.name}",
            "description": f"chosen by fairage tune --pick '{rule}' from study "
            f"'{study.study_name}': trial {chosen.number} ({text} years); "
            f"trained run: {run_dir.resolve()}",
        }
    )
    path = Path(out_dir) / PICKED
    write_text(path, dump_config(cfg))
    return Pick(chosen.number, run_dir, values, path, rule)


# =========================================================================== entry point


def load_base(config: str | Path | None, preset: str, scale: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config every trial starts from: a config file, or a preset at ``scale``."""
    from ..config.files import load_config
    from ..config.presets import load_preset

    return load_config(config, list(overrides)) if config else load_preset(preset, scale, list(overrides))


# size: the study's settings, each a CLI option of fairage tune
def run_tune(
    data_dir: str | Path,
    out_dir: str | Path,
    base: ExperimentConfig,
    space: SearchSpace | None = None,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    n_trials: int = 20,
    storage: str | None = None,
    study_name: str = "fairage-tune",
    sampler: str = "nsga2",
    scale: str = "cpu",
    seed: int | None = None,
    on_event: Callable[[TuneEvent], None] | None = None,
    references: Sequence[str | Path] = (),
) -> Tuner:
    """Run (or continue) a study until it holds ``n_trials`` trials; returns the Tuner (``.study``).

    ``space`` defaults to the shipped space of ``scale``. Writes ``trials.csv``, ``front.csv`` and
    ``front.png`` (with ``references``, finished run folders such as M1..M5, as reference points).
    """
    space = space or SearchSpace.default(scale, base)
    tuner = Tuner(
        data_dir,
        out_dir,
        space,
        parse_objectives(objectives),
        n_trials,
        storage,
        study_name,
        sampler,
        seed,
        on_event,
        references=references,
    )
    tuner.run()
    return tuner


@dataclass(frozen=True)
class TuneRequest:
    """What ``fairage tune`` is asked: run (or continue) a study's trials into ``out`` (``data`` given),
    or open a finished study to pick from (``pick`` without ``data``).

    ``config`` or ``preset`` at ``scale``, with ``overrides``: the base config every trial starts
    from; ``space``: a search space file (None: the shipped space of ``scale``); ``storage``: an
    Optuna storage URL (None: ``OUT/study.db``); ``objectives``: comma-separated objective names;
    ``references``: finished run folders drawn in ``front.png``; ``tracking_uri``: the MLflow
    store the trials log to (its overrides are in ``overrides`` already).
    """

    out: Path
    data: Path | None = None
    space: Path | None = None
    trials: int = 20
    storage: str | None = None
    study: str = "fairage-tune"
    objectives: str = ",".join(DEFAULT_OBJECTIVES)
    scale: str = "cpu"
    preset: str = "M1"
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    sampler: str = "nsga2"
    seed: int | None = None
    pick: str | None = None
    references: tuple[Path, ...] = ()
    tracking_uri: str | None = None


@dataclass
class TuneOutcome:
    """The study a ``TuneRequest`` ran or opened, its objectives and, when trials ran, the Pareto front
    table (``front_table``: validation objectives with the test ones beside)."""

    study: Any
    objectives: list[str]
    front: pd.DataFrame | None = None


def tune(request: TuneRequest, on_event: Callable[[TuneEvent], None] | None = None) -> TuneOutcome:
    """Run the trials of ``request`` (writing ``trials.csv``, ``front.csv``, ``front.png``), or open its
    finished study for ``pick_trial``; ConfigError for a request that can do neither.

    SIGTERM during the trials raises ``fairage.training.interrupt.Terminated``.
    """
    names = parse_objectives(request.objectives)
    url = request.storage or default_storage(request.out)
    if request.data is not None:
        return _run_trials(request, names, url, on_event)
    if request.pick is None:
        raise ConfigError("--data DIR is required to run trials (only --pick reads a finished study without it)")
    if request.tracking_uri is not None:
        raise ConfigError("--tracking-uri applies to trials run with --data DIR, not to --pick alone")
    if request.storage is None and not (request.out / STUDY_DB).is_file():
        raise ConfigError(
            f"{request.out} holds no study (no study.db); run `fairage tune --data DIR --out {request.out}` first"
        )
    return TuneOutcome(open_study(url, request.study), names)


def _run_trials(request: TuneRequest, names: list[str], url: str, on_event) -> TuneOutcome:
    from ..config.runtime import check_trainer
    from ..training.interrupt import sigterm_raises

    base = load_base(request.config, request.preset, request.scale, request.overrides)
    check_trainer(base.trainer)  # before any trial's run folder is created
    if request.space:
        space = SearchSpace.from_file(request.space, base)
    else:
        space = SearchSpace.default(request.scale, base)
    with sigterm_raises():
        tuner = run_tune(
            request.data,
            request.out,
            base,
            space,
            names,
            request.trials,
            url,
            request.study,
            request.sampler,
            request.scale,
            request.seed,
            on_event,
            references=list(request.references),
        )
    return TuneOutcome(tuner.study, names, tuner.write_tables()[1])
