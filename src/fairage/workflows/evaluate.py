"""Predictions of a model on a dataset split, and their scores: the one place that decides whether a run's
predictions file is read or its model predicts the faces again (``fairage evaluate``, ``compare``, ``submit``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..config.schema import EvalConfig
from ..data.schema import AGE_EDGES
from ..errors import DataError


@dataclass
class SplitPredictions:
    """A split's faces with a ``prediction`` column (and ``age_lo``, ``age_hi`` for a calibrated model)."""

    df: pd.DataFrame
    #: the predictions file read, or the model (run or model folder) that predicted the faces
    source: Path
    #: how to score them: the run's eval settings and seed (defaults for a model folder or a file)
    eval_config: EvalConfig
    seed: int
    #: the model's calibration when the predictions are its own (None for a predictions file given)
    calibration: Any = None


def split_faces(data: Path, split: str, options: dict | None = None) -> pd.DataFrame:
    """The faces of ``split`` in the dataset ``data`` (``load_faces`` keyword arguments ``options``)."""
    from ..data import load_faces

    faces = load_faces(data, **(options or {}))
    faces = faces[faces["split"] == split].reset_index(drop=True)
    if len(faces) == 0:
        raise DataError(f"{data}: the dataset has no {split!r} faces")
    return faces


def run_split_faces(folder, data: Path | None, split: str, options: dict | None = None) -> pd.DataFrame:
    """A run's faces of ``split``: loaded as the run loaded them, unless other data or data options are given
    (``options``: ``load_faces`` keyword arguments on top of the run's own)."""
    base = folder.config().data.loader_options()
    merged = {**base, **(options or {})}
    if data is None and merged == base:
        return folder.faces(split)
    return split_faces(data or folder.data_dir, split, merged)


def run_predictions_file(folder) -> Path:
    """A run folder's ``predictions_test.csv``; DataError when the run has not written it."""
    from ..store.run_folder import RunFolder

    predictions = folder.file(RunFolder.PREDICTIONS)
    if not predictions.is_file():
        raise DataError(f"{folder.path}: run folder has no {RunFolder.PREDICTIONS} (is the run finished?)")
    return predictions


def joined_predictions(predictions: Path, faces: pd.DataFrame, clip: bool = False) -> pd.DataFrame:
    """``faces`` with the predictions of the file ``predictions`` joined on ``image``."""
    from ..store.predictions import join_predictions, read_predictions

    return join_predictions(faces, read_predictions(predictions, clip=clip), predictions)


def model_predictions(model: Path, faces: pd.DataFrame, progress: bool) -> pd.DataFrame:
    """``faces`` with a ``prediction`` column from the model in ``model`` (a model or run folder;
    images decoded as for training) and, when it carries a calibration, ``age_lo``, ``age_hi``
    (the faces' own group labels used)."""
    from ..inference.predictor import load_model, predict_faces

    loaded = load_model(model)
    df = faces.copy()
    df["prediction"] = predict_faces(loaded, faces, progress=progress)
    if loaded.calibration is not None:
        df["age_lo"], df["age_hi"] = loaded.calibration.intervals(df["prediction"].to_numpy(), df)
    return df


def split_predictions(
    run_dir: Path | None = None,
    data: Path | None = None,
    split: str = "test",
    predictions: Path | None = None,
    data_options: dict | None = None,
    clip: bool = False,
    progress: bool = True,
) -> SplitPredictions:
    """The predictions for a model on a dataset split.

    - a model folder (no ``predictions``): its model predicts the ``split`` faces of ``data`` (required);
    - a run folder: its faces of ``split`` (loaded with the run's data settings, or from ``data``), with
      ``predictions`` if given, else its ``predictions_test.csv`` for its own test split, else its model
      predicts them; scored with the run's eval settings and seed;
    - no folder: ``data`` and ``predictions`` both required.
    ``data_options``: ``load_faces`` keyword arguments given on the command line.
    """
    from ..store.model_folder import is_model_folder

    eval_config, seed = EvalConfig(), 0
    if run_dir is not None and predictions is None and is_model_folder(run_dir):
        from ..fairness.conformal import CONFORMAL, read_calibration

        calibration = read_calibration(run_dir / CONFORMAL)
        if data is None:  # no predictions yet: the model predicts the split's faces first
            raise DataError(f"{run_dir} is a model folder: give the dataset with --data DIR")
        faces = split_faces(data, split, data_options)
        return SplitPredictions(model_predictions(run_dir, faces, progress), run_dir, eval_config, seed, calibration)
    if run_dir is not None:
        from ..store.run_folder import RunFolder

        folder = RunFolder.open(run_dir)
        run_config = folder.config()
        eval_config, seed = run_config.eval, run_config.seed
        calibration = folder.calibration() if predictions is None else None
        faces = run_split_faces(folder, data, split, data_options)
        own_test = split == "test" and (data is None or data.resolve() == Path(folder.data_dir).resolve())
        if predictions is None and not own_test:
            # predictions_test.csv covers the run's own test split only: its model predicts these faces
            df = model_predictions(run_dir, faces, progress)
            return SplitPredictions(df, run_dir, eval_config, seed, calibration)
        if predictions is None:
            predictions = run_predictions_file(folder)
        return SplitPredictions(
            joined_predictions(predictions, faces, clip), predictions, eval_config, seed, calibration
        )
    if data is None or predictions is None:
        raise DataError("give a run folder, or both --data DIR and --predictions FILE")
    faces = split_faces(data, split, data_options)
    return SplitPredictions(joined_predictions(predictions, faces, clip), predictions, eval_config, seed)


def metric_settings(found: SplitPredictions, chosen: dict | None = None) -> dict[str, Any]:
    """``evaluate``'s keyword arguments: the eval settings of ``found`` with the values in ``chosen``
    (those not None: ``n_boot``, ``level``, ``n_perm``, ``seed``, ``attributes``, ``intersections``,
    ``min_group``) on top."""
    settings = found.eval_config.metric_settings(found.seed, found.df.columns)
    settings.update({k: v for k, v in (chosen or {}).items() if v is not None})
    return settings


def evaluate_split(found: SplitPredictions, settings: dict, age_edges=None):
    """Score ``found`` with ``settings`` (``metric_settings``): the ``EvaluationResult``, with the model's
    intervals when it carries a calibration. ``age_edges``: the bias groups' inner edges (default
    ``AGE_EDGES``)."""
    from ..fairness.conformal import interval_arguments
    from ..fairness.metrics import evaluate

    edges = AGE_EDGES if age_edges is None else age_edges
    return evaluate(found.df, age_edges=edges, **settings, **interval_arguments(found.calibration, found.df))


def compare_predictions(
    predictions_a: Path,
    predictions_b: Path,
    data: Path,
    split: str = "test",
    data_options: dict | None = None,
    clip: bool = False,
    chosen: dict | None = None,
    age_edges=None,
):
    """Paired comparison (B - A) of two predictions files on the ``split`` faces of ``data``, scored with
    the default eval settings and ``chosen`` (``n_boot``, ``level``, ``seed``, ``attributes``; None: default)."""
    from ..fairness.metrics import compare

    faces = split_faces(data, split, data_options)
    df_a = joined_predictions(predictions_a, faces, clip)
    df_b = joined_predictions(predictions_b, faces, clip)
    chosen = {k: v for k, v in (chosen or {}).items() if v is not None}
    settings = EvalConfig().metric_settings(chosen.get("seed", 0), df_a.columns)
    settings.update(chosen)
    keys = ("attributes", "n_boot", "level", "seed", "intersections", "min_group", "cs_k")
    edges = AGE_EDGES if age_edges is None else age_edges
    return compare(df_a, df_b, age_edges=edges, **{k: settings[k] for k in keys})


def submission(
    predictions_or_run: Path, out: Path, data: Path | None = None, data_options: dict | None = None, clip=False
):
    """Write the submission zip of a predictions file (with ``data``) or a run folder; the ages written."""
    from ..store.predictions import read_predictions
    from ..store.run_folder import RunFolder
    from ..store.submission import write_submission

    predictions = predictions_or_run
    if predictions_or_run.is_dir():
        folder = RunFolder.open(predictions_or_run)
        predictions = run_predictions_file(folder)
        faces = run_split_faces(folder, data, "test", data_options)
    elif data is None:
        raise DataError("--data DIR is required with a predictions file")
    else:
        faces = split_faces(data, "test", data_options)
    return write_submission(out, faces, read_predictions(predictions, clip=clip), predictions)
