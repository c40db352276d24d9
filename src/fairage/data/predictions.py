"""The predictions file: one predicted age per face, joined to the dataset on ``image``.

CSV with header ``image,prediction`` (``image`` is the face table's identifier, compared
as a string; ``prediction`` in years) plus, when written by fairage,
``age,gender,ethnicity,expression`` for convenience. Rows are in dataset order.
``read_predictions`` also takes the ``image,age`` file of ``fairage predict --faces``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..csvcells import safe_table, unquote
from ..errors import DataError

#: plausible predicted ages in years; ``read_predictions`` refuses values outside (or clips them)
PREDICTION_RANGE: tuple[float, float] = (0.0, 150.0)

#: columns written by ``write_predictions``
PREDICTION_COLUMNS: tuple[str, ...] = ("image", "prediction", "age", "gender", "ethnicity", "expression")


def write_predictions(path: str | os.PathLike, faces: pd.DataFrame, predictions) -> None:
    """Atomically write the predictions of one split's ``faces`` (dataset order) to ``path``.

    ``predictions`` is array-like of shape (len(faces),), years.
    """
    predictions = np.asarray(predictions, dtype=float).reshape(-1)
    if predictions.shape[0] != len(faces):
        raise ValueError(f"{len(predictions)} predictions for {len(faces)} faces")
    table = pd.DataFrame({"image": faces["image"].astype(str).to_numpy(), "prediction": predictions})
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
    if "image" in table.columns:  # ids a spreadsheet would run were written quoted (fairage.csvcells)
        table["image"] = table["image"].map(unquote)
    if list(table.columns) == ["image", "age"]:
        table = _from_face_predictions(table)
    missing = [c for c in ("image", "prediction") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(expected header image,prediction; found {', '.join(map(str, table.columns))})")
    if table["image"].isna().any():
        row = int(np.flatnonzero(table["image"].isna().to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has an empty image id")
    values = pd.to_numeric(table["prediction"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{path}: row {row + 2} (image {table['image'].iloc[row]}): prediction "
                        f"{_show(table['prediction'].iloc[row])} is missing or not a finite number"
                        + (f" ({bad.size} bad rows in all)" if bad.size > 1 else ""))
    low, high = PREDICTION_RANGE
    out = np.flatnonzero((values < low) | (values > high))
    if out.size and clip:
        values = np.clip(values, low, high)
    elif out.size:
        row = int(out[0])
        raise DataError(f"{path}: row {row + 2} (image {table['image'].iloc[row]}): prediction {values[row]:g} years "
                        f"is outside {low:g} to {high:g}" + (f" ({out.size} such rows)" if out.size > 1 else "")
                        + "; --clip clips predictions into that range")
    table["image"] = table["image"].astype(str)
    table["prediction"] = values
    return table


def _show(value) -> str:
    """repr of a table value for messages: numpy scalars shown as plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)
def _from_face_predictions(table: pd.DataFrame) -> pd.DataFrame:
    """A ``fairage predict --faces`` file (``image,age``: ages predicted from face crops) as predictions.

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


def join_predictions(faces: pd.DataFrame, preds: pd.DataFrame, source: str | os.PathLike = "predictions") -> pd.DataFrame:
    """``faces`` (one split, dataset order) with a ``prediction`` column from ``preds``.

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
    lookup = pd.Series(preds["prediction"].to_numpy(dtype=float), index=pred_ids.to_numpy())
    joined = faces.copy()
    joined["prediction"] = lookup.loc[face_ids.to_numpy()].to_numpy()
    return joined
