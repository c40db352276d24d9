"""Attribute vocabularies and the face-table schema, in one place.

The face table is a pandas DataFrame with one row per face and these columns:

``image``       str, the face's identifier within its dataset (APPA-REAL: the
                ``file_name`` of the CSV, e.g. ``000123.jpg``; npy layout: the row
                index within its split as a string ``"0".."N-1"``; UTKFace and CSV:
                the path relative to the dataset folder). Prediction files join on it.
``age``         float, years: the training target.
``gender``      one of GENDERS or UNKNOWN.
``ethnicity``   one of ETHNICITIES or UNKNOWN (or an extra category a loader was told to keep).
``expression``  one of EXPRESSIONS or UNKNOWN.
``split``       one of SPLITS.
``path``        str, absolute path of the file holding the pixels (an image file,
                or for the npy layout the ``data_{split}.npy`` array).
``frame``       int, row index into ``path`` for array layouts, -1 for image files.
optional:       ``real_age`` (float years), ``age_std`` (float years).

Rows are in dataset order (the order of the source CSV / array) within each split.
"""

from __future__ import annotations

import itertools
import math

UNKNOWN = "unknown"

GENDERS: tuple[str, ...] = ("male", "female")
ETHNICITIES: tuple[str, ...] = ("asian", "afroamerican", "caucasian")
EXPRESSIONS: tuple[str, ...] = ("neutral", "slightlyhappy", "happy", "other")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

#: attribute name -> allowed values (UNKNOWN is always allowed in addition)
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "gender": GENDERS,
    "ethnicity": ETHNICITIES,
    "expression": EXPRESSIONS,
}
ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARIES)
#: the order every table and report lists attributes in: ``"age"`` (ground-truth age groups), then ``ATTRIBUTES``
SCORED_ATTRIBUTES: tuple[str, ...] = ("age", *ATTRIBUTES)

#: inner edges of the report's age groups: [0,20), [20,40), [40,60), [60,inf)
AGE_EDGES: tuple[float, ...] = (20.0, 40.0, 60.0)

#: valid age range in years (inclusive)
AGE_MIN, AGE_MAX = 0.0, 120.0

FACE_COLUMNS: tuple[str, ...] = (
    "image",
    "age",
    "gender",
    "ethnicity",
    "expression",
    "split",
    "path",
    "frame",
)
#: numeric columns some loaders add beside the face columns; never groups
NUMERIC_COLUMNS: tuple[str, ...] = ("real_age", "apparent_age", "age_std", "num_ratings")
#: a further column is an attribute when it has at most this many distinct values
MAX_ATTRIBUTE_VALUES = 50
#: separator of an intersection's name ("age*ethnicity") and of its groups' names ("[60,inf) & asian")
INTERSECTION_SEP, CELL_SEP = "*", " & "


def attribute_columns(faces) -> list[str]:
    """The attribute columns of a face table: ``ATTRIBUTES``, then any further categorical column.

    A further column (a csv layout's ``skin_tone``, APPA-REAL's ``makeup`` and ``time``) counts when
    it is not a face column or a known numeric column and holds at most ``MAX_ATTRIBUTE_VALUES``
    distinct values; table order is kept.

    >>> import pandas as pd
    >>> attribute_columns(pd.DataFrame(columns=[*FACE_COLUMNS, "age_std", "skin_tone"]))
    ['gender', 'ethnicity', 'expression', 'skin_tone']
    """
    extra = [
        c
        for c in faces.columns
        if c not in FACE_COLUMNS and c not in NUMERIC_COLUMNS and faces[c].nunique(dropna=True) <= MAX_ATTRIBUTE_VALUES
    ]
    return [a for a in ATTRIBUTES if a in faces.columns] + [str(c) for c in extra]


def intersection_name(attributes) -> str:
    """The name of an intersection of attributes: ``["age", "ethnicity"]`` -> ``"age*ethnicity"``."""
    return INTERSECTION_SEP.join(str(a) for a in attributes)


def _fmt_edge(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def age_bin_labels(edges: tuple[float, ...] | list[float] = AGE_EDGES) -> list[str]:
    """Labels of the age bins given inner ``edges``: ``[0,20)``, ..., ``[60,inf)``.

    The first bin starts at 0 and the last ends at inf. These strings are the group
    names used everywhere (metrics JSON, weighting group names, report tables).

    >>> age_bin_labels((30,))
    ['[0,30)', '[30,inf)']
    """
    bounds = [0.0, *[float(e) for e in edges], math.inf]
    return [f"[{_fmt_edge(lo)},{_fmt_edge(hi)})" for lo, hi in itertools.pairwise(bounds)]


def age_bins(ages, edges: tuple[float, ...] | list[float] = AGE_EDGES):
    """Map ages (years, array-like) to their bin labels (numpy array of str).

    A face of age exactly 20 falls in ``[20,40)``: bins are closed on the left.

    >>> age_bins([19.9, 20, 75]).tolist()
    ['[0,20)', '[20,40)', '[60,inf)']
    """
    import numpy as np

    ages = np.asarray(ages, dtype=float)
    labels = np.asarray(age_bin_labels(edges), dtype=object)
    idx = np.searchsorted(np.asarray(edges, dtype=float), ages, side="right")
    return labels[idx]


def group_order(attribute: str, values) -> list[str]:
    """The output order of an attribute's groups: its vocabulary (all of it), then other values sorted.

    ``values`` are the values present (``unknown`` is left out). Custom attributes have
    no vocabulary, so their values come sorted.

    >>> group_order("ethnicity", ["indian", "caucasian", "unknown"])
    ['asian', 'afroamerican', 'caucasian', 'indian']
    >>> group_order("makeup", ["yes", "no"])
    ['no', 'yes']
    """
    vocabulary = list(VOCABULARIES.get(attribute, ()))
    extras = sorted({str(v) for v in values} - set(vocabulary) - {UNKNOWN})
    return vocabulary + extras
