"""The APPA-REAL competition submission: ``predictions.zip`` holding ``predictions.csv``.

``predictions.csv`` has one predicted age (years) per line, in the order of the test
split, and no header. Predictions are matched to the test faces by ``image`` first, so a
predictions file in another row order still yields the right order; anything that
cannot be matched one-to-one (missing, duplicated or extra faces) is refused.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..errors import DataError
from .predictions import PREDICTION_RANGE, join_predictions

#: name of the CSV inside the zip
SUBMISSION_MEMBER = "predictions.csv"


def write_submission(
    out: str | os.PathLike, test_faces: pd.DataFrame, preds: pd.DataFrame, source: str | os.PathLike = "predictions"
) -> np.ndarray:
    """Atomically write the submission zip ``out`` for ``test_faces`` (test split, dataset order).

    ``preds`` is a predictions table (``image``, ``prediction``). Returns the written ages,
    shape (len(test_faces),), in test order. DataError if they cannot be matched one-to-one
    or an age is not finite and within ``PREDICTION_RANGE``.
    """
    if len(test_faces) == 0:
        raise DataError("the dataset has no test split to submit for")
    if len(preds) != len(test_faces):
        raise DataError(f"{source}: {len(preds)} predictions but the test split has {len(test_faces)} faces")
    ages = join_predictions(test_faces, preds, source)["prediction"].to_numpy(dtype=float)
    low, high = PREDICTION_RANGE
    bad = np.flatnonzero(~np.isfinite(ages) | (ages < low) | (ages > high))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{source}: prediction {ages[i]:g} for test face {test_faces['image'].iloc[i]!r} is not an age "
            f"between {low:g} and {high:g} years ({bad.size} such faces)"
        )
    text = "".join(f"{a:.6f}\n" for a in ages)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(SUBMISSION_MEMBER, text)
    return ages


def read_submission(path: str | os.PathLike) -> np.ndarray:
    """The ages (years, shape (N,)) of a submission zip, in file order."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(SUBMISSION_MEMBER).decode("utf-8")
    except (FileNotFoundError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{path}: not a submission zip with {SUBMISSION_MEMBER} ({err})") from None
    return np.loadtxt(io.StringIO(text), dtype=float, ndmin=1)
