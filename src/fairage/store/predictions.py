"""The predictions file: one predicted age per face, joined to the dataset on ``image``.

CSV with header ``image,prediction`` (``image`` is the face table's identifier, compared
as a string; ``prediction`` in years) plus, when written by fairage, ``spread`` (a model
whose head gives a distribution over the ages, dex, coral, corn: each face's standard deviation
of that distribution in years), then, when the model carries a conformal calibration
(``fairage.fairness.conformal``), ``age_lo,age_hi`` (its interval, years), then
``age,gender,ethnicity,expression`` for convenience. Rows are in dataset order.
``read_predictions`` also takes the ``image,age[,spread][,age_lo,age_hi]`` file of ``fairage predict --faces``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..csvcells import safe_table, unquote
from ..data.schema import SCORED_ATTRIBUTES
from ..errors import DataError

#: plausible predicted ages in years; ``read_predictions`` refuses values outside (or clips them)
PREDICTION_RANGE: tuple[float, float] = (0.0, 150.0)

#: columns written by ``write_predictions``
PREDICTION_COLUMNS: tuple[str, ...] = ("image", "prediction", *SCORED_ATTRIBUTES)
#: the per-face spread (years) of a distribution head's prediction; not the face table's ``age_std``,
#: which is the raters' spread of the label
SPREAD_COLUMN = "spread"
#: the conformal interval's columns (optional), years
INTERVAL_COLUMNS: tuple[str, str] = ("age_lo", "age_hi")


def write_predictions(path: str | os.PathLike, faces: pd.DataFrame, predictions, spread=None, intervals=None) -> None:
    """Atomically write the predictions of one split's ``faces`` (dataset order) to ``path``.

    ``predictions`` is array-like of shape (len(faces),), years; ``spread`` (same shape,
    years) the model's per-face standard deviation, or None for a model that gives none;
    ``intervals`` an optional ``(age_lo, age_hi)`` pair of such arrays (the conformal interval).
    """
    predictions = np.asarray(predictions, dtype=float).reshape(-1)
    if predictions.shape[0] != len(faces):
        raise ValueError(f"{len(predictions)} predictions for {len(faces)} faces")
    table = pd.DataFrame({"image": faces["image"].astype(str).to_numpy(), "prediction": predictions})
    if spread is not None:
        spread = np.asarray(spread, dtype=float).reshape(-1)
        if spread.shape[0] != len(faces):
            raise ValueError(f"{len(spread)} spreads for {len(faces)} faces")
        table[SPREAD_COLUMN] = spread
    if intervals is not None:
        for column, values in zip(INTERVAL_COLUMNS, intervals):
            values = np.asarray(values, dtype=float).reshape(-1)
            if values.shape != predictions.shape:
                raise ValueError(f"{len(values)} {column} values for {len(faces)} faces")
            table[column] = values
    for column in PREDICTION_COLUMNS[2:]:
        if column in faces.columns:
            table[column] = faces[column].to_numpy()
    with atomic_path(path) as tmp:
        # shortest round-trip digits: the file holds exactly the values the run scored; image ids
        # that a spreadsheet would run as formulas are quoted (read_predictions unquotes them)
        safe_table(table).to_csv(tmp, index=False)


def read_predictions(path: str | os.PathLike, clip: bool = False) -> pd.DataFrame:
    """Read a predictions CSV: ``image`` (str) and ``prediction`` (float years) plus any other columns.

    Raises DataError naming the file (and the first bad row) for a missing or unreadable
    file, missing columns, empty, NaN or non-numeric predictions, and predictions outside
    ``PREDICTION_RANGE`` (0 to 150 years); with ``clip=True`` those are clipped into it instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    try:
        table = pd.read_csv(path, dtype={"image": str})  # pandas parses floats round-trip exactly
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    for column in table.columns:  # text a spreadsheet would run was written quoted (fairage.csvcells)
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].map(unquote)
    if list(table.columns[:2]) == ["image", "age"] and set(table.columns) <= {
        "image",
        "age",
        SPREAD_COLUMN,
        *INTERVAL_COLUMNS,
    }:
        table = _from_face_predictions(table)
    missing = [c for c in ("image", "prediction") if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} "
            f"(expected header image,prediction; found {', '.join(map(str, table.columns))})"
        )
    if table["image"].isna().any():
        row = int(np.flatnonzero(table["image"].isna().to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has an empty image id")
    values = pd.to_numeric(table["prediction"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {row + 2} (image {table['image'].iloc[row]}): prediction "
            f"{_show(table['prediction'].iloc[row])} is missing or not a finite number"
            + (f" ({bad.size} bad rows in all)" if bad.size > 1 else "")
        )
    low, high = PREDICTION_RANGE
    out = np.flatnonzero((values < low) | (values > high))
    if out.size and clip:
        values = np.clip(values, low, high)
    elif out.size:
        row = int(out[0])
        raise DataError(
            f"{path}: row {row + 2} (image {table['image'].iloc[row]}): prediction {values[row]:g} years "
            f"is outside {low:g} to {high:g}"
            + (f" ({out.size} such rows)" if out.size > 1 else "")
            + "; --clip clips predictions into that range"
        )
    table["image"] = table["image"].astype(str)
    table["prediction"] = values
    if any(c in table.columns for c in INTERVAL_COLUMNS):
        _check_intervals(path, table)
    return table


def _check_intervals(path: Path, table: pd.DataFrame) -> None:
    """``age_lo`` and ``age_hi`` both present, finite and ordered; DataError naming the first bad row."""
    missing = [c for c in INTERVAL_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: has {', '.join(c for c in INTERVAL_COLUMNS if c not in missing)} "
            f"but not {missing[0]} (an interval needs both)"
        )
    lo = pd.to_numeric(table["age_lo"], errors="coerce").to_numpy(dtype=float)
    hi = pd.to_numeric(table["age_hi"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi) | (lo > hi))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {row + 2} (image {table['image'].iloc[row]}): interval "
            f"[{_show(table['age_lo'].iloc[row])}, {_show(table['age_hi'].iloc[row])}] is not two finite "
            "numbers with age_lo <= age_hi" + (f" ({bad.size} bad rows in all)" if bad.size > 1 else "")
        )
    table["age_lo"], table["age_hi"] = lo, hi


def _show(value) -> str:
    """repr of a table value for messages: numpy scalars shown as plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _from_face_predictions(table: pd.DataFrame) -> pd.DataFrame:
    """A ``fairage predict --faces`` file (``image,age[,spread]``: ages predicted from face crops) as predictions.

    An APPA-REAL face crop ``[<folder>/]<id>_face.jpg`` names the face ``<id>``; other
    image names are kept as written (the path relative to the folder predicted).
    """
    table = table.rename(columns={"age": "prediction"})
    names = table["image"].astype(str)
    crop = names.str.endswith("_face.jpg")
    table.loc[crop, "image"] = names[crop].map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1][: -len("_face.jpg")])
    return table


def _few(ids, limit: int = 5) -> str:
    ids = list(ids)
    text = ", ".join(ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def join_predictions(
    faces: pd.DataFrame, preds: pd.DataFrame, source: str | os.PathLike = "predictions"
) -> pd.DataFrame:
    """``faces`` (one split, dataset order) with a ``prediction`` column from ``preds``
    (and ``age_lo``, ``age_hi`` when ``preds`` has them).

    Every face must have exactly one prediction and every prediction must belong to a
    face of the split; otherwise DataError (naming ``source``) lists a few of the missing,
    duplicated and extra image ids.
    """
    face_ids = faces["image"].astype(str)
    pred_ids = preds["image"].astype(str)
    counts = pred_ids.value_counts()
    face_set = set(face_ids)
    missing = [i for i in face_ids if i not in counts.index]
    duplicated = [i for i in counts.index[counts > 1] if i in face_set]
    extra = sorted(set(counts.index) - face_set)
    problems = []
    if missing:
        problems.append(f"{len(missing)} face(s) without a prediction: {_few(missing)}")
    if duplicated:
        problems.append(f"{len(duplicated)} face(s) with more than one prediction: {_few(duplicated)}")
    if extra:
        problems.append(f"{len(extra)} prediction(s) for images not in the split: {_few(extra)}")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
    joined = faces.copy()
    for column in ("prediction", *INTERVAL_COLUMNS):
        if column in preds.columns:
            lookup = pd.Series(preds[column].to_numpy(dtype=float), index=pred_ids.to_numpy())
            joined[column] = lookup.loc[face_ids.to_numpy()].to_numpy()
    return joined
