"""Accuracy and fairness metrics: MAE, MAE by group, bias scores, bootstrap intervals.

Pure numpy/pandas + fairlearn (no torch), so evaluation runs anywhere.

Definitions:

* MAE in years: ``mean(|prediction - age|)``.
* Groups of an attribute: ``"age"`` groups faces by their *ground-truth* age into the bins
  of ``schema.age_bin_labels(age_edges)`` (closed on the left); any other attribute is a
  column of the table. Faces whose value is ``"unknown"`` are left out of that attribute only.
* Bias score of an attribute: mean over all unordered pairs of non-empty groups of
  ``|MAE_i - MAE_j|``; ``None`` when fewer than two groups are non-empty.
* Group order: age bins in order; vocabulary order for gender/ethnicity/expression
  (``schema.VOCABULARIES``) followed by any extra categories sorted; sorted for custom attributes
  (``schema.group_order``).
* Bootstrap: ``n_boot`` resamples of the faces with replacement, drawn as one
  ``(n_boot, N)`` index matrix ``np.random.default_rng(seed).integers(0, N, (n_boot, N))``;
  the percentile interval at ``level``. A group that is empty in a resample is left out of
  that resample's bias (the bias is computed over the groups non-empty in it); resamples
  where a statistic is undefined (fewer than two non-empty groups, an empty group) are left
  out of its percentiles. Everything is vectorised: per-face resample counts times a
  one-hot group matrix give every group's error sum and size for all resamples at once.
* Permutation test of a bias score (``n_perm > 0``): H0 is that the attribute's groups share
  one distribution of absolute error (group labels exchangeable among the faces with a known
  group). Permutation k is ``rng.permutation(codes)`` for k = 0..n_perm-1, drawn in that order
  from ``rng = np.random.default_rng([seed, zlib.crc32(attribute.encode())])``, where ``codes``
  are the known faces' group indices in table order; the p-value is
  ``(1 + #{permuted bias >= observed bias}) / (1 + n_perm)`` (never 0, so it stays valid).
  A bias interval says how large the gap is; the p-value says whether it is there at all,
  which the interval cannot when the bias is near 0 (a bias is never negative).
* Intersections: ``"age*ethnicity"`` (``schema.intersection_name``) is an attribute whose groups
  are the cells ``"[60,inf) & asian"`` (``schema.CELL_SEP``) of its parts; a face unknown in any
  part is left out. Its bias, p-value and intervals are computed like any attribute's.
* Small groups: groups with fewer than ``min_group`` faces are scored but flagged
  (``small_groups``); worst-group MAE and the std of group MAEs use the other groups only
  (``None`` when none is left), so one face cannot decide them.
* The field's metrics: CS@k, the share of faces with ``|prediction - age| <= k`` years (a
  fraction in [0, 1]); the ChaLearn LAP epsilon-error ``mean(1 - exp(-(prediction - age)^2 /
  (2 age_std^2)))`` over the faces with a raters' std ``age_std > 0`` (None without that column);
  worst-group MAE and the population std (ddof 0) of the group MAEs, per attribute; MAE by the
  age bins of ``bin_edges`` (default ``CHILD_AGE_EDGES``: a children's bin ``[0,13)`` first).
  Each has a percentile interval from the same resamples as the MAE.
* Intervals (``age_lo``, ``age_hi``, years; the conformal intervals of ``fairage.fairness.conformal``):
  coverage is the share of faces with ``age_lo <= age <= age_hi``, width the mean of
  ``age_hi - age_lo`` (years), overall and per group; the coverage gap of an attribute is its
  bias score computed on coverage instead of MAE (mean over pairs of groups of
  ``|coverage_i - coverage_j|``, a fraction), with the same bootstrap resamples and
  permutation test.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.schema import (
    AGE_EDGES,
    CELL_SEP,
    INTERSECTION_SEP,
    SCORED_ATTRIBUTES,
    UNKNOWN,
    VOCABULARIES,
    age_bin_labels,
    age_bins,
    group_order,
    intersection_name,
)
from ..errors import DataError

#: the four bias scores reported by default
DEFAULT_ATTRIBUTES: tuple[str, ...] = SCORED_ATTRIBUTES
#: inner edges of the "MAE by age" table: children [0,13) first, then the report's groups
CHILD_AGE_EDGES: tuple[float, ...] = (13.0, 20.0, 40.0, 60.0)
#: groups with fewer faces are flagged (and left out of worst-group MAE and group-MAE std)
MIN_GROUP = 20


def mae(y_true, y_pred) -> float:
    """Mean absolute error in years of two equally long 1-D arrays of ages.

    >>> mae([10, 20, 30], [12, 20, 26])
    2.0
    """
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("mae of zero faces is undefined")
    return float(np.mean(np.abs(y_pred - y_true)))


def _check_table(df: pd.DataFrame, attributes: Sequence[str]) -> None:
    parts = [p for a in attributes for p in a.split(INTERSECTION_SEP)]
    for column in ("age", "prediction", *dict.fromkeys(p for p in parts if p != "age")):
        if column not in df.columns:
            raise DataError(f"column {column!r} is missing (have: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise DataError("no faces to evaluate")
    for column in ("age", "prediction"):
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise DataError(
                f"column {column!r} has {bad.size} missing or non-numeric value(s), first at row {int(bad[0])}"
            )


def attribute_groups(
    df: pd.DataFrame, attribute: str, age_edges: Sequence[float] = AGE_EDGES
) -> tuple[np.ndarray, list[str], list[str]]:
    """Group of every face for ``attribute``, the groups in output order, and the expected groups.

    Returns ``(labels, order, vocabulary)``: ``labels`` an object array of shape (N,)
    with ``None`` for faces left out (``unknown``), ``order`` the groups in output order
    (``schema.group_order``: vocabulary groups first, even when empty, then extra
    categories sorted) and ``vocabulary`` the expected groups (empty list for a custom attribute).
    An intersection ``"a*b"`` has the cells of its parts in product order (first part slowest)
    and no vocabulary (empty cells are not listed as skipped).
    """
    if INTERSECTION_SEP in attribute:
        parts = [attribute_groups(df, a, age_edges) for a in attribute.split(INTERSECTION_SEP)]
        labels = np.array(
            [None if any(v is None for v in cell) else CELL_SEP.join(cell) for cell in zip(*(p[0] for p in parts))],
            dtype=object,
        )
        order = [CELL_SEP.join(cell) for cell in itertools.product(*(p[1] for p in parts))]
        return labels, order, []
    if attribute == "age":
        vocabulary = age_bin_labels(tuple(age_edges))
        labels = age_bins(df["age"].to_numpy(dtype=float), tuple(age_edges)).astype(object)
        return labels, list(vocabulary), list(vocabulary)
    if attribute not in df.columns:
        raise DataError(f"attribute column {attribute!r} is missing (have: {', '.join(map(str, df.columns))})")
    column = df[attribute]
    labels = np.array([None if pd.isna(v) else str(v) for v in column], dtype=object)
    labels[labels == UNKNOWN] = None
    order = group_order(attribute, [v for v in labels if v is not None])
    return labels, order, list(VOCABULARIES.get(attribute, ()))


def group_mae(df: pd.DataFrame, attribute: str, age_edges: Sequence[float] = AGE_EDGES) -> pd.DataFrame:
    """MAE per group of ``attribute`` computed with fairlearn's MetricFrame.

    Returns a DataFrame with columns ``group`` (str), ``n`` (int faces) and ``mae``
    (float years) with one row per group in output order; vocabulary groups with no
    faces are kept with ``n = 0`` and ``mae = NaN``. ``unknown`` faces are left out.
    """
    from fairlearn.metrics import MetricFrame, count
    from sklearn.metrics import mean_absolute_error

    _check_table(df, [attribute])
    labels, order, _ = attribute_groups(df, attribute, age_edges)
    known = np.array([v is not None for v in labels], dtype=bool)
    rows = {g: (0, float("nan")) for g in order}
    if known.any():
        frame = MetricFrame(
            metrics={"n": count, "mae": mean_absolute_error},
            y_true=df["age"].to_numpy(dtype=float)[known],
            y_pred=df["prediction"].to_numpy(dtype=float)[known],
            sensitive_features=pd.Series(labels[known].astype(str), name=attribute),
        )
        for group, row in frame.by_group.iterrows():
            rows[str(group)] = (int(row["n"]), float(row["mae"]))
    return pd.DataFrame(
        {
            "group": list(rows),
            "n": [n for n, _ in rows.values()],
            "mae": [m for _, m in rows.values()],
        }
    )


def bias_score(group_maes) -> float | None:
    """Mean over all unordered pairs of non-empty groups of ``|MAE_i - MAE_j|`` (years).

    ``group_maes`` is a sequence of group MAEs (NaN/None = empty group, skipped) or the
    DataFrame of ``group_mae`` (rows with ``n == 0`` skipped). Returns ``None`` when fewer
    than two groups are non-empty.

    >>> bias_score([2.0, 4.0, 8.0])  # pairs: 2, 6, 4
    4.0
    >>> bias_score([3.0, None]) is None
    True
    """
    if isinstance(group_maes, pd.DataFrame):
        values = group_maes.loc[group_maes["n"] > 0, "mae"].to_numpy(dtype=float)
    else:
        values = np.array([np.nan if v is None else v for v in group_maes], dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return None
    diffs = np.abs(values[:, None] - values[None, :])[np.triu_indices(values.size, k=1)]
    return float(diffs.mean())


# --------------------------------------------------------------------------- vectorised bootstrap


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each face is drawn in each resample: int array of shape (n_boot, n).

    The resamples are ``np.random.default_rng(seed).integers(0, n, size=(n_boot, n))``
    (row b holds the face indices of resample b).
    """
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot, dtype=np.int64) * n)[:, None]
    return np.bincount((index + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n)


@dataclass
class _Grouping:
    attribute: str
    order: list[str]  # non-empty groups (in the full sample), output order
    skipped: list[str]  # vocabulary groups with no faces
    onehot: np.ndarray  # (N, K) float, zero rows for faces left out


def _grouping(df: pd.DataFrame, attribute: str, age_edges: Sequence[float]) -> _Grouping:
    labels, order, vocabulary = attribute_groups(df, attribute, age_edges)
    present = [g for g in order if np.any(labels == g)]
    skipped = [g for g in vocabulary if g not in present]
    onehot = np.zeros((len(df), len(present)), dtype=float)
    for k, g in enumerate(present):
        onehot[labels == g, k] = 1.0
    return _Grouping(attribute, present, skipped, onehot)


def _pairwise_bias(group_mae_matrix: np.ndarray) -> np.ndarray:
    """Bias score per row of a (B, K) matrix of group MAEs (NaN = empty group); NaN if < 2 groups."""
    b, k = group_mae_matrix.shape
    if k < 2:
        return np.full(b, np.nan)
    i, j = np.triu_indices(k, k=1)
    diffs = np.abs(group_mae_matrix[:, i] - group_mae_matrix[:, j])  # (B, pairs), NaN where a group is empty
    valid = np.isfinite(diffs)
    n_valid = valid.sum(axis=1)
    total = np.where(valid, diffs, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, total / np.maximum(n_valid, 1), np.nan)


def _statistics(
    errors: np.ndarray, counts: np.ndarray, groupings: list[_Grouping], extra: np.ndarray | None = None
) -> dict:
    """MAE, group MAEs and biases for every row of ``counts`` (B, N) in one matrix product.

    ``errors`` (N,) absolute errors in years; ``extra`` (N, E) further per-face columns whose
    resample means are wanted (NaN = face left out of that column's mean). Returns
    ``{"mae": (B,), "extra": (B, E), attr: {"group_mae": (B, K), "bias": (B,)}}``.
    """
    extra = np.zeros((len(errors), 0)) if extra is None else np.asarray(extra, dtype=float)
    valid = np.isfinite(extra)
    blocks = [errors[:, None], np.where(valid, extra, 0.0), valid.astype(float)]
    for g in groupings:
        blocks += [g.onehot * errors[:, None], g.onehot]
    design = np.concatenate(blocks, axis=1)  # (N, 1 + 2 E + 2 * sum K)
    sums = counts.astype(float) @ design  # (B, 1 + 2 E + 2 * sum K)
    e = extra.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict = {
            "mae": sums[:, 0] / counts.sum(axis=1),
            "extra": np.where(sums[:, 1 + e : 1 + 2 * e] > 0, sums[:, 1 : 1 + e] / sums[:, 1 + e : 1 + 2 * e], np.nan),
        }
    col = 1 + 2 * e
    for g in groupings:
        k = len(g.order)
        err_sum, size = sums[:, col : col + k], sums[:, col + k : col + 2 * k]
        col += 2 * k
        with np.errstate(invalid="ignore", divide="ignore"):
            gm = np.where(size > 0, err_sum / np.where(size > 0, size, 1), np.nan)
        out[g.attribute] = {"group_mae": gm, "bias": _pairwise_bias(gm)}
    return out


def _worst_and_std(group_mae_matrix: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (B, K) matrix: the largest group MAE and the std (ddof 0) over columns ``keep``."""
    m = group_mae_matrix[:, keep]
    if m.shape[1] == 0:
        nan = np.full(len(m), np.nan)
        return nan, nan
    finite = np.isfinite(m)
    n = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        worst = np.where(n > 0, np.where(finite, m, -np.inf).max(axis=1), np.nan)
        mean = np.where(finite, m, 0.0).sum(axis=1) / n
        var = np.where(finite, (m - mean[:, None]) ** 2, 0.0).sum(axis=1) / n
    return worst, np.where(n > 0, np.sqrt(var), np.nan)


def permutation_pvalues(
    errors: np.ndarray, groupings: list[_Grouping], n_perm: int, seed: int
) -> dict[str, float | None]:
    """Permutation p-value of each attribute's bias score (module docstring); None below two groups.

    ``errors`` (N,) absolute errors in years. The observed and the permuted biases are
    computed by the same arithmetic, so a permutation that leaves the groups' contents
    unchanged ties with the observed bias instead of missing it by rounding.
    """
    out: dict[str, float | None] = {}
    for g in groupings:
        if len(g.order) < 2 or n_perm <= 0:
            out[g.attribute] = None
            continue
        known = g.onehot.sum(axis=1) > 0
        codes = g.onehot[known].argmax(axis=1)
        e = errors[known]
        k = len(g.order)
        sizes = np.bincount(codes, minlength=k).astype(float)
        rng = np.random.default_rng([seed, zlib.crc32(g.attribute.encode())])
        observed = _pairwise_bias((np.bincount(codes, weights=e, minlength=k) / sizes)[None])[0]
        at_least = 0
        for start in range(0, n_perm, 256):  # blocks of (256, n) labels bound the memory
            rows = np.stack([rng.permutation(codes) for _ in range(min(256, n_perm - start))])
            flat = (rows + (np.arange(len(rows)) * k)[:, None]).ravel()
            sums = np.bincount(flat, weights=np.tile(e, len(rows)), minlength=len(rows) * k).reshape(-1, k)
            bias = _pairwise_bias(sums / sizes)
            at_least += int(np.sum(bias >= observed - 1e-9 * max(1.0, observed)))
        out[g.attribute] = (1 + at_least) / (1 + n_perm)
    return out


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    """Percentile interval of the finite values (None if there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _check_edges(age_edges: Sequence[float]) -> list[float]:
    edges = [float(e) for e in age_edges]
    if any(e <= 0 for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
        raise DataError(f"age edges must be positive and increasing, got {list(age_edges)}")
    return edges


def _prepare(
    df: pd.DataFrame,
    attributes: Sequence[str] | None,
    age_edges: Sequence[float],
    intersections: Sequence[Sequence[str]] = (),
):
    attributes = list(DEFAULT_ATTRIBUTES if attributes is None else attributes)
    attributes += [intersection_name(parts) for parts in intersections]
    if len(set(attributes)) != len(attributes):
        raise DataError(f"attributes listed twice: {attributes}")
    for name in attributes:
        if INTERSECTION_SEP in name and len(set(name.split(INTERSECTION_SEP))) < 2:
            raise DataError(f"intersection {name!r} needs at least two different attributes")
    _check_table(df, attributes)
    edges = _check_edges(age_edges)
    groupings = [_grouping(df, a, edges) for a in attributes]
    errors = np.abs(df["prediction"].to_numpy(dtype=float) - df["age"].to_numpy(dtype=float))
    return attributes, groupings, errors


def epsilon_errors(prediction, age, age_std) -> np.ndarray:
    """Per-face ChaLearn LAP epsilon-error ``1 - exp(-(prediction - age)^2 / (2 age_std^2))`` (N,).

    ``age`` is the raters' mean and ``age_std`` their std (years); NaN where ``age_std`` is
    missing or not positive (no raters' spread to judge against).

    >>> round(float(epsilon_errors([12.0], [10.0], [2.0])[0]), 4)  # 1 - exp(-1/2)
    0.3935
    """
    pred, mu, sigma = (np.asarray(x, dtype=float) for x in (prediction, age, age_std))
    ok = np.isfinite(sigma) & (sigma > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, 1.0 - np.exp(-((pred - mu) ** 2) / (2.0 * np.where(ok, sigma, 1.0) ** 2)), np.nan)


@dataclass
class GroupScore:
    """One group of an attribute: its number of faces and MAE (years), with an interval."""

    n: int
    mae: float
    ci: list[float] | None = None


@dataclass
class Statistic:
    """One number with its bootstrap percentile interval ``[lo, hi]`` (None without a bootstrap)."""

    value: float
    ci: list[float] | None = None

    def to_json(self) -> dict:
        return {"value": self.value, "ci": self.ci}

    @classmethod
    def from_json(cls, raw: dict | None) -> Statistic | None:
        return None if raw is None else cls(float(raw["value"]), raw.get("ci"))


@dataclass
class WorstGroup:
    """The group of an attribute with the largest MAE (years), among groups of at least ``min_group`` faces."""

    group: str
    mae: float
    ci: list[float] | None = None

    def to_json(self) -> dict:
        return {"group": self.group, "mae": self.mae, "ci": self.ci}


@dataclass
class GroupCoverage:
    """One group's interval coverage (fraction of faces) and mean width (years), with intervals."""

    n: int
    coverage: float
    width: float
    coverage_ci: list[float] | None = None
    width_ci: list[float] | None = None

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "coverage": self.coverage,
            "coverage_ci": self.coverage_ci,
            "width": self.width,
            "width_ci": self.width_ci,
        }

    @classmethod
    def from_json(cls, raw: dict) -> GroupCoverage:
        return cls(
            int(raw["n"]), float(raw["coverage"]), float(raw["width"]), raw.get("coverage_ci"), raw.get("width_ci")
        )


@dataclass
class CoverageScore:
    """Coverage and width of one set of intervals: overall (``total``), per group of each
    attribute (``groups``) and each attribute's coverage ``gap`` (bias score on coverage) with
    its interval ``gap_ci`` and permutation p-value ``gap_p`` (None below two groups)."""

    total: GroupCoverage
    groups: dict[str, dict[str, GroupCoverage]]
    gap: dict[str, float | None]
    gap_ci: dict[str, list[float] | None]
    gap_p: dict[str, float | None]

    def worst(self, attribute: str) -> tuple[str, GroupCoverage] | None:
        """The group of ``attribute`` with the lowest coverage (None without groups)."""
        groups = self.groups.get(attribute) or {}
        return min(groups.items(), key=lambda kv: kv[1].coverage) if groups else None

    def to_json(self) -> dict:
        return {
            **self.total.to_json(),
            "groups": {a: {g: s.to_json() for g, s in gs.items()} for a, gs in self.groups.items()},
            "gap": dict(self.gap),
            "gap_ci": dict(self.gap_ci),
            "gap_p": dict(self.gap_p),
        }

    @classmethod
    def from_json(cls, raw: dict) -> CoverageScore:
        gap = {a: (None if v is None else float(v)) for a, v in raw["gap"].items()}
        return cls(
            GroupCoverage.from_json(raw),
            {a: {g: GroupCoverage.from_json(v) for g, v in gs.items()} for a, gs in raw["groups"].items()},
            gap,
            {a: (raw.get("gap_ci") or {}).get(a) for a in gap},
            {a: (None if (raw.get("gap_p") or {}).get(a) is None else float(raw["gap_p"][a])) for a in gap},
        )


@dataclass
class EvaluationResult:
    """MAE and bias scores of one prediction set (years), with bootstrap intervals.

    ``bias[attr]`` is None when fewer than two groups of ``attr`` have faces;
    ``groups[attr]`` holds the non-empty groups in output order and ``skipped_groups[attr]``
    the vocabulary groups without faces. Intervals are ``[lo, hi]`` or None (no bootstrap).
    Attributes include the intersections (``intersections`` lists their names). The field's
    metrics (module docstring): ``cs`` {k as str: fraction}, ``epsilon_error`` (None without
    raters' std), ``worst_group`` / ``group_mae_std`` per attribute (None when no group has
    ``min_group`` faces), ``age_bins`` (MAE by the bins of ``age_bin_edges``) and
    ``small_groups`` per attribute (groups under ``min_group`` faces, flagged).
    """

    n: int
    mae: float
    mae_ci: list[float] | None
    bias: dict[str, float | None]
    bias_ci: dict[str, list[float] | None]
    groups: dict[str, dict[str, GroupScore]]
    skipped_groups: dict[str, list[str]]
    level: float
    n_boot: int
    #: permutation p-value of each bias (None: fewer than two groups, or no permutations)
    bias_p: dict[str, float | None] = field(default_factory=dict)
    n_perm: int = 0
    intersections: list[str] = field(default_factory=list)
    min_group: int = MIN_GROUP
    small_groups: dict[str, list[str]] = field(default_factory=dict)
    worst_group: dict[str, WorstGroup | None] = field(default_factory=dict)
    group_mae_std: dict[str, Statistic | None] = field(default_factory=dict)
    cs: dict[str, Statistic] = field(default_factory=dict)
    epsilon_error: Statistic | None = None
    age_bin_edges: list[float] = field(default_factory=list)
    age_bins: dict[str, GroupScore] = field(default_factory=dict)
    #: interval sets (``conformal``, and ``plain`` beside a Mondrian one) -> their coverage; {} without intervals
    coverage: dict[str, CoverageScore] = field(default_factory=dict)
    #: the coverage the intervals aim at (1 - alpha), None when not known
    coverage_target: float | None = None

    def to_json(self) -> dict:
        """The JSON-ready object of ``fairage evaluate --json`` and ``metrics_test.json``::

            {"n", "mae", "mae_ci", "bias": {attr: float|None}, "bias_ci": {attr: [lo, hi]|None},
             "groups": {attr: {group: {"n", "mae"}}}, "skipped_groups": {attr: [group, ...]},
             "groups_ci": {attr: {group: [lo, hi]|None}}, "level", "n_boot",
             "bias_p": {attr: float|None}, "n_perm", "intersections": [attr, ...], "min_group",
             "small_groups": {attr: [group, ...]}, "worst_group": {attr: {"group", "mae", "ci"}|None},
             "group_mae_std": {attr: {"value", "ci"}|None}, "cs": {k: {"value", "ci"}},
             "epsilon_error": {"value", "ci"}|None,
             "age_bins": {"edges": [...], "groups": {bin: {"n", "mae", "ci"}}}}

        plus, when the predictions carry intervals, ``"coverage": {name: {"n", "coverage",
        "coverage_ci", "width", "width_ci", "groups": {attr: {group: {same five}}}, "gap": {attr},
        "gap_ci": {attr}, "gap_p": {attr}}}`` and ``"coverage_target"``.
        """
        out = {
            "n": self.n,
            "mae": self.mae,
            "mae_ci": self.mae_ci,
            "bias": dict(self.bias),
            "bias_ci": dict(self.bias_ci),
            "groups": {a: {g: {"n": s.n, "mae": s.mae} for g, s in gs.items()} for a, gs in self.groups.items()},
            "skipped_groups": {a: list(v) for a, v in self.skipped_groups.items()},
            "groups_ci": {a: {g: s.ci for g, s in gs.items()} for a, gs in self.groups.items()},
            "level": self.level,
            "n_boot": self.n_boot,
            "bias_p": {a: self.bias_p.get(a) for a in self.bias},
            "n_perm": self.n_perm,
            "intersections": list(self.intersections),
            "min_group": self.min_group,
            "small_groups": {a: list(v) for a, v in self.small_groups.items()},
            "worst_group": {a: (w.to_json() if w else None) for a, w in self.worst_group.items()},
            "group_mae_std": {a: (v.to_json() if v else None) for a, v in self.group_mae_std.items()},
            "cs": {k: v.to_json() for k, v in self.cs.items()},
            "epsilon_error": self.epsilon_error.to_json() if self.epsilon_error else None,
            "age_bins": {
                "edges": list(self.age_bin_edges),
                "groups": {g: {"n": v.n, "mae": v.mae, "ci": v.ci} for g, v in self.age_bins.items()},
            },
        }
        if self.coverage:
            out["coverage"] = {name: c.to_json() for name, c in self.coverage.items()}
            out["coverage_target"] = self.coverage_target
        return out

    @classmethod
    def from_json(cls, raw: dict, source: str = "metrics") -> EvaluationResult:
        """Read the object ``to_json`` writes; DataError naming ``source`` and the key when one is missing.

        Files written before the field's metrics existed read with those fields empty."""
        try:
            groups_ci = raw.get("groups_ci") or {}
            bins = raw.get("age_bins") or {}
            return cls(
                n=int(raw["n"]),
                mae=float(raw["mae"]),
                mae_ci=raw.get("mae_ci"),
                bias={a: (None if v is None else float(v)) for a, v in raw["bias"].items()},
                bias_ci={a: raw.get("bias_ci", {}).get(a) for a in raw["bias"]},
                groups={
                    a: {
                        g: GroupScore(int(v["n"]), float(v["mae"]), (groups_ci.get(a) or {}).get(g))
                        for g, v in gs.items()
                    }
                    for a, gs in raw.get("groups", {}).items()
                },
                skipped_groups={a: list(v) for a, v in raw.get("skipped_groups", {}).items()},
                level=float(raw.get("level", 0.95)),
                n_boot=int(raw.get("n_boot", 0)),
                bias_p={a: (None if v is None else float(v)) for a, v in (raw.get("bias_p") or {}).items()},
                n_perm=int(raw.get("n_perm", 0)),
                intersections=[str(a) for a in raw.get("intersections", [])],
                min_group=int(raw.get("min_group", MIN_GROUP)),
                small_groups={a: list(v) for a, v in (raw.get("small_groups") or {}).items()},
                worst_group={
                    a: (None if w is None else WorstGroup(str(w["group"]), float(w["mae"]), w.get("ci")))
                    for a, w in (raw.get("worst_group") or {}).items()
                },
                group_mae_std={a: Statistic.from_json(v) for a, v in (raw.get("group_mae_std") or {}).items()},
                cs={str(k): Statistic.from_json(v) for k, v in (raw.get("cs") or {}).items()},
                epsilon_error=Statistic.from_json(raw.get("epsilon_error")),
                age_bin_edges=[float(e) for e in bins.get("edges", [])],
                age_bins={
                    g: GroupScore(int(v["n"]), float(v["mae"]), v.get("ci"))
                    for g, v in (bins.get("groups") or {}).items()
                },
                coverage={str(k): CoverageScore.from_json(v) for k, v in (raw.get("coverage") or {}).items()},
                coverage_target=None if raw.get("coverage_target") is None else float(raw["coverage_target"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{source} is not a fairage metrics object ({type(err).__name__}: {err})") from None


def _point_estimates(df: pd.DataFrame, groupings: list[_Grouping], age_edges: Sequence[float]):
    """MAE, group tables (``group_mae``) and bias per attribute of the full sample: the one point path."""
    tables = {g.attribute: group_mae(df, g.attribute, age_edges).set_index("group") for g in groupings}
    return mae(df["age"], df["prediction"]), tables, {a: bias_score(t) for a, t in tables.items()}


def _cs_keys(cs_k: Sequence[float]) -> list[str]:
    keys = []
    for k in cs_k:
        k = float(k)
        if not np.isfinite(k) or k < 0:
            raise DataError(f"CS@k needs k >= 0 years, got {k}")
        keys.append(f"{k:g}")
    return keys


def _check_counts(n_boot: int, n_perm: int = 0) -> None:
    """ConfigError for resample counts outside the config's bounds (``eval.n_boot``, ``eval.n_perm``)."""
    from ..config.schema import MAX_N_BOOT, MAX_N_PERM
    from ..errors import ConfigError

    if not 0 <= int(n_boot) <= MAX_N_BOOT:
        raise ConfigError(f"n_boot {n_boot}: bootstrap resamples must be 0 to {MAX_N_BOOT}")
    if not 0 <= int(n_perm) <= MAX_N_PERM:
        raise ConfigError(f"n_perm {n_perm}: label permutations must be 0 to {MAX_N_PERM}")


def _interval_indicators(df: pd.DataFrame, lo, hi, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(covered 0/1, width years) per face of one interval set; DataError for bad bounds."""
    lo = np.asarray(lo, dtype=float).reshape(-1)
    hi = np.asarray(hi, dtype=float).reshape(-1)
    if lo.shape[0] != len(df) or hi.shape[0] != len(df):
        raise DataError(f"intervals {name!r}: {lo.shape[0]} bounds for {len(df)} faces")
    bad = np.flatnonzero(~np.isfinite(lo) | ~np.isfinite(hi) | (lo > hi))
    if bad.size:
        raise DataError(
            f"intervals {name!r}: row {int(bad[0])} is not a finite interval with age_lo <= age_hi "
            f"({bad.size} such rows)"
        )
    age = df["age"].to_numpy(dtype=float)
    return ((age >= lo) & (age <= hi)).astype(float), hi - lo


# size: the resamples, permutations and groupings shared with evaluate
def interval_coverage(
    df: pd.DataFrame,
    lo,
    hi,
    groupings: list[_Grouping],
    counts: np.ndarray | None,
    level: float,
    n_perm: int,
    seed: int,
    name: str = "intervals",
) -> CoverageScore:
    """Coverage and width of one interval set (module docstring), bootstrapped over ``counts``."""
    covered, width = _interval_indicators(df, lo, hi, name)
    ones = np.ones((1, len(df)))
    point_c, point_w = _statistics(covered, ones, groupings), _statistics(width, ones, groupings)
    boot_c = _statistics(covered, counts, groupings) if counts is not None else None
    boot_w = _statistics(width, counts, groupings) if counts is not None else None

    def ci(boot, key, k=None):
        if boot is None:
            return None
        values = boot[key] if k is None else boot[key[0]][key[1]][:, k]
        return _interval(values, level)

    total = GroupCoverage(
        len(df), float(point_c["mae"][0]), float(point_w["mae"][0]), ci(boot_c, "mae"), ci(boot_w, "mae")
    )
    pvalues = permutation_pvalues(covered, groupings, n_perm, seed)
    groups, gap, gap_ci, gap_p = {}, {}, {}, {}
    for g in groupings:
        a = g.attribute
        groups[a] = {
            grp: GroupCoverage(
                int(g.onehot[:, k].sum()),
                float(point_c[a]["group_mae"][0, k]),
                float(point_w[a]["group_mae"][0, k]),
                ci(boot_c, (a, "group_mae"), k),
                ci(boot_w, (a, "group_mae"), k),
            )
            for k, grp in enumerate(g.order)
        }
        value = point_c[a]["bias"][0]
        gap[a] = None if not np.isfinite(value) else float(value)
        gap_ci[a] = _interval(boot_c[a]["bias"], level) if boot_c is not None and gap[a] is not None else None
        gap_p[a] = pvalues[a] if gap[a] is not None else None
    return CoverageScore(total, groups, gap, gap_ci, gap_p)


# size: the keyword settings of a public scoring call and their documentation
def evaluate(
    df: pd.DataFrame,
    attributes: Sequence[str] | None = None,
    age_edges: Sequence[float] = AGE_EDGES,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_perm: int = 0,
    intersections: Sequence[Sequence[str]] = (),
    min_group: int = MIN_GROUP,
    cs_k: Sequence[float] = (5,),
    age_bin_edges: Sequence[float] = CHILD_AGE_EDGES,
    intervals: dict | None = None,
    target: float | None = None,
) -> EvaluationResult:
    """MAE, bias scores, group MAEs and the field's metrics of one prediction set, with bootstrap intervals.

    ``df`` has ``age`` and ``prediction`` (years) and the attribute columns (and ``age_std``,
    the raters' std in years, for the epsilon-error). ``attributes`` defaults to
    ``("age", "gender", "ethnicity", "expression")``; ``"age"`` groups by ground-truth age
    bins with inner edges ``age_edges``. ``intersections`` lists attribute combinations
    (``[["age", "ethnicity"]]``) scored as further attributes ``"age*ethnicity"``.
    ``n_boot = 0`` skips the bootstrap (all intervals ``None``). ``n_perm > 0`` adds each
    bias's permutation p-value (``bias_p``). ``cs_k``: the k (years) of CS@k. ``age_bin_edges``:
    inner edges of the MAE-by-age table. Point estimates of group MAEs come from fairlearn's
    MetricFrame (``group_mae``), the intervals from the vectorised bootstrap.

    ``intervals`` maps a name to ``(age_lo, age_hi)`` arrays (N,) of years (e.g. the
    ``conformal`` intervals and the ``plain`` ones); without it, ``df``'s ``age_lo`` and
    ``age_hi`` columns, when present, are scored as ``conformal``. Their coverage and width
    (``coverage``) use the same resamples and permutations as the MAE; ``target`` is the
    coverage they aim at.
    """
    _check_counts(n_boot, n_perm)
    if int(min_group) < 1:
        raise DataError(f"min_group must be at least 1 face, got {min_group}")
    attributes, groupings, errors = _prepare(df, attributes, age_edges, intersections)
    bins = _grouping(df, "age", _check_edges(age_bin_edges))
    bins.attribute = "__age_bins__"  # its own key among the bootstrap's statistics, beside "age"
    cs_keys = _cs_keys(cs_k)
    eps = (
        epsilon_errors(df["prediction"], df["age"], pd.to_numeric(df["age_std"], errors="coerce"))
        if "age_std" in df.columns
        else np.full(len(df), np.nan)
    )
    extra = np.column_stack([*(errors <= float(k) for k in cs_keys), eps]).astype(float)
    point_extra = _statistics(errors, np.ones((1, len(errors))), [], extra)["extra"][0]
    counts = resample_counts(len(errors), n_boot, seed) if n_boot > 0 else None
    boot = _statistics(errors, counts, [*groupings, bins], extra) if n_boot > 0 else None
    total, tables, biases = _point_estimates(df, groupings, age_edges)
    result = EvaluationResult(
        n=len(errors),
        mae=total,
        mae_ci=_interval(boot["mae"], level) if boot else None,
        bias={},
        bias_ci={},
        groups={},
        skipped_groups={},
        level=float(level),
        n_boot=int(n_boot),
        n_perm=int(n_perm),
        intersections=[a for a in attributes if INTERSECTION_SEP in a],
        min_group=int(min_group),
        age_bin_edges=[float(e) for e in age_bin_edges],
    )
    pvalues = permutation_pvalues(errors, groupings, n_perm, seed)
    for j, k in enumerate(cs_keys):
        result.cs[k] = Statistic(float(point_extra[j]), _interval(boot["extra"][:, j], level) if boot else None)
    if np.isfinite(point_extra[-1]):
        eps_ci = _interval(boot["extra"][:, -1], level) if boot else None
        result.epsilon_error = Statistic(float(point_extra[-1]), eps_ci)
    for g in groupings:
        _score_attribute(result, g, tables[g.attribute], biases[g.attribute], pvalues, boot, level, min_group)
    bin_table = group_mae(df, "age", age_bin_edges).set_index("group")
    result.age_bins = {
        name: GroupScore(
            int(bin_table.at[name, "n"]),
            float(bin_table.at[name, "mae"]),
            _interval(boot[bins.attribute]["group_mae"][:, k], level) if boot else None,
        )
        for k, name in enumerate(bins.order)
    }
    if intervals is None and {"age_lo", "age_hi"} <= set(df.columns):
        intervals = {"conformal": (df["age_lo"].to_numpy(dtype=float), df["age_hi"].to_numpy(dtype=float))}
    for name, (lo, hi) in (intervals or {}).items():
        result.coverage[name] = interval_coverage(df, lo, hi, groupings, counts, level, n_perm, seed, name)
    result.coverage_target = None if target is None else float(target)
    return result


def _score_attribute(
    result: EvaluationResult,
    g,
    table: pd.DataFrame,
    bias,
    pvalues: dict,
    boot: dict | None,
    level: float,
    min_group: float,
) -> None:
    """Fill ``result``'s scores of the grouping ``g``: its bias, group MAEs (years), small groups, p-value,
    worst group and group-MAE spread; ``boot``: the bootstrap statistics (None: no intervals)."""
    name_ = g.attribute
    result.bias[name_] = bias
    result.bias_ci[name_] = _interval(boot[name_]["bias"], level) if boot and bias is not None else None
    result.groups[name_] = {
        name: GroupScore(
            int(table.at[name, "n"]),
            float(table.at[name, "mae"]),
            _interval(boot[name_]["group_mae"][:, k], level) if boot else None,
        )
        for k, name in enumerate(g.order)
    }
    result.skipped_groups[name_] = g.skipped
    result.bias_p[name_] = pvalues[name_] if bias is not None else None
    sizes = np.array([result.groups[name_][name].n for name in g.order])
    result.small_groups[name_] = [name for name, n in zip(g.order, sizes) if n < min_group]
    keep = sizes >= min_group
    point = np.array([[result.groups[name_][name].mae for name in g.order]])
    worst, spread = _worst_and_std(point, keep)
    if not keep.any():
        result.worst_group[name_] = result.group_mae_std[name_] = None
        return
    boot_worst, boot_spread = _worst_and_std(boot[name_]["group_mae"], keep) if boot else (None, None)
    kept = [name for name, k in zip(g.order, keep) if k]
    worst_name = max(kept, key=lambda name: result.groups[name_][name].mae)
    result.worst_group[name_] = WorstGroup(worst_name, float(worst[0]), _interval(boot_worst, level) if boot else None)
    result.group_mae_std[name_] = Statistic(float(spread[0]), _interval(boot_spread, level) if boot else None)


@dataclass
class Difference:
    """B minus A of one statistic, in years (negative: B is lower).

    ``ci`` is the paired-bootstrap percentile interval ``[lo, hi]``, or None without a bootstrap.
    """

    estimate: float
    ci: list[float] | None

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0 (False without an interval)."""
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    @property
    def verdict(self) -> str:
        """ "B lower", "B higher", "no clear difference", or "n/a" without an interval."""
        if self.ci is None:
            return "n/a"
        if not self.excludes_zero:
            return "no clear difference"
        return "B lower" if self.estimate < 0 else "B higher"

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "ci": self.ci, "excludes_zero": self.excludes_zero}


@dataclass
class ComparisonResult:
    """Paired comparison of prediction sets A and B on the same ``n`` faces (years).

    ``bias_a[attr]``/``bias_b[attr]`` are None when fewer than two groups of ``attr`` have
    faces, and then ``bias_diff[attr]`` is None too.
    """

    n: int
    level: float
    n_boot: int
    mae_a: float
    mae_b: float
    mae_diff: Difference
    bias_a: dict[str, float | None]
    bias_b: dict[str, float | None]
    bias_diff: dict[str, Difference | None]
    #: CS@k (fractions) of A and B and B - A, keyed by k as text ("5")
    cs_a: dict[str, float] = field(default_factory=dict)
    cs_b: dict[str, float] = field(default_factory=dict)
    cs_diff: dict[str, Difference] = field(default_factory=dict)
    #: worst-group MAE (years; groups of at least ``min_group`` faces in the table) of A and B, B - A
    worst_a: dict[str, float | None] = field(default_factory=dict)
    worst_b: dict[str, float | None] = field(default_factory=dict)
    worst_diff: dict[str, Difference | None] = field(default_factory=dict)

    def field_rows(self) -> list[tuple[str, float | None, float | None, Difference | None]]:
        """``(metric, A, B, B - A)`` for each CS@k, then ``"{attr} worst-group MAE"`` per attribute."""
        return [(f"CS@{k}", self.cs_a[k], self.cs_b[k], d) for k, d in self.cs_diff.items()] + [
            (f"{attr} worst-group MAE", self.worst_a[attr], self.worst_b[attr], d)
            for attr, d in self.worst_diff.items()
        ]

    #: when both sets carry intervals (age_lo, age_hi): "coverage" (fraction), "width" (years) and
    #: "{attr} coverage gap" (fraction) -> (A, B, B - A); {} otherwise
    intervals: dict[str, tuple[float | None, float | None, Difference | None]] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float | None, float | None, Difference | None]]:
        """``(metric, A, B, B - A)`` for the MAE, then ``"{attr} bias"`` per attribute in order,
        then the interval measures (``coverage``, ``width``, ``{attr} coverage gap``) when present."""
        return (
            [("MAE", self.mae_a, self.mae_b, self.mae_diff)]
            + [(f"{attr} bias", self.bias_a[attr], self.bias_b[attr], d) for attr, d in self.bias_diff.items()]
            + [(name, a, b, d) for name, (a, b, d) in self.intervals.items()]
        )

    def to_json(self) -> dict:
        """The JSON-ready object of ``fairage compare --json``::

            {"n", "level", "n_boot", "a": {"mae", "bias": {attr}}, "b": {"mae", "bias": {attr}},
             "diff": {"mae": D, "bias": {attr: D|None}, "cs": {k: D}, "worst_group_mae": {attr: D|None}},
             "cs": {"a": {k}, "b": {k}}, "worst_group_mae": {"a": {attr}, "b": {attr}}}

        with ``D = {"estimate", "ci": [lo, hi]|None, "excludes_zero"}``.
        """
        out = {
            "n": self.n,
            "level": self.level,
            "n_boot": self.n_boot,
            "a": {"mae": self.mae_a, "bias": dict(self.bias_a)},
            "b": {"mae": self.mae_b, "bias": dict(self.bias_b)},
            "diff": {
                "mae": self.mae_diff.to_json(),
                "bias": {a: (d.to_json() if d is not None else None) for a, d in self.bias_diff.items()},
                "cs": {k: d.to_json() for k, d in self.cs_diff.items()},
                "worst_group_mae": {a: (d.to_json() if d is not None else None) for a, d in self.worst_diff.items()},
            },
            "cs": {"a": dict(self.cs_a), "b": dict(self.cs_b)},
            "worst_group_mae": {"a": dict(self.worst_a), "b": dict(self.worst_b)},
        }
        if self.intervals:  # {"a": {"intervals": {measure: A}}, ..., "diff": {"intervals": {measure: D|None}}}
            for side, k in (("a", 0), ("b", 1)):
                out[side]["intervals"] = {m: v[k] for m, v in self.intervals.items()}
            out["diff"]["intervals"] = {
                m: (v[2].to_json() if v[2] is not None else None) for m, v in self.intervals.items()
            }
        return out


# size: the keyword settings of a public scoring call and their documentation
def compare(
    df_a: pd.DataFrame,
    df_b: pd.DataFrame,
    attributes: Sequence[str] | None = None,
    age_edges: Sequence[float] = AGE_EDGES,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    intersections: Sequence[Sequence[str]] = (),
    min_group: int = MIN_GROUP,
    cs_k: Sequence[float] = (5,),
) -> ComparisonResult:
    """Paired comparison of two prediction sets on the same faces (B minus A).

    Both tables have ``image``, ``age``, ``prediction`` and the attribute columns and hold
    the same images (joined on ``image``; ground truth and attributes are taken from A).
    Each resample draws the same faces for A and B, so the interval of a difference
    reflects only how the two models differ on the same faces.

    Returns a ``ComparisonResult`` (years; its ``to_json()`` is what ``fairage compare --json`` prints).
    """
    _check_counts(n_boot)
    ids_a, ids_b, df_b_aligned = _paired_sets(df_a, df_b)
    attributes, groupings, errors_a = _prepare(df_a, attributes, age_edges, intersections)
    _, _, errors_b = _prepare(
        df_b_aligned, attributes[: len(attributes) - len(intersections)], age_edges, intersections
    )
    mae_a, tables_a, bias_a = _point_estimates(df_a, groupings, age_edges)
    mae_b, tables_b, bias_b = _point_estimates(df_b_aligned, groupings, age_edges)
    cs_keys = _cs_keys(cs_k)
    extra_a = np.column_stack([errors_a <= float(k) for k in cs_keys]).astype(float).reshape(len(errors_a), -1)
    extra_b = np.column_stack([errors_b <= float(k) for k in cs_keys]).astype(float).reshape(len(errors_b), -1)
    counts = None
    if n_boot > 0:
        counts = resample_counts(len(errors_a), n_boot, seed)
        boot_a = _statistics(errors_a, counts, groupings, extra_a)
        boot_b = _statistics(errors_b, counts, groupings, extra_b)
    else:
        boot_a = boot_b = None

    def diff(a_point, b_point, a_boot, b_boot) -> Difference | None:
        return _difference(a_point, b_point, a_boot, b_boot, level)

    bias_diff = {
        g.attribute: diff(
            bias_a[g.attribute],
            bias_b[g.attribute],
            boot_a[g.attribute]["bias"] if boot_a else None,
            boot_b[g.attribute]["bias"] if boot_b else None,
        )
        for g in groupings
    }
    cs_a = {k: float(extra_a[:, j].mean()) for j, k in enumerate(cs_keys)}
    cs_b = {k: float(extra_b[:, j].mean()) for j, k in enumerate(cs_keys)}
    cs_diff = {
        k: diff(cs_a[k], cs_b[k], boot_a["extra"][:, j] if boot_a else None, boot_b["extra"][:, j] if boot_b else None)
        for j, k in enumerate(cs_keys)
    }
    worst_a, worst_b, worst_diff = _worst_differences(
        groupings, (tables_a, tables_b), (boot_a, boot_b), min_group, level
    )
    intervals = {}
    columns = {"age_lo", "age_hi"}
    if columns <= set(df_a.columns) and columns <= set(df_b.columns):
        df_b_rows = df_b.set_index(ids_b.to_numpy()).loc[ids_a.to_numpy()].reset_index(drop=True)
        intervals = _interval_differences(df_a, df_b_rows, groupings, counts, level)
    return ComparisonResult(
        intervals=intervals,
        n=len(errors_a),
        level=float(level),
        n_boot=int(n_boot),
        mae_a=mae_a,
        mae_b=mae_b,
        mae_diff=diff(mae_a, mae_b, boot_a["mae"] if boot_a else None, boot_b["mae"] if boot_b else None),
        bias_a={g.attribute: bias_a[g.attribute] for g in groupings},
        bias_b={g.attribute: bias_b[g.attribute] for g in groupings},
        bias_diff=bias_diff,
        cs_a=cs_a,
        cs_b=cs_b,
        cs_diff=cs_diff,
        worst_a=worst_a,
        worst_b=worst_b,
        worst_diff=worst_diff,
    )


def _paired_sets(df_a: pd.DataFrame, df_b: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.DataFrame]:
    """Both sets' image ids and A's faces with B's predictions in A's row order; DataError unless both
    hold the same images, once each."""
    for name, df in (("A", df_a), ("B", df_b)):
        if "image" not in df.columns:
            raise DataError(f"prediction set {name} has no 'image' column")
    ids_a = df_a["image"].astype(str)
    ids_b = df_b["image"].astype(str)
    for name, ids in (("A", ids_a), ("B", ids_b)):
        dup = ids[ids.duplicated()].unique().tolist()
        if dup:
            raise DataError(f"prediction set {name} has duplicated images: {', '.join(dup[:5])}")
    only_a = sorted(set(ids_a) - set(ids_b))
    only_b = sorted(set(ids_b) - set(ids_a))
    if only_a or only_b:
        raise DataError(
            f"the two prediction sets cover different faces: {len(only_a)} only in A "
            f"({', '.join(only_a[:5])}), {len(only_b)} only in B ({', '.join(only_b[:5])})"
        )
    b_pred = pd.Series(df_b["prediction"].to_numpy(), index=ids_b.to_numpy()).loc[ids_a.to_numpy()]
    df_b_aligned = df_a.copy()
    df_b_aligned["prediction"] = b_pred.to_numpy()
    return ids_a, ids_b, df_b_aligned


def _difference(a_point, b_point, a_boot, b_boot, level: float) -> Difference | None:
    """B - A of one statistic with the interval of its paired resamples (None when either point is None)."""
    if a_point is None or b_point is None:
        return None
    return Difference(float(b_point - a_point), _interval(b_boot - a_boot, level) if a_boot is not None else None)


def _worst_differences(groupings, tables: tuple, boots: tuple, min_group: float, level: float):
    """Each attribute's worst-group MAE (years) of A and of B (groups of at least ``min_group`` faces in
    A) and B - A: three dicts by attribute. ``tables``, ``boots``: A's and B's."""
    (tables_a, tables_b), (boot_a, boot_b) = tables, boots
    worst_a, worst_b, worst_diff = {}, {}, {}
    for g in groupings:
        keep = tables_a[g.attribute].loc[g.order, "n"].to_numpy() >= min_group
        points = [
            _worst_and_std(t[g.attribute].loc[g.order, "mae"].to_numpy(dtype=float)[None], keep)[0][0]
            for t in (tables_a, tables_b)
        ]
        wa, wb = (None if not np.isfinite(p) else float(p) for p in points)
        worst_a[g.attribute], worst_b[g.attribute] = wa, wb
        worst_diff[g.attribute] = _difference(
            wa,
            wb,
            _worst_and_std(boot_a[g.attribute]["group_mae"], keep)[0] if boot_a else None,
            _worst_and_std(boot_b[g.attribute]["group_mae"], keep)[0] if boot_b else None,
            level,
        )
    return worst_a, worst_b, worst_diff


def _interval_differences(df_a: pd.DataFrame, df_b: pd.DataFrame, groupings, counts, level: float) -> dict:
    """Coverage, width (years) and each attribute's coverage gap of both sets' intervals: name ->
    (A, B, B - A). ``df_b``: B's rows in A's order; ``counts``: the paired resamples (None: none)."""
    intervals = {}
    per_set = []
    for df in (df_a, df_b):
        covered, width = _interval_indicators(df_a, df["age_lo"], df["age_hi"], "compare")
        ones = np.ones((1, len(df_a)))
        per_set.append(
            [
                (_statistics(v, ones, groupings), _statistics(v, counts, groupings) if counts is not None else None)
                for v in (covered, width)
            ]
        )
    (ca, wa), (cb, wb) = per_set
    for name, (pa, ba), (pb, bb) in (("coverage", ca, cb), ("width", wa, wb)):
        intervals[name] = (
            float(pa["mae"][0]),
            float(pb["mae"][0]),
            _difference(
                float(pa["mae"][0]), float(pb["mae"][0]), ba["mae"] if ba else None, bb["mae"] if bb else None, level
            ),
        )
    for g in groupings:
        a_gap, b_gap = ca[0][g.attribute]["bias"][0], cb[0][g.attribute]["bias"][0]
        a_gap = None if not np.isfinite(a_gap) else float(a_gap)
        b_gap = None if not np.isfinite(b_gap) else float(b_gap)
        intervals[f"{g.attribute} coverage gap"] = (
            a_gap,
            b_gap,
            _difference(
                a_gap,
                b_gap,
                ca[1][g.attribute]["bias"] if ca[1] else None,
                cb[1][g.attribute]["bias"] if cb[1] else None,
                level,
            ),
        )
    return intervals
