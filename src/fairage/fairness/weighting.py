"""Sample weighting: group schemes, weight formulas, LDS, the weighted loss and the sampler.

A face's weight is the product of a *group part* (its group's count through a formula)
and, optionally, an *LDS part* (1 / smoothed density of its age). Weights are then
rescaled to mean 1 over the faces given (the training split), so loss scale and learning
rate stay comparable across schemes. The report's raw weights ``N / (K n_j)`` already
have mean 1 over the training set when no pseudo-count is added; otherwise they differ
from ours by one global factor only.

Group names: parts joined by ``|``; the age part is an age-bin label from
``fairage.data.schema.age_bin_labels`` (``[20,40)``), attribute parts are the value
(``[20,40)|asian``). Faces whose attribute is ``unknown`` form their own group
(``...|unknown``): weighting needs every training face in some group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config.schema import WeightingConfig
from ..data.schema import AGE_EDGES, UNKNOWN, age_bin_labels, age_bins, group_order
from ..errors import ConfigError

#: built-in schemes as (attributes, merges); "age" means age bins
_OLD = age_bin_labels(AGE_EDGES)[-1]  # "[60,inf)"
SCHEMES: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "none": ([], {}),
    "age": (["age"], {}),
    # the report's "personalised" 10 groups: 3 bins below 60 x 3 ethnicities, plus one >=60 group
    # (with other ethnicities in the data: 3 bins x every ethnicity present, plus one >=60 group)
    "age_ethnicity": (["age", "ethnicity"], {_OLD: [f"{_OLD}|*"]}),
    "age_ethnicity_expression": (["age", "ethnicity", "expression"], {}),
}

ALL = "all"  # the single group of scheme "none"


def _scheme_parts(cfg: WeightingConfig) -> tuple[list[str], list[float], dict[str, list[str]]]:
    if cfg.scheme == "custom":
        if not cfg.attributes:
            raise ConfigError("weighting.scheme 'custom' needs weighting.attributes (e.g. [age, ethnicity])")
        return list(cfg.attributes), list(cfg.age_edges), dict(cfg.merges)
    attributes, merges = SCHEMES[cfg.scheme]
    return list(attributes), list(AGE_EDGES), dict(merges)


def _merge_map(merges: dict[str, list[str]], possible: list[str]) -> dict[str, str]:
    """Group -> merged group; a member ending in ``|*`` stands for every group that starts with it."""
    mapping: dict[str, str] = {}
    for new, members in merges.items():
        expanded = []
        for m in members:
            if m.endswith("|*"):
                expanded += [p for p in possible if p.startswith(m[:-1])] or [m]
            else:
                expanded.append(m)
        for m in expanded:
            if m not in possible:
                raise ConfigError(
                    f"weighting.merges['{new}'] names group '{m}', which this scheme cannot produce; "
                    f"groups look like: {', '.join(sorted(possible)[:6])}"
                )
            if m in mapping:
                raise ConfigError(f"weighting.merges: group '{m}' is merged twice ('{mapping[m]}' and '{new}')")
            mapping[m] = new
    return mapping


def _raw_parts(
    faces: pd.DataFrame, attributes: list[str], edges: list[float]
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Per-attribute label arrays and the ordered list of possible values of each."""
    parts, values = [], []
    for attr in attributes:
        if attr == "age":
            parts.append(np.asarray(age_bins(faces["age"].to_numpy(dtype=float), edges), dtype=object))
            values.append(age_bin_labels(edges))
            continue
        if attr not in faces.columns:
            raise ConfigError(
                f"weighting attribute '{attr}' is not a column of the face table; "
                f"columns: {', '.join(map(str, faces.columns))}"
            )
        col = faces[attr].astype(str).to_numpy(dtype=object)
        seen_unknown = [UNKNOWN] if UNKNOWN in set(col) else []
        parts.append(col)
        values.append(group_order(attr, col) + seen_unknown)
    return parts, values


def _groups(faces: pd.DataFrame, cfg: WeightingConfig) -> tuple[pd.Series, list[str]]:
    """Group name per face and the ordered list of all groups of the scheme (incl. empty)."""
    attributes, edges, merges = _scheme_parts(cfg)
    if not attributes:
        return pd.Series([ALL] * len(faces), index=faces.index, dtype=object), [ALL]
    parts, values = _raw_parts(faces, attributes, edges)
    possible = ["|".join(combo) for combo in itertools.product(*values)]
    mapping = _merge_map(merges, possible)
    names = ["|".join(p) for p in zip(*parts)] if len(faces) else []
    names = [mapping.get(n, n) for n in names]
    ordered: list[str] = []
    for p in possible:  # keep the product order; a merged group sits where its first member was
        q = mapping.get(p, p)
        if q not in ordered:
            ordered.append(q)
    return pd.Series(names, index=faces.index, dtype=object), ordered


def face_group_names(faces: pd.DataFrame, cfg: WeightingConfig) -> pd.Series:
    """Group name (str) of every face under ``cfg``'s scheme; same index as ``faces``."""
    return _groups(faces, cfg)[0]


def _group_formula(counts: np.ndarray, k: int, n_total: int, cfg: WeightingConfig) -> np.ndarray:
    """Weight per face of groups with ``counts`` faces (pseudo-count already added)."""
    if cfg.formula == "inverse":
        return n_total / (k * counts)
    if cfg.formula == "sqrt_inverse":
        return 1.0 / np.sqrt(counts)
    # effective number of samples (Cui et al., CVPR 2019): E_n = (1 - beta^n) / (1 - beta)
    return (1.0 - cfg.beta) / (1.0 - np.power(cfg.beta, counts))


def lds_kernel(size: int, sigma: float) -> np.ndarray:
    """Gaussian LDS kernel as in Yang et al.'s code: a filtered delta divided by its max."""
    from scipy.ndimage import gaussian_filter1d

    half = (size - 1) // 2
    delta = np.zeros(2 * half + 1)
    delta[half] = 1.0
    window = gaussian_filter1d(delta, sigma=sigma)
    return window / window.max()


def lds_weights(ages: np.ndarray, kernel_size: int = 5, sigma: float = 2.0, sqrt: bool = False) -> np.ndarray:
    """Label-distribution-smoothing weights (Yang et al., ICML 2021), not rescaled.

    Histogram of ages in 1-year bins (bin = floor(age)), optionally square-rooted (the
    paper's ``sqrt_inv``), convolved with the Gaussian kernel (zeros outside the range);
    a face's weight is 1 / smoothed value at its bin. Shape (N,) like ``ages``.
    """
    from scipy.ndimage import convolve1d

    ages = np.asarray(ages, dtype=float)
    bins = np.floor(ages).astype(int)
    hist = np.bincount(bins, minlength=int(bins.max()) + 1 if len(bins) else 1).astype(float)
    if sqrt:
        hist = np.sqrt(hist)
    smoothed = convolve1d(hist, lds_kernel(kernel_size, sigma), mode="constant")
    return 1.0 / smoothed[bins]


def _rescale(w: np.ndarray, max_weight: float | None) -> np.ndarray:
    w = w / w.mean()
    if max_weight is None:
        return w
    if max_weight < 1.0:
        raise ConfigError(f"weighting.max_weight={max_weight} is below 1, but weights have mean 1")
    # clip, then rescale the unclipped weights so the mean stays 1; repeat until stable
    for _ in range(100):
        clipped = w >= max_weight
        if not np.any(w > max_weight * (1 + 1e-12)):
            break
        free = ~clipped
        budget = len(w) - max_weight * clipped.sum()
        w = np.where(clipped, max_weight, w * budget / w[free].sum())
    return w


def compute_weights(faces: pd.DataFrame, cfg: WeightingConfig) -> np.ndarray:
    """Per-face training weights, float64 (N,), mean 1 over ``faces``.

    ``faces`` is the training split's face table. Scheme ``none`` without LDS gives all 1.
    With ``max_weight``, weights above it are clipped and the rest rescaled so the mean
    stays exactly 1 (so ``max_weight`` must be >= 1).
    """
    n = len(faces)
    if n == 0:
        return np.zeros(0)
    if cfg.scheme == "none":
        w = np.ones(n)
    else:
        labels, _ = _groups(faces, cfg)
        counts = labels.value_counts()
        k = len(counts)  # non-empty groups only
        per_group = _group_formula(counts.to_numpy(dtype=float) + cfg.pseudo_count, k, n, cfg)
        w = pd.Series(per_group, index=counts.index).reindex(labels.to_numpy()).to_numpy(dtype=float)
    if cfg.lds:
        w = w * lds_weights(faces["age"].to_numpy(dtype=float), cfg.lds_kernel_size, cfg.lds_sigma, cfg.lds_sqrt)
    return _rescale(w, cfg.max_weight)


def group_table(faces: pd.DataFrame, cfg: WeightingConfig, by: WeightingConfig | None = None) -> pd.DataFrame:
    """One row per group of the scheme, in scheme order, empty groups included.

    Weights come from ``cfg``; groups from ``by`` when given (e.g. show LDS-only weights
    by age bin), else from ``cfg``. Columns: ``name``, ``n`` (faces), ``weight`` (mean weight per face after rescaling;
    NaN for empty groups; with LDS the weight varies inside a group), ``share`` (fraction
    of the total weight carried by the group; 0 for empty groups; sums to 1).
    """
    labels, ordered = _groups(faces, by or cfg)
    w = compute_weights(faces, cfg)
    df = pd.DataFrame({"name": labels.to_numpy(), "w": w})
    agg = df.groupby("name", sort=False)["w"].agg(["size", "mean", "sum"])
    total = float(w.sum()) or 1.0
    rows = []
    for name in ordered + [g for g in agg.index if g not in ordered]:
        if name in agg.index:
            rows.append(
                {
                    "name": name,
                    "n": int(agg.at[name, "size"]),
                    "weight": float(agg.at[name, "mean"]),
                    "share": float(agg.at[name, "sum"]) / total,
                }
            )
        else:
            rows.append({"name": name, "n": 0, "weight": float("nan"), "share": 0.0})
    return pd.DataFrame(rows, columns=["name", "n", "weight", "share"])


def dominant_groups_per_face(labels: pd.Series, weights: np.ndarray, threshold: float = 0.01) -> list[str]:
    """Groups holding at least one face whose weight is more than ``threshold`` of all weight.

    ``labels``: group name per face, ``weights``: (N,) per-face weights. Exact also when
    weights vary inside a group (LDS); names in order of first appearance.
    """
    w = np.asarray(weights, dtype=float)
    total = float(w.sum())
    if total <= 0:
        return []
    return list(pd.unique(np.asarray(labels, dtype=object)[w / total > threshold]))


def describe(cfg: WeightingConfig) -> str:
    """Short human name, e.g. ``age_ethnicity/inverse``, ``age_ethnicity/inverse x LDS (sampler)``.

    >>> describe(WeightingConfig(scheme="age", lds=True, mode="sampler"))
    'age/inverse x LDS (sampler)'
    >>> describe(WeightingConfig())
    'none'
    """
    if not cfg.active:
        return "none"
    parts = []
    if cfg.scheme != "none":
        parts.append(f"{cfg.scheme}/{cfg.formula}")
    if cfg.lds:
        parts.append("LDS")
    text = " x ".join(parts)
    return f"{text} (sampler)" if cfg.mode == "sampler" else text


def weighting_from_options(
    scheme: str | None = None,
    formula: str = "inverse",
    lds: bool = False,
    attributes: list[str] | None = None,
    age_edges: list[float] | None = None,
    **settings,
) -> WeightingConfig:
    """The WeightingConfig of ``fairage weights``'s options; ConfigError naming the bad option.

    ``formula="lds"`` is shorthand for ``lds=True`` with the inverse group formula; without
    a ``scheme`` it means LDS alone. Otherwise the scheme defaults to ``age_ethnicity``.
    ``settings`` are other WeightingConfig fields (``pseudo_count``, ``beta``, ``max_weight``).
    """
    from pydantic import ValidationError

    from ..config.schema import format_validation_error

    if scheme is None:
        scheme = "none" if formula == "lds" else "age_ethnicity"
    raw: dict = {
        "scheme": scheme,
        "lds": lds or formula == "lds",
        "formula": "inverse" if formula == "lds" else formula,
        **settings,
    }
    if attributes:
        raw["attributes"] = list(attributes)
    if age_edges:
        raw["age_edges"] = list(age_edges)
    try:
        return WeightingConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "(weights options)", WeightingConfig)) from None


@dataclass
class WeightsSummary:
    """What a weighting does to a training set: its group table and the groups one face dominates.

    ``table``: ``group_table`` (LDS alone is shown by the report's age bins);
    ``heavy``: groups holding a face that carries more than 1% of all weight, in table order.
    """

    cfg: WeightingConfig
    n: int
    table: pd.DataFrame
    heavy: list[str]

    @property
    def warnings(self) -> list[str]:
        return [f"group '{g}': one face carries more than 1% of all weight" for g in self.heavy]

    def to_json(self) -> dict:
        groups = [
            {"name": r.name, "n": int(r.n), "weight": None if r.n == 0 else float(r.weight), "share": float(r.share)}
            for r in self.table.itertuples()
        ]
        formula = "lds" if self.cfg.lds and self.cfg.scheme == "none" else self.cfg.formula
        return {
            "scheme": self.cfg.scheme,
            "formula": formula,
            "lds": self.cfg.lds,
            "n": self.n,
            "groups": groups,
            "warnings": self.warnings,
        }


def summarize_weights(train: pd.DataFrame, cfg: WeightingConfig, source=None) -> WeightsSummary:
    """Group table and dominated groups of ``cfg`` on the training faces ``train`` (``source``: the dataset
    they come from, named in the error when there are none)."""
    if len(train) == 0:
        raise ConfigError(f"dataset {source} has no train faces to weight" if source else "no training faces to weight")
    # LDS alone has no groups: show its weights by the report's age bins
    by = WeightingConfig(scheme="age") if cfg.scheme == "none" else None
    table = group_table(train, cfg, by=by)
    # per face, not per group mean: with LDS one face of a group can dominate alone
    heavy = set(dominant_groups_per_face(face_group_names(train, by or cfg), compute_weights(train, cfg)))
    return WeightsSummary(cfg, len(train), table, [g for g in table["name"] if g in heavy])


def summarize_dataset_weights(data, cfg: WeightingConfig, **options) -> WeightsSummary:
    """``summarize_weights`` on the train split of the dataset ``data`` (``load_faces`` keyword arguments
    ``options``): what ``fairage weights`` shows."""
    from ..data import load_faces

    faces = load_faces(data, **options)
    return summarize_weights(faces[faces["split"] == "train"].reset_index(drop=True), cfg, source=data)


# --------------------------------------------------------------------------- torch side


def make_sampler(weights, num_samples: int | None = None, seed: int = 0):
    """Seeded ``WeightedRandomSampler`` (with replacement) drawing faces in proportion to ``weights``.

    With group weights ``N / (K n_j)`` every group is drawn equally often: group-balanced batches.
    """
    import torch
    from torch.utils.data import WeightedRandomSampler

    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(w, num_samples=int(num_samples or len(w)), replacement=True, generator=generator)
