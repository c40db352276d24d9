"""Conformal age intervals: ``[age_lo, age_hi]`` that hold the true age with probability ``1 - alpha``.

Split conformal regression with absolute-error scores, calibrated on predictions of faces the
model did not train on (a run's validation split). The conformal step itself is
``crepes.ConformalRegressor`` (Mondrian categories through ``bins=``): crepes is a small,
maintained library whose Mondrian calibration works on precomputed residuals, which is what a
trained run has (MAPIE wraps a scikit-learn estimator and refits or predicts it itself).

Groups (``by``), so that coverage holds within each group and not only on average:

* ``by=[]`` (plain): one quantile for every face, ``prediction +/- q``.
* an attribute column (``gender``, ``ethnicity``, any column; several = their intersection,
  names joined by ``|`` as ``[20,40)|female``): one quantile per group. A face whose value is
  not known when predicting (photos have no gender label; ``unknown``; a value the calibration
  never saw) gets the widest quantile of the values it could have, so the interval covers
  whichever group it belongs to.
* ``age``: the group is the face's *true* age bin (``schema.age_bins``), which is unknown when
  predicting. The interval is label-conditional (Mondrian by the label): for each age bin
  ``b = [lo_b, hi_b)`` the ages ``y`` in ``b`` with ``|y - prediction| <= q_b`` are kept, and
  the interval is the hull of what is kept. A face of true bin ``b`` is covered whenever
  ``|age - prediction| <= q_b``, which by exchangeability within bin ``b`` happens with
  probability at least ``1 - alpha`` for every bin separately. The hull also fills the gaps
  between the pieces, which over-covers an accurate bin next to inaccurate ones; by default
  (``tighten``) the bins' quantiles are then lowered as far as the hull keeps every bin's
  guaranteed count on the calibration faces (``fit_calibration``), trading the exact
  guarantee for coverage near ``1 - alpha`` in every bin.

Groups with too few calibration faces for the level (crepes needs ``alpha (n + 1) >= 1`` for a
finite quantile, 10 faces at 90%; ``min_group`` can ask for more) use their parent's quantile: ``by`` minus its
last attribute, down to the plain quantile; ``fit_calibration`` warns naming them.

``Calibration`` is stored as ``conformal.json`` (``CONFORMAL``) in run folders and model
folders and as the ``fairage_conformal`` metadata of exported files; ``Calibration.to_json`` /
``from_json`` (``read_calibration``, ``write_calibration``) are its only reader and writer.
All ages, quantiles and widths are in years.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.schema import AGE_EDGES, age_bin_labels
from ..errors import DataError

#: file name of a stored calibration in run and model folders
CONFORMAL = "conformal.json"
#: metadata key of an exported model holding the calibration's JSON
EXPORT_KEY = "fairage_conformal"
#: the key of the plain (all faces) quantile
ALL = "all"
#: reported intervals are clipped into this range (years), as predictions are
AGE_RANGE = (0.0, 150.0)
VERSION = 1


@dataclass
class GroupQuantile:
    """One calibration group: ``n`` calibration faces, ``quantile`` (years) used for it, and
    ``fallback``: None when it is the group's own quantile, else the group whose quantile it uses."""

    n: int
    quantile: float
    fallback: str | None = None
    #: crepes' split-conformal quantile of the group's own faces (None for a fallback group); ``quantile``
    #: is lower when the label-conditional hull was tightened (``fit_calibration``)
    split_quantile: float | None = None


@dataclass
class Calibration:
    """A fitted conformal calibration (see the module docstring).

    ``groups`` maps a group name (values in ``by`` order joined by ``|``) to its
    ``GroupQuantile``; ``levels`` holds the same for every prefix of ``by`` (the parents),
    keyed by the prefix joined by ``|``; ``values[attr]`` lists each attribute's groups;
    ``plain`` is the quantile of all calibration faces.
    """

    alpha: float
    by: list[str]
    age_edges: list[float]
    n: int
    plain: float
    values: dict[str, list[str]] = field(default_factory=dict)
    levels: dict[str, dict[str, GroupQuantile]] = field(default_factory=dict)
    split: str = "valid"
    min_group: int = 0
    #: whether the age groups' quantiles were tightened for the hull (``fit_calibration``)
    tightened: bool = False

    @property
    def level(self) -> float:
        """The target coverage, ``1 - alpha``."""
        return 1.0 - self.alpha

    @property
    def groups(self) -> dict[str, GroupQuantile]:
        """The finest groups (every attribute of ``by``); ``{}`` for a plain calibration."""
        return self.levels.get("|".join(self.by), {}) if self.by else {}

    def fallbacks(self) -> dict[str, str]:
        """Groups (all levels) that use another group's quantile: ``{group: group used}``."""
        return {g: s.fallback for lv in self.levels.values() for g, s in lv.items() if s.fallback is not None}

    # ------------------------------------------------------------------ applying

    def intervals(self, predictions, faces: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(age_lo, age_hi)``, float64 arrays of shape (N,) in years, of predictions (N,) years.

        ``faces`` (N rows, optional) gives the non-age attributes of ``by`` when they are
        known (a test split); without it, or for a value ``unknown`` / never calibrated, a
        face gets the widest quantile its possible groups have. Age is never read from
        ``faces``: the age part is label-conditional (module docstring).
        """
        pred = np.asarray(predictions, dtype=float).reshape(-1)
        if faces is not None and len(faces) != pred.shape[0]:
            raise ValueError(f"{pred.shape[0]} predictions for {len(faces)} faces")
        lo_range, hi_range = AGE_RANGE
        if not self.by:
            return np.clip(pred - self.plain, lo_range, hi_range), np.clip(pred + self.plain, lo_range, hi_range)
        q_by_bin = self._face_quantiles(pred.shape[0], faces)  # {age bin or None: (N,)}
        if None in q_by_bin:
            q = q_by_bin[None]
            return np.clip(pred - q, lo_range, hi_range), np.clip(pred + q, lo_range, hi_range)
        labels = age_bin_labels(tuple(self.age_edges))
        lo, hi = _hull(pred, [q_by_bin[label] for label in labels], self.age_edges)
        return np.clip(lo, lo_range, hi_range), np.clip(hi, lo_range, hi_range)

    def plain_intervals(self, predictions) -> tuple[np.ndarray, np.ndarray]:
        """The plain intervals (one quantile for all faces) of the same calibration, years."""
        pred = np.asarray(predictions, dtype=float).reshape(-1)
        return (
            np.clip(pred - self.plain, *AGE_RANGE),
            np.clip(pred + self.plain, *AGE_RANGE),
        )

    def _face_quantiles(self, n: int, faces: pd.DataFrame | None) -> dict[str | None, np.ndarray]:
        """Per age bin (None when ``age`` is not in ``by``) the quantile of every face, (N,)."""
        groups = self.groups
        options = []  # per attribute of by: (N,) chosen value index or -1 (unknown)
        for attr in self.by:
            if attr == "age":
                options.append(None)
                continue
            values = self.values[attr]
            codes = np.full(n, -1)
            if faces is not None and attr in faces.columns:
                column = faces[attr].astype(str).to_numpy()
                for k, v in enumerate(values):
                    codes[column == v] = k
            options.append(codes)
        age_bins = self.values.get("age", [None]) if "age" in self.by else [None]
        out = {}
        for age_label in age_bins:
            q = np.zeros(n)
            # every combination of the non-age values; a face takes the max over those it could be
            others = [list(range(len(self.values[a]))) if a != "age" else [None] for a in self.by]
            for combo in itertools.product(*others):
                name = "|".join(age_label if a == "age" else self.values[a][k] for a, k in zip(self.by, combo))
                value = groups[name].quantile
                fits = np.ones(n, dtype=bool)
                for codes, k in zip(options, combo):
                    if codes is not None:
                        fits &= (codes == k) | (codes == -1)
                q = np.where(fits, np.maximum(q, value), q)
            out[age_label] = q
        return out

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        """The object of ``conformal.json``::

        {"version", "method", "alpha", "level", "by", "age_edges", "split", "n", "min_group",
         "plain": q, "values": {attr: [group]},
         "tightened", "groups": {group: {"n", "quantile", "fallback", "split_quantile"}},  # finest
         "levels": {prefix: {group: {same}}}}
        """

        def dump(level: dict[str, GroupQuantile]) -> dict:
            return {
                g: {
                    "n": s.n,
                    "quantile": s.quantile,
                    "fallback": s.fallback,
                    "split_quantile": s.split_quantile,
                }
                for g, s in level.items()
            }

        return {
            "version": VERSION,
            "method": "split conformal, absolute error (crepes ConformalRegressor"
            + (", Mondrian by " + " x ".join(self.by) if self.by else "")
            + ")",
            "alpha": self.alpha,
            "level": self.level,
            "by": list(self.by),
            "age_edges": list(self.age_edges),
            "split": self.split,
            "n": self.n,
            "min_group": self.min_group,
            "tightened": self.tightened,
            "plain": self.plain,
            "values": {a: list(v) for a, v in self.values.items()},
            "groups": dump(self.groups),
            "levels": {p: dump(lv) for p, lv in self.levels.items()},
        }

    @classmethod
    def from_json(cls, raw: dict, source: str = "calibration") -> Calibration:
        """Read ``to_json``'s object; DataError naming ``source`` and the problem when it is not one."""
        try:
            if int(raw["version"]) > VERSION:
                raise ValueError(f"version {raw['version']} is newer than this fairage reads ({VERSION})")
            cal = cls(
                alpha=float(raw["alpha"]),
                by=[str(a) for a in raw["by"]],
                age_edges=[float(e) for e in raw["age_edges"]],
                n=int(raw["n"]),
                plain=float(raw["plain"]),
                values={str(a): [str(v) for v in vs] for a, vs in raw.get("values", {}).items()},
                levels={
                    str(p): {
                        str(g): GroupQuantile(
                            int(s["n"]),
                            float(s["quantile"]),
                            s.get("fallback"),
                            None if s.get("split_quantile") is None else float(s["split_quantile"]),
                        )
                        for g, s in lv.items()
                    }
                    for p, lv in raw.get("levels", {}).items()
                },
                split=str(raw.get("split", "valid")),
                min_group=int(raw.get("min_group", 0)),
                tightened=bool(raw.get("tightened", False)),
            )
            if not 0 < cal.alpha < 1:
                raise ValueError(f"alpha {cal.alpha} is not between 0 and 1")
            missing = [a for a in cal.by if a != "age" and a not in cal.values]
            if missing or ("age" in cal.by and "age" not in cal.values):
                raise ValueError(f"no values for {missing or ['age']}")
            qs = [cal.plain] + [s.quantile for lv in cal.levels.values() for s in lv.values()]
            if not all(math.isfinite(q) and q >= 0 for q in qs):
                raise ValueError("a quantile is negative or not finite")
            others = [cal.values[a] for a in cal.by]
            for combo in itertools.product(*others):
                if cal.by and "|".join(combo) not in cal.groups:
                    raise ValueError(f"no quantile for group {'|'.join(combo)!r}")
            return cal
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{source} is not a fairage conformal calibration ({type(err).__name__}: {err})") from None


# =========================================================================== fitting


def minimum_group_size(alpha: float) -> int:
    """The fewest calibration faces that give a finite quantile at level ``1 - alpha``.

    crepes takes the ``int((1 - confidence) (n + 1))``-th largest score (confidence =
    ``1 - alpha``, in floating point), which exists from the n returned here on.

    >>> minimum_group_size(0.1), minimum_group_size(0.05), minimum_group_size(0.5)
    (10, 19, 1)
    """
    confidence = 1.0 - alpha
    n = 1
    while int((1.0 - confidence) * (n + 1)) < 1:
        n += 1
    return n


def _crepes_quantiles(residuals: np.ndarray, names: np.ndarray, alpha: float) -> dict[str, float]:
    """crepes' Mondrian quantile (years) of every group present in ``names``; inf where too small."""
    with warnings.catch_warnings():
        # crepes calls warnings.simplefilter("always", UserWarning) when imported: keep that change local
        from crepes import ConformalRegressor

    regressor = ConformalRegressor()
    regressor.fit(residuals, bins=names)
    present = np.unique(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # too-small bins: handled by the fallback
        bounds = regressor.predict_int(np.zeros(present.size), bins=present, confidence=1.0 - alpha)
    return {str(g): float(hi) for g, hi in zip(present, bounds[:, 1])}


def _labels(df: pd.DataFrame, attribute: str, age_edges: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    from .metrics import attribute_groups

    labels, order, _ = attribute_groups(df, attribute, age_edges)
    return labels, order


# size: its docstring states the tightening rule; the body is about 40 lines
def fit_calibration(
    df: pd.DataFrame,
    alpha: float = 0.1,
    by: Sequence[str] = ("age",),
    age_edges: Sequence[float] = AGE_EDGES,
    min_group: int = 0,
    split: str = "valid",
    tighten: bool = True,
) -> tuple[Calibration, list[str]]:
    """Fit a calibration on held-out predictions; return it and the fallback warnings.

    ``df`` has ``age`` and ``prediction`` (years) and the non-age columns of ``by``, one
    row per calibration face. ``alpha`` in (0, 1): intervals aim at ``1 - alpha`` coverage.
    A group with fewer than ``max(min_group, minimum_group_size(alpha))`` faces uses its
    parent's quantile; each such group is named in one warning (also sent to ``warnings``).

    ``tighten`` (with ``age`` in ``by``): the hull of the label-conditional pieces also
    covers faces in the gaps between them, so it covers more than ``1 - alpha`` of an age
    group whose neighbours have wider quantiles. Each own age-group quantile is then lowered
    (crepes' value kept as ``split_quantile``) to the smallest value at which the hull still
    covers, on the calibration faces, at least the ``ceil((n + 1)(1 - alpha))`` faces of every
    age group that crepes' quantile guarantees (and no fewer of a fallback group than before),
    but not below crepes' quantile at level ``1 - 2 alpha`` (the group's own piece keeps most of
    its faces rather than leaving its width to the neighbouring groups' pieces).
    Coverage then sits near ``1 - alpha`` in every age group instead of above it; the
    guarantee becomes approximate (four or so numbers tuned on the calibration faces).
    """
    by = list(by)
    residuals = _calibration_residuals(df, alpha, by)
    smallest = max(int(min_group), minimum_group_size(alpha))
    if len(residuals) < minimum_group_size(alpha):
        raise DataError(
            f"calibration needs at least {minimum_group_size(alpha)} faces for level {1 - alpha:g}, "
            f"got {len(residuals)}"
        )
    plain = _crepes_quantiles(residuals, np.full(len(residuals), ALL), alpha)[ALL]
    edges = [float(e) for e in age_edges]
    labels, values = {}, {}
    for attr in by:
        labels[attr], values[attr] = _labels(df, attr, edges)
        if not values[attr]:
            raise DataError(f"calibration: no face has a known {attr!r} (all unknown), so it cannot group by it")
    cal = Calibration(
        alpha=float(alpha),
        by=by,
        age_edges=edges,
        n=len(residuals),
        plain=plain,
        values=values,
        split=split,
        min_group=int(min_group),
    )
    messages = []
    parent_of = {ALL: GroupQuantile(len(residuals), plain)}  # quantiles of the previous level
    for depth in range(1, len(by) + 1):
        level, message = _fit_level(residuals, labels, values, by[:depth], alpha, smallest, parent_of)
        if message:
            messages.append(message)
        cal.levels["|".join(by[:depth])] = level
        parent_of = level
    if tighten and "age" in by:
        _tighten(
            cal,
            df["prediction"].to_numpy(dtype=float),
            df["age"].to_numpy(dtype=float),
            labels,
        )
        cal.tightened = True
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return cal, messages


def _calibration_residuals(df: pd.DataFrame, alpha: float, by: list[str]) -> np.ndarray:
    """|prediction - age| (years, (N,)) of the calibration faces; DataError for an alpha outside (0, 1),
    a group listed twice, a missing column or a non-finite age or prediction."""
    if not 0 < alpha < 1:
        raise DataError(f"conformal alpha must be between 0 and 1, got {alpha}")
    if len(set(by)) != len(by):
        raise DataError(f"conformal groups listed twice: {by}")
    for column in ("age", "prediction", *[a for a in by if a != "age"]):
        if column not in df.columns:
            raise DataError(f"calibration: column {column!r} is missing (have: {', '.join(map(str, df.columns))})")
    residuals = np.abs(df["prediction"].to_numpy(dtype=float) - df["age"].to_numpy(dtype=float))
    if not np.isfinite(residuals).all():
        raise DataError("calibration: ages and predictions must be finite numbers")
    return residuals


def _fit_level(
    residuals: np.ndarray,
    labels: dict,
    values: dict,
    attrs: list[str],
    alpha: float,
    smallest: int,
    parent_of: dict,
) -> tuple[dict, str | None]:
    """The quantiles of one level of the group hierarchy (the groups of ``attrs``, the first ``depth``
    of ``by``): each group's own, or for a group under ``smallest`` faces its parent's (``parent_of``:
    the level above); and the warning naming those groups (None when there are none)."""
    depth = len(attrs)
    known = np.ones(len(residuals), dtype=bool)
    for a in attrs:
        known &= np.array([v is not None for v in labels[a]])
    names = np.array(
        ["|".join(str(labels[a][i]) for a in attrs) for i in np.flatnonzero(known)],
        dtype=object,
    )
    own = _crepes_quantiles(residuals[known], names.astype(str), alpha) if known.any() else {}
    counts = pd.Series(names).value_counts() if known.any() else pd.Series(dtype=int)
    level = {}
    small = []
    for combo in itertools.product(*[values[a] for a in attrs]):
        name = "|".join(combo)
        n = int(counts.get(name, 0))
        parent = "|".join(combo[:-1]) if depth > 1 else ALL
        if n >= smallest and math.isfinite(own.get(name, math.inf)):
            level[name] = GroupQuantile(n, own[name], split_quantile=own[name])
        else:
            source = parent_of[parent]
            level[name] = GroupQuantile(n, source.quantile, source.fallback or parent)
            small.append(f"{name} (n={n})")
    if not small:
        return level, None
    return level, (
        f"conformal groups with fewer than {smallest} calibration faces (too few for level "
        f"{1 - alpha:g}) use their parent's quantile ({'plain' if depth == 1 else '|'.join(attrs[: depth - 1])}): "
        + ", ".join(small)
    )


def _hull(pred: np.ndarray, q_per_bin: Sequence, edges: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The label-conditional interval: for each age bin k (``edges`` inner edges), the ages of the
    bin within ``q_per_bin[k]`` (scalar or (N,)) of ``pred`` (N,); returns the hull (unclipped)."""
    bounds = [0.0, *[float(e) for e in edges], math.inf]
    lo = np.full(pred.shape, np.inf)
    hi = np.full(pred.shape, -np.inf)
    for k, q in enumerate(q_per_bin):
        a = np.maximum(bounds[k], pred - q)
        b = np.minimum(bounds[k + 1], pred + q)
        keep = a <= b
        lo = np.where(keep, np.minimum(lo, a), lo)
        hi = np.where(keep, np.maximum(hi, b), hi)
    return lo, hi


def _hull_counts(pred, age, codes, edges, q: np.ndarray) -> np.ndarray:
    """Faces of each age bin (``codes``) whose age the hull of ``q`` covers, (K,)."""
    lo, hi = _hull(pred, q, edges)
    covered = (age >= np.clip(lo, *AGE_RANGE)) & (age <= np.clip(hi, *AGE_RANGE))
    return np.bincount(codes[covered], minlength=len(q))


def _tighten(cal: Calibration, pred: np.ndarray, age: np.ndarray, labels: dict) -> None:
    """Lower the finest level's own age-group quantiles for the hull (``fit_calibration``)."""
    bins = cal.values["age"]
    others = [a for a in cal.by if a != "age"]
    groups = cal.groups
    bin_index = {b: k for k, b in enumerate(bins)}
    age_codes = np.array([-1 if v is None else bin_index[v] for v in labels["age"]])
    for combo in itertools.product(*[cal.values[a] for a in others]):
        values = dict(zip(others, combo))
        rows = age_codes >= 0
        for a in others:
            rows &= np.array([v == values[a] for v in labels[a]])
        if not rows.any():
            continue
        p, y, codes = pred[rows], age[rows], age_codes[rows]
        names = ["|".join(b if a == "age" else values[a] for a in cal.by) for b in bins]
        q = np.array([groups[n].quantile for n in names])
        counts = functools.partial(_hull_counts, p, y, codes, cal.age_edges)

        sizes = np.bincount(codes, minlength=len(bins))
        guaranteed = np.ceil((sizes + 1) * (1.0 - cal.alpha) - 1e-9).astype(int)
        need = np.minimum(counts(q), guaranteed)
        # the hull's coverage changes where a piece meets a face's age or a bin edge
        distances = np.abs(np.concatenate([y - p, *[e - p for e in cal.age_edges], [0.0]]))
        # a bin's own piece keeps covering at least 1 - 2 alpha of its faces, so that its width is
        # never handed over entirely to the neighbours' pieces bridging across it
        floors = np.zeros(len(bins))
        if 2 * cal.alpha < 1:
            floor = _crepes_quantiles(np.abs(y - p), codes.astype(str), 2 * cal.alpha)
            floors = np.array([floor.get(str(k), 0.0) for k in range(len(bins))])
            floors[~np.isfinite(floors)] = 0.0
        for _ in range(3):
            changed = False
            for k, name in enumerate(names):
                if groups[name].fallback is not None:
                    continue
                keep = (distances < q[k]) & (distances >= floors[k])
                candidates = np.unique(np.append(distances[keep], q[k]))
                low, high = (
                    0,
                    len(candidates) - 1,
                )  # candidates[high] = q[k] is feasible
                while low < high:
                    mid = (low + high) // 2
                    trial = q.copy()
                    trial[k] = candidates[mid]
                    if np.all(counts(trial) >= need):
                        high = mid
                    else:
                        low = mid + 1
                if candidates[high] < q[k]:
                    q[k] = candidates[high]
                    changed = True
            if not changed:
                break
        for k, name in enumerate(names):
            groups[name].quantile = float(q[k])


# =========================================================================== files


def write_calibration(path: str | os.PathLike, cal: Calibration) -> Path:
    """Write ``cal`` as JSON to ``path`` (atomically); return the path."""
    from ..atomic import write_text

    path = Path(path)
    write_text(path, json.dumps(cal.to_json(), indent=2) + "\n")
    return path


def read_calibration(path: str | os.PathLike) -> Calibration | None:
    """The calibration stored at ``path``; None when there is no such file; DataError naming it when damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return Calibration.from_json(raw, source=str(path))


def calibration_from_text(text: str | None, source: str) -> Calibration | None:
    """A calibration from JSON text (an exported model's metadata); None for empty text."""
    if not text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{source} does not hold a JSON object")
    return Calibration.from_json(raw, source=source)


def interval_arguments(calibration: Calibration | None, df: pd.DataFrame) -> dict:
    """The ``intervals`` and ``target`` arguments of ``fairage.fairness.metrics.evaluate`` for ``df``
    (``prediction`` and the attribute columns): the calibration's intervals as ``conformal``
    and, for a Mondrian calibration, the plain ones beside them as ``plain``. ``{}`` without one."""
    if calibration is None:
        return {}
    pred = df["prediction"].to_numpy(dtype=float)
    intervals = {"conformal": calibration.intervals(pred, df)}
    if calibration.by:
        intervals["plain"] = calibration.plain_intervals(pred)
    return {"intervals": intervals, "target": calibration.level}
