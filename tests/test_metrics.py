"""fairage.fairness.metrics: hand-worked values, a loop reference of the vectorised bootstrap, coverage."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from fairage.errors import DataError
from fairage.fairness.metrics import (
    EvaluationResult,
    bias_score,
    compare,
    group_mae,
    mae,
)
from fairage.fairness.metrics import evaluate as evaluate_result


def evaluate(*args, **kwargs) -> dict:
    """The JSON object of an evaluation (what `fairage evaluate --json` prints)."""
    return evaluate_result(*args, **kwargs).to_json()


def _table(ages, preds, **attrs) -> pd.DataFrame:
    df = pd.DataFrame({"age": np.asarray(ages, float), "prediction": np.asarray(preds, float)})
    for name, values in attrs.items():
        df[name] = values
    return df


def test_mae_by_hand():
    assert mae([10, 20, 30], [12, 17, 30]) == pytest.approx(5 / 3)


def test_bias_score_hand_worked():
    # pairs of 4, 5, 7, 10: 1 3 6 2 5 3 -> 20 / 6
    assert bias_score([4, 5, 7, 10]) == pytest.approx(10 / 3)
    assert bias_score([3.0, 5.0]) == pytest.approx(2.0)
    assert bias_score([4, float("nan"), 10, None]) == pytest.approx(6.0)  # empty groups skipped
    assert bias_score([4.0]) is None
    assert bias_score([]) is None
    assert bias_score([float("nan"), 2.0]) is None


def _hand_df() -> pd.DataFrame:
    # age groups (ground truth): [0,20): 10, 15 ; [20,40): 20, 30 ; [40,60): none ; [60,inf): 70
    ages = [10, 15, 20, 30, 70]
    preds = [14, 11, 25, 25, 60]  # abs errors 4 4 5 5 10
    return _table(
        ages,
        preds,
        gender=["male", "female", "male", "unknown", "female"],
        ethnicity=["asian", "asian", "asian", "asian", "unknown"],
        expression=["happy", "neutral", "other", "slightlyhappy", "happy"],
    )


def test_group_mae_uses_ground_truth_age_bins_and_keeps_empty_groups():
    table = group_mae(_hand_df(), "age")
    assert table["group"].tolist() == ["[0,20)", "[20,40)", "[40,60)", "[60,inf)"]
    assert table["n"].tolist() == [2, 2, 0, 1]
    assert table["mae"].iloc[[0, 1, 3]].tolist() == pytest.approx([4.0, 5.0, 10.0])
    assert math.isnan(table["mae"].iloc[2])
    # pairs of 4, 5, 10: 1, 6, 5 -> 4
    assert bias_score(table) == pytest.approx(4.0)


def test_age_bins_are_closed_on_the_left():
    df = _table([19.99, 20.0, 40.0, 60.0], [0, 0, 0, 0])
    assert group_mae(df, "age")["n"].tolist() == [1, 1, 1, 1]


def test_evaluate_hand_worked_object():
    result = evaluate(_hand_df(), n_boot=50, seed=3)
    assert set(result) >= {"n", "mae", "mae_ci", "bias", "bias_ci", "groups", "skipped_groups"}
    assert result["n"] == 5
    assert result["mae"] == pytest.approx(28 / 5)
    assert result["bias"]["age"] == pytest.approx(4.0)
    # gender: unknown face (error 5) left out: male 4, 5 -> 4.5 ; female 4, 10 -> 7
    assert result["groups"]["gender"] == {
        "male": {"n": 2, "mae": pytest.approx(4.5)},
        "female": {"n": 2, "mae": pytest.approx(7.0)},
    }
    assert result["bias"]["gender"] == pytest.approx(2.5)
    # ethnicity: only asian has faces -> null bias and null interval, others skipped
    assert result["bias"]["ethnicity"] is None
    assert result["bias_ci"]["ethnicity"] is None
    assert result["groups"]["ethnicity"] == {"asian": {"n": 4, "mae": pytest.approx(4.5)}}
    assert result["skipped_groups"]["ethnicity"] == ["afroamerican", "caucasian"]
    assert result["skipped_groups"]["age"] == ["[40,60)"]
    assert result["skipped_groups"]["gender"] == []
    # expression in vocabulary order: neutral 4 ; slightlyhappy 5 ; happy (4+10)/2 = 7 ; other 5
    assert list(result["groups"]["expression"]) == ["neutral", "slightlyhappy", "happy", "other"]
    assert result["bias"]["expression"] == pytest.approx(np.mean([1, 3, 1, 2, 0, 2]))
    lo, hi = result["mae_ci"]
    assert lo <= result["mae"] <= hi
    json.dumps(result, allow_nan=False)  # no NaN anywhere


def test_evaluate_no_bootstrap_gives_null_intervals():
    result = evaluate(_hand_df(), n_boot=0)
    assert result["mae_ci"] is None and result["bias_ci"]["age"] is None


def test_custom_attribute_custom_edges_and_extra_categories():
    df = _table(
        [5, 25, 35, 50],
        [6, 27, 38, 54],  # errors 1 2 3 4
        makeup=["yes", "no", "unknown", "yes"],
        ethnicity=["indian", "asian", "asian", "caucasian"],
    )
    result = evaluate(df, attributes=["age", "makeup", "ethnicity"], age_edges=(30,), n_boot=20)
    assert list(result["groups"]["age"]) == ["[0,30)", "[30,inf)"]
    assert result["bias"]["age"] == pytest.approx(abs(1.5 - 3.5))
    assert list(result["groups"]["makeup"]) == ["no", "yes"]  # sorted, unknown left out
    assert result["bias"]["makeup"] == pytest.approx(abs(2 - 2.5))
    assert result["skipped_groups"]["makeup"] == []
    # vocabulary order, then the extra category; afroamerican skipped
    assert list(result["groups"]["ethnicity"]) == ["asian", "caucasian", "indian"]
    assert result["skipped_groups"]["ethnicity"] == ["afroamerican"]
    assert result["bias"]["ethnicity"] == pytest.approx(np.mean([1.5, 1.5, 3.0]))  # asian 2.5, caucasian 4, indian 1


def test_bad_tables_raise_data_error():
    with pytest.raises(DataError, match="makeup"):
        evaluate(_hand_df(), attributes=["makeup"], n_boot=0)
    df = _hand_df()
    df.loc[2, "prediction"] = np.nan
    with pytest.raises(DataError, match="row 2"):
        evaluate(df, n_boot=0)
    with pytest.raises(DataError, match="edges"):
        evaluate(_hand_df(), age_edges=(40, 20), n_boot=0)


# --------------------------------------------------------------------------- loop reference


def _reference_stats(errors, labels_by_attr, index):
    """Plain-Python MAE and bias of the faces ``index`` (one resample)."""
    out = {"mae": sum(errors[i] for i in index) / len(index)}
    for attr, labels in labels_by_attr.items():
        sums, counts = {}, {}
        for i in index:
            g = labels[i]
            if g is None:
                continue
            sums[g] = sums.get(g, 0.0) + errors[i]
            counts[g] = counts.get(g, 0) + 1
        maes = [sums[g] / counts[g] for g in sums]
        pairs = [abs(a - b) for a, b in combinations(maes, 2)]
        out[attr] = sum(pairs) / len(pairs) if pairs else float("nan")
    return out


def _random_df(rng, n):
    return _table(
        rng.uniform(1, 80, n),
        rng.uniform(1, 80, n),
        gender=rng.choice(["male", "female", "unknown"], n, p=[0.45, 0.45, 0.1]),
        # a rare group so it is sometimes empty in a resample
        ethnicity=rng.choice(["asian", "afroamerican", "caucasian"], n, p=[0.45, 0.05, 0.5]),
        expression=rng.choice(["neutral", "slightlyhappy", "happy", "other"], n),
    )


def _percentile_ci(values, level):
    values = np.asarray([v for v in values if np.isfinite(v)])
    return list(np.percentile(values, [50 * (1 - level), 50 * (1 + level)]))


def test_vectorised_bootstrap_matches_loop_reference():
    rng = np.random.default_rng(11)
    n, n_boot, seed, level = 40, 150, 7, 0.9
    df = _random_df(rng, n)
    result = evaluate(df, n_boot=n_boot, level=level, seed=seed)

    errors = list(np.abs(df["prediction"] - df["age"]))
    labels = {
        "age": ["[0,20)" if a < 20 else "[20,40)" if a < 40 else "[40,60)" if a < 60 else "[60,inf)" for a in df["age"]]
    }
    for attr in ("gender", "ethnicity", "expression"):
        labels[attr] = [None if v == "unknown" else v for v in df[attr]]
    point = _reference_stats(errors, labels, range(n))
    assert result["mae"] == pytest.approx(point["mae"])
    for attr in labels:
        assert result["bias"][attr] == pytest.approx(point[attr])

    # documented resampling: row b of default_rng(seed).integers(0, n, (n_boot, n))
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = [_reference_stats(errors, labels, row) for row in index]
    assert result["mae_ci"] == pytest.approx(_percentile_ci([b["mae"] for b in boots], level))
    for attr in labels:
        assert result["bias_ci"][attr] == pytest.approx(_percentile_ci([b[attr] for b in boots], level))


def _hand_bias(errors: np.ndarray, labels: np.ndarray) -> float:
    """Bias score written out: group means, then the mean of |pairwise differences|."""
    means = [errors[labels == g].mean() for g in sorted(set(labels))]
    return float(np.mean([abs(a - b) for a, b in combinations(means, 2)]))


def test_permutation_pvalues_match_a_loop_reference():
    import zlib

    rng = np.random.default_rng(11)
    n, n_perm, seed = 40, 60, 3
    df = _random_df(rng, n)
    result = evaluate_result(df, attributes=["gender", "ethnicity"], n_boot=0, n_perm=n_perm, seed=seed)
    assert result.n_perm == n_perm and result.bias_ci == {"gender": None, "ethnicity": None}
    errors = np.abs(df["prediction"] - df["age"]).to_numpy()
    for attr in ("gender", "ethnicity"):
        known = (df[attr] != "unknown").to_numpy()
        labels, e = df[attr].to_numpy()[known], errors[known]
        observed = _hand_bias(e, labels)
        # documented draws: rng.permutation of the known faces' labels, n_perm times in order
        draws = np.random.default_rng([seed, zlib.crc32(attr.encode())])
        permuted = [_hand_bias(e, labels[draws.permutation(len(labels))]) for _ in range(n_perm)]
        want = (1 + sum(b >= observed - 1e-9 for b in permuted)) / (1 + n_perm)
        assert result.bias_p[attr] == pytest.approx(want)
    # a fixed result: the same seed gives the same p-values
    again = evaluate_result(df, attributes=["gender", "ethnicity"], n_boot=0, n_perm=n_perm, seed=seed)
    assert again.bias_p == result.bias_p


def test_permutation_pvalues_are_calibrated_and_find_a_real_gap():
    rng = np.random.default_rng(4)
    n, trials = 120, 200
    small = []
    for t in range(trials):  # errors independent of the groups: p should be uniform
        df = _table(
            np.full(n, 30.0),
            30.0 + rng.normal(0, 5, n),
            ethnicity=rng.choice(["asian", "afroamerican", "caucasian"], n, p=[0.2, 0.1, 0.7]),
        )
        p = evaluate_result(df, attributes=["ethnicity"], n_boot=0, n_perm=99, seed=t).bias_p["ethnicity"]
        assert 0.01 <= p <= 1.0
        small.append(p <= 0.05)
    # Binomial(200, 0.05): 10 expected, 3..19 covers it with probability > 0.99
    assert 3 <= sum(small) <= 19
    # afroamerican faces misjudged by 8 more years: no permutation reaches the observed bias
    df = _table(
        np.full(n, 30.0),
        30.0 + rng.normal(0, 2, n),
        ethnicity=np.repeat(["asian", "afroamerican", "caucasian"], [30, 30, 60]),
    )
    df.loc[df["ethnicity"] == "afroamerican", "prediction"] += 8.0
    result = evaluate_result(df, attributes=["ethnicity", "age"], n_boot=0, n_perm=199)
    assert result.bias_p["ethnicity"] == pytest.approx(1 / 200)
    assert result.bias_p["age"] is None  # one age group: no bias, no test
    # the JSON carries the p-values and reads back; an older file without them reads as "no test"
    raw = result.to_json()
    assert raw["bias_p"] == {"ethnicity": pytest.approx(1 / 200), "age": None} and raw["n_perm"] == 199
    assert EvaluationResult.from_json(raw).bias_p == result.bias_p
    old = {k: v for k, v in raw.items() if k not in ("bias_p", "n_perm")}
    assert EvaluationResult.from_json(old).n_perm == 0 and EvaluationResult.from_json(old).bias_p == {}
    assert evaluate_result(df, attributes=["ethnicity"], n_boot=0).bias_p == {"ethnicity": None}


def test_paired_compare_matches_loop_reference():
    rng = np.random.default_rng(5)
    n, n_boot, seed = 30, 100, 2
    df_a = _random_df(rng, n)
    df_a["image"] = [f"{i:03d}.jpg" for i in range(n)]
    df_b = df_a.copy()
    df_b["prediction"] = df_a["age"] + rng.normal(0, 3, n)
    result = compare(df_a, df_b.iloc[::-1], attributes=["age", "ethnicity"], n_boot=n_boot, seed=seed)

    labels = {
        "age": [
            "[0,20)" if a < 20 else "[20,40)" if a < 40 else "[40,60)" if a < 60 else "[60,inf)" for a in df_a["age"]
        ],
        "ethnicity": list(df_a["ethnicity"]),
    }
    err_a = list(np.abs(df_a["prediction"] - df_a["age"]))
    err_b = list(np.abs(df_b["prediction"] - df_b["age"]))
    pa, pb = _reference_stats(err_a, labels, range(n)), _reference_stats(err_b, labels, range(n))
    assert result.mae_diff.estimate == pytest.approx(pb["mae"] - pa["mae"])
    assert (result.mae_a, result.mae_b) == (pytest.approx(pa["mae"]), pytest.approx(pb["mae"]))
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    for key in ("mae", "age", "ethnicity"):
        diffs = [_reference_stats(err_b, labels, row)[key] - _reference_stats(err_a, labels, row)[key] for row in index]
        got = result.mae_diff if key == "mae" else result.bias_diff[key]
        assert got.ci == pytest.approx(_percentile_ci(diffs, 0.95))
        assert got.excludes_zero == (got.ci[0] > 0 or got.ci[1] < 0)
    # B predicts far better than random A: its MAE is clearly lower
    assert result.mae_diff.estimate < 0 and result.mae_diff.excludes_zero
    assert result.mae_diff.verdict == "B lower"
    assert [row[0] for row in result.rows()] == ["MAE", "age bias", "ethnicity bias"]


def test_compare_identical_predictions_has_zero_difference():
    df = _random_df(np.random.default_rng(0), 50)
    df["image"] = [str(i) for i in range(50)]
    result = compare(df, df.copy(), n_boot=50)
    assert result.to_json()["diff"]["mae"] == {"estimate": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}
    assert result.mae_diff.verdict == "no clear difference"
    for attr in ("age", "gender", "ethnicity", "expression"):
        assert result.bias_diff[attr].estimate == 0.0
    without_bootstrap = compare(df, df.copy(), n_boot=0)
    assert without_bootstrap.mae_diff.ci is None and without_bootstrap.mae_diff.verdict == "n/a"


def test_compare_refuses_different_faces():
    df = _random_df(np.random.default_rng(0), 10)
    df["image"] = [str(i) for i in range(10)]
    other = df.copy()
    other["image"] = [str(i) for i in range(1, 11)]
    with pytest.raises(DataError, match="only in A.*0.*only in B.*10"):
        compare(df, other, n_boot=10)


def test_interval_coverage_on_simulated_data():
    # abs errors |N(0, 4)|: true MAE = 4 * sqrt(2 / pi); the 95% interval should cover it ~95% of the time
    sigma, n, trials = 4.0, 150, 200
    true_mae = sigma * math.sqrt(2 / math.pi)
    rng = np.random.default_rng(2024)
    covered = 0
    for t in range(trials):
        ages = rng.uniform(1, 80, n)
        df = _table(ages, ages + rng.normal(0, sigma, n))
        lo, hi = evaluate(df, attributes=["age"], n_boot=300, seed=t)["mae_ci"]
        covered += lo <= true_mae <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_attribute_with_only_unknown_values_gives_null_bias():
    df = _table([10, 30, 50], [11, 33, 55], gender=["unknown"] * 3)
    result = evaluate(df, attributes=["gender"], n_boot=20)
    assert result["bias"]["gender"] is None and result["bias_ci"]["gender"] is None
    assert result["groups"]["gender"] == {}
    assert result["skipped_groups"]["gender"] == ["male", "female"]
    assert result["mae"] == pytest.approx(3.0)  # unknown faces still count for the MAE


def test_evaluate_point_groups_agree_with_the_vectorised_form():
    """evaluate() takes point group MAEs from MetricFrame; the bootstrap's matrix form must agree."""
    from fairage.fairness.metrics import _prepare, _statistics

    rng = np.random.default_rng(7)
    n = 300
    df = pd.DataFrame(
        {
            "age": rng.uniform(1, 90, n),
            "prediction": rng.uniform(1, 90, n),
            "gender": rng.choice(["male", "female", "unknown"], n),
            "ethnicity": rng.choice(["asian", "afroamerican", "caucasian"], n, p=[0.2, 0.1, 0.7]),
            "expression": rng.choice(["neutral", "happy", "other"], n),
        }
    )
    out = evaluate(df, n_boot=0)
    _attributes, groupings, errors = _prepare(df, None, (20, 40, 60))
    point = _statistics(errors, np.ones((1, n)), groupings)
    assert out["mae"] == pytest.approx(point["mae"][0])
    for g in groupings:
        assert out["bias"][g.attribute] == pytest.approx(point[g.attribute]["bias"][0])
        for k, name in enumerate(g.order):
            assert out["groups"][g.attribute][name]["mae"] == pytest.approx(point[g.attribute]["group_mae"][0, k])


def test_evaluation_result_round_trips_through_its_json():
    result = evaluate_result(_hand_df(), n_boot=30, seed=1)
    assert isinstance(result, EvaluationResult)
    assert result.groups["gender"]["female"].mae == pytest.approx(7.0)  # errors 4 and 10, by hand
    assert result.groups["gender"]["female"].ci is not None
    again = EvaluationResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result


def test_evaluation_result_from_a_broken_object_names_the_source():
    with pytest.raises(DataError, match="m.json"):
        EvaluationResult.from_json({"n": 3}, source="m.json")
