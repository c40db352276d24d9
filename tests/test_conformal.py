"""Conformal age intervals: coverage per group on exchangeable synthetic residuals, fallback of
small groups, the stored calibration, and the intervals in predictions files and metrics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fairage.errors import DataError
from fairage.fairness.conformal import (
    Calibration,
    fit_calibration,
    interval_arguments,
    read_calibration,
    write_calibration,
)
from fairage.fairness.metrics import EvaluationResult, evaluate
from fairage.store.predictions import (
    join_predictions,
    read_predictions,
    write_predictions,
)

ALPHA = 0.1


def binomial_limit(n_test: int, n_cal: int, p: float = 1 - ALPHA, z: float = 4.0) -> float:
    """z standard deviations of a coverage measured on n_test faces with a quantile from n_cal faces.

    The coverage a calibration gives varies too (Beta with variance about p(1-p)/n_cal), so
    both parts are added.
    """
    return z * math.sqrt(p * (1 - p) / n_test + p * (1 - p) / n_cal)


def _aged_faces(n: int, seed: int) -> pd.DataFrame:
    """Faces with ages in the middle of each age bin and a noise sd that grows with the true age.

    The ages stay 5 years inside their bin, so the label-conditional interval's hull adds nothing
    to the own bin's interval and each bin is plain split conformal on its own.
    """
    rng = np.random.default_rng(seed)
    centre = rng.choice([10.0, 30.0, 50.0, 70.0], size=n)
    age = centre + rng.uniform(-5, 5, n)
    sd = pd.Series(centre).map({10.0: 1.0, 30.0: 1.5, 50.0: 2.0, 70.0: 4.0}).to_numpy()
    return pd.DataFrame(
        {
            "image": [str(i) for i in range(n)],
            "age": age,
            "prediction": age + rng.normal(0, 1, n) * sd,
            "gender": rng.choice(["male", "female"], n),
        }
    )


def _coverage(df: pd.DataFrame, lo, hi) -> pd.Series:
    return pd.Series((df["age"].to_numpy() >= lo) & (df["age"].to_numpy() <= hi), index=df.index)


def test_mondrian_by_age_covers_every_age_group_and_plain_does_not():
    cal_df, test_df = _aged_faces(4000, seed=1), _aged_faces(20000, seed=2)
    mondrian, notes = fit_calibration(cal_df, ALPHA, by=["age"])
    plain, _ = fit_calibration(cal_df, ALPHA, by=[])
    assert notes == []
    bins = pd.cut(test_df["age"], [0, 20, 40, 60, np.inf], right=False)
    cal_bins = pd.cut(cal_df["age"], [0, 20, 40, 60, np.inf], right=False)
    covered = _coverage(test_df, *mondrian.intervals(test_df["prediction"]))
    assert abs(covered.mean() - 0.9) < binomial_limit(len(test_df), len(cal_df))
    for group, cov in covered.groupby(bins, observed=True):
        limit = binomial_limit(int((bins == group).sum()), int((cal_bins == group).sum()))
        assert abs(cov.mean() - 0.9) < limit, (group, cov.mean())

    # plain: one quantile q with sum_b w_b P(|N(0, sd_b)| <= q) = 0.9 (solved here, not by the code);
    # the oldest faces (sd 4) then get 2 Phi(q / 4) - 1, far below 0.9
    sds, weights = np.array([1.0, 1.5, 2.0, 4.0]), np.full(4, 0.25)
    q = brentq(lambda q: float(np.sum(weights * (2 * norm.cdf(q / sds) - 1))) - 0.9, 0.01, 50)
    expected_old = 2 * norm.cdf(q / 4.0) - 1
    assert expected_old < 0.8
    plain_covered = _coverage(test_df, *plain.intervals(test_df["prediction"]))
    old = test_df["age"] >= 60
    n_old = int(old.sum())
    # tolerance: the binomial part on the test faces plus the quantile's own spread on 4000 faces
    assert abs(plain_covered[old].mean() - expected_old) < binomial_limit(n_old, len(cal_df) // 4, expected_old)
    assert abs(plain_covered.mean() - 0.9) < binomial_limit(len(test_df), len(cal_df))
    # Mondrian intervals are narrower where the model is accurate and wider where it is not
    lo, hi = mondrian.intervals(test_df["prediction"])
    young = test_df["age"] < 20
    assert np.mean(hi - lo, where=young.to_numpy()) < 2 * q < np.mean(hi - lo, where=old.to_numpy())


def test_mondrian_by_a_column_fixes_a_planted_hard_group():
    rng = np.random.default_rng(5)

    def faces(n):
        hard = rng.random(n) < 0.2
        age = rng.uniform(20, 40, n)
        return pd.DataFrame(
            {
                "age": age,
                "prediction": age + rng.normal(0, 1, n) * np.where(hard, 6.0, 2.0),
                "site": np.where(hard, "hard", "easy"),
            }
        )

    cal_df, test_df = faces(3000), faces(20000)
    q = brentq(
        lambda q: 0.8 * (2 * norm.cdf(q / 2) - 1) + 0.2 * (2 * norm.cdf(q / 6) - 1) - 0.9,
        0.01,
        50,
    )
    expected_hard = 2 * norm.cdf(q / 6) - 1  # about 0.65
    plain, _ = fit_calibration(cal_df, ALPHA, by=[])
    mondrian, _ = fit_calibration(cal_df, ALPHA, by=["site"])
    hard = test_df["site"] == "hard"
    plain_cov = _coverage(test_df, *plain.intervals(test_df["prediction"]))
    mond_cov = _coverage(test_df, *mondrian.intervals(test_df["prediction"], test_df))
    n_hard, n_cal_hard = int(hard.sum()), int((cal_df["site"] == "hard").sum())
    assert abs(plain_cov[hard].mean() - expected_hard) < binomial_limit(n_hard, n_cal_hard, expected_hard)
    assert plain_cov[hard].mean() < 0.8
    for mask, n_cal in ((hard, n_cal_hard), (~hard, len(cal_df) - n_cal_hard)):
        assert abs(mond_cov[mask].mean() - 0.9) < binomial_limit(int(mask.sum()), n_cal)
    # a face whose site is not known gets the wider (hard) interval, which covers either group
    lo, hi = mondrian.intervals([30.0])
    assert hi[0] - lo[0] == pytest.approx(2 * mondrian.groups["hard"].quantile)


def _order_statistic(residuals: np.ndarray, alpha: float) -> float:
    """Split conformal quantile by hand: the ceil((n + 1)(1 - alpha))-th smallest |residual|."""
    k = math.ceil((len(residuals) + 1) * (1 - alpha))
    return float(np.sort(residuals)[k - 1])


def test_tiny_groups_fall_back_to_their_parent_with_a_warning():
    rng = np.random.default_rng(3)
    age = np.r_[rng.uniform(20, 40, 95), rng.uniform(60, 80, 95)]
    gender = np.r_[["male"] * 95, ["male"] * 92, ["female"] * 3]
    pred = age + rng.normal(0, 3, age.size)
    df = pd.DataFrame({"age": age, "prediction": pred, "gender": gender})
    with pytest.warns(UserWarning, match=r"\[60,inf\)\|female \(n=3\)") as record:
        cal, notes = fit_calibration(df, ALPHA, by=["age", "gender"])
    assert any("[0,20) (n=0)" in str(w.message) for w in record)  # no faces: the plain quantile
    assert len(notes) == 2
    residuals = np.abs(pred - age)
    old = age >= 60
    assert cal.plain == pytest.approx(_order_statistic(residuals, ALPHA))
    assert cal.levels["age"]["[60,inf)"].quantile == pytest.approx(_order_statistic(residuals[old], ALPHA))
    assert cal.groups["[60,inf)|female"].quantile == cal.levels["age"]["[60,inf)"].quantile
    assert cal.groups["[60,inf)|female"].fallback == "[60,inf)"
    assert cal.groups["[60,inf)|male"].fallback is None
    split = cal.groups["[60,inf)|male"].split_quantile
    assert split == pytest.approx(_order_statistic(residuals[old & (gender == "male")], ALPHA))
    assert cal.groups["[60,inf)|male"].quantile <= split  # the hull's tightening only lowers it
    # a group empty at both levels ends at the plain quantile
    assert cal.groups["[0,20)|female"].quantile == cal.plain
    assert cal.groups["[0,20)|female"].fallback == "all"
    # min_group raises the bar: 92 faces are then too few too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict, _ = fit_calibration(df, ALPHA, by=["age", "gender"], min_group=93)
    assert strict.groups["[60,inf)|male"].fallback == "[60,inf)"
    with pytest.raises(DataError, match="at least 10 faces"):
        fit_calibration(df.iloc[:9], ALPHA, by=[])


def test_label_conditional_interval_by_hand():
    # quantiles 2 for [0,20) and 10 for [20,inf) (set by hand): a face predicted 19 can be a
    # child of 17..20 or an adult of 20..29, so its interval is [17, 29]
    cal = Calibration(
        alpha=0.1,
        by=["age"],
        age_edges=[20.0],
        n=100,
        plain=5.0,
        values={"age": ["[0,20)", "[20,inf)"]},
    )
    from fairage.fairness.conformal import GroupQuantile

    cal.levels = {"age": {"[0,20)": GroupQuantile(50, 2.0), "[20,inf)": GroupQuantile(50, 10.0)}}
    lo, hi = cal.intervals([19.0, 5.0, 40.0, 1.0])
    np.testing.assert_allclose(lo, [17.0, 3.0, 30.0, 0.0])  # 1 - 2 clipped at age 0
    np.testing.assert_allclose(hi, [29.0, 7.0, 50.0, 3.0])


def test_calibration_file_round_trip_and_damage(tmp_path):
    cal, _ = fit_calibration(_aged_faces(500, seed=4), ALPHA, by=["age", "gender"])
    path = write_calibration(tmp_path / "conformal.json", cal)
    back = read_calibration(path)
    np.testing.assert_array_equal(back.intervals([10.0, 70.0])[1], cal.intervals([10.0, 70.0])[1])
    assert back.to_json() == cal.to_json()
    raw = json.loads(path.read_text())
    assert raw["level"] == pytest.approx(0.9) and raw["by"] == ["age", "gender"]
    assert set(raw["groups"]["[0,20)|male"]) == {
        "n",
        "quantile",
        "fallback",
        "split_quantile",
    }
    assert read_calibration(tmp_path / "absent.json") is None
    del raw["groups"]
    raw["levels"]["age|gender"].pop("[0,20)|male")
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"conformal.json.*\[0,20\)\|male"):
        read_calibration(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_calibration(path)


def test_predictions_file_carries_intervals(tmp_path):
    faces = pd.DataFrame({"image": ["a", "b"], "age": [10.0, 50.0], "gender": ["male", "female"]})
    path = tmp_path / "p.csv"
    write_predictions(path, faces, [12.0, 44.0], intervals=([9.5, 40.0], [14.5, 48.0]))
    assert path.read_text().splitlines()[0] == "image,prediction,age_lo,age_hi,age,gender"
    table = read_predictions(path)
    joined = join_predictions(faces, table, path)
    assert joined["age_lo"].tolist() == [9.5, 40.0] and joined["age_hi"].tolist() == [
        14.5,
        48.0,
    ]
    path.write_text("image,prediction,age_lo,age_hi\na,12,9.5,14.5\nb,44,48,40\n")
    with pytest.raises(DataError, match=r"p.csv: row 3 \(image b\): interval \[48.*, 40.*\]"):
        read_predictions(path)
    path.write_text("image,prediction,age_lo\na,12,9.5\n")
    with pytest.raises(DataError, match="not age_hi"):
        read_predictions(path)


def test_coverage_metrics_by_hand():
    # 6 faces, two genders; covered: m yes, m yes, m no | f yes, f no, f no
    df = pd.DataFrame(
        {
            "age": [10, 20, 30, 40, 50, 60.0],
            "prediction": [10, 21, 20, 40, 60, 70.0],
            "gender": ["male"] * 3 + ["female"] * 3,
            "age_lo": [8, 18, 21, 38, 55, 61.0],
            "age_hi": [12, 24, 29, 42, 65, 75.0],
        }
    )
    result = evaluate(df, attributes=["gender"], n_boot=200, n_perm=50, target=0.9)
    cov = result.coverage["conformal"]
    assert cov.total.coverage == pytest.approx(3 / 6)
    assert cov.total.width == pytest.approx(np.mean([4, 6, 8, 4, 10, 14]))
    assert cov.groups["gender"]["male"].coverage == pytest.approx(2 / 3)
    assert cov.groups["gender"]["female"].coverage == pytest.approx(1 / 3)
    assert cov.groups["gender"]["female"].width == pytest.approx(28 / 3)
    assert cov.gap["gender"] == pytest.approx(1 / 3)
    lo, hi = cov.total.coverage_ci
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert 0 < cov.gap_p["gender"] <= 1
    assert cov.worst("gender")[0] == "female"
    raw = json.loads(json.dumps(result.to_json()))
    assert raw["coverage"]["conformal"]["groups"]["gender"]["male"]["n"] == 3 and raw["coverage_target"] == 0.9
    back = EvaluationResult.from_json(raw)
    assert back.coverage["conformal"].gap == cov.gap and back.coverage_target == 0.9
    # a metrics file written before intervals existed still reads, without coverage
    del raw["coverage"], raw["coverage_target"]
    old = EvaluationResult.from_json(raw)
    assert old.coverage == {} and old.coverage_target is None
    assert "coverage" not in evaluate(df.drop(columns=["age_lo", "age_hi"]), attributes=["gender"], n_boot=0).to_json()


def test_interval_arguments_score_mondrian_and_plain_side_by_side():
    cal_df, test_df = _aged_faces(2000, seed=6), _aged_faces(4000, seed=7)
    cal, _ = fit_calibration(cal_df, ALPHA, by=["age"])
    result = evaluate(test_df, attributes=["age"], n_boot=0, **interval_arguments(cal, test_df))
    assert set(result.coverage) == {
        "conformal",
        "plain",
    } and result.coverage_target == pytest.approx(0.9)
    groups = result.coverage["conformal"].groups["age"]
    plain = result.coverage["plain"].groups["age"]
    assert min(g.coverage for g in groups.values()) > plain["[60,inf)"].coverage
    assert result.coverage["conformal"].gap["age"] < result.coverage["plain"].gap["age"]


def test_compare_reports_coverage_width_and_gap_differences():
    from fairage.fairness.metrics import compare

    df_a = pd.DataFrame(
        {
            "image": list("abcd"),
            "age": [10, 20, 30, 40.0],
            "prediction": [11, 19, 33, 40.0],
            "gender": ["male", "male", "female", "female"],
            "age_lo": [0, 10, 20, 30.0],
            "age_hi": [20, 30, 40, 50.0],
        }
    )
    # B in another row order: covers a, b, d (not c: 30 outside [31, 35]); widths 2, 2, 4, 2
    df_b = pd.DataFrame(
        {
            "image": list("dcba"),
            "prediction": [41, 33, 19, 11.0],
            "age_lo": [39, 31, 18, 9.0],
            "age_hi": [41, 35, 20, 11.0],
        }
    )
    result = compare(df_a, df_b, attributes=["gender"], n_boot=100)
    a, b, d = result.intervals["coverage"]
    assert (a, b) == (1.0, pytest.approx(0.75)) and d.estimate == pytest.approx(-0.25)
    assert result.intervals["width"][:2] == (20.0, pytest.approx(2.5))
    # gender coverage: A 1 and 1 (gap 0); B male 1, female 1/2 (gap 1/2)
    gap = result.intervals["gender coverage gap"]
    assert gap[0] == 0.0 and gap[1] == pytest.approx(0.5)
    raw = result.to_json()
    assert raw["b"]["intervals"]["coverage"] == pytest.approx(0.75)
    assert raw["diff"]["intervals"]["width"]["estimate"] == pytest.approx(-17.5)
    assert [r[0] for r in result.rows()][-3:] == [
        "coverage",
        "width",
        "gender coverage gap",
    ]
    assert compare(df_a, df_b.drop(columns=["age_lo"]), attributes=["gender"], n_boot=0).intervals == {}


def test_coverage_per_intersection():
    df = pd.DataFrame(
        {
            "age": [10, 12, 30, 35, 50.0],
            "prediction": [10, 12, 30, 35, 50.0],
            "gender": ["male", "female", "male", "male", "unknown"],
            "age_lo": [9, 13, 29, 30, 40.0],
            "age_hi": [11, 14, 31, 40, 60.0],
        }
    )
    result = evaluate(df, attributes=[], intersections=[["age", "gender"]], n_boot=0)
    groups = result.coverage["conformal"].groups["age*gender"]
    # the unknown-gender face is left out; [20,40) & female has no faces and is not listed
    assert list(groups) == ["[0,20) & male", "[0,20) & female", "[20,40) & male"]
    assert [g.coverage for g in groups.values()] == [1.0, 0.0, 1.0]
    assert [g.n for g in groups.values()] == [1, 1, 2]
    assert result.coverage["conformal"].gap["age*gender"] == pytest.approx(2 / 3)  # pairs: 1, 0, 1


def _gappy_faces(n: int, seed: int) -> pd.DataFrame:
    """Ages over 0-80 with accurate predictions in [0,20) and [40,60) (sd 1) between inaccurate
    ones (sd 8): the wide neighbours' pieces reach into the accurate bins."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(0, 80, n)
    sd = np.select([age < 20, age < 40, age < 60], [1.0, 8.0, 1.0], 8.0)
    return pd.DataFrame({"age": age, "prediction": np.clip(age + rng.normal(0, 1, n) * sd, 0, 150)})


def test_tightened_hull_covers_each_age_group_near_the_target():
    cal_df, test_df = _gappy_faces(10000, seed=1), _gappy_faces(40000, seed=2)
    bins = pd.cut(test_df["age"], [0, 20, 40, 60, np.inf], right=False)
    cal_bins = pd.cut(cal_df["age"], [0, 20, 40, 60, np.inf], right=False)
    loose, _ = fit_calibration(cal_df, ALPHA, by=["age"], tighten=False)
    tight, _ = fit_calibration(cal_df, ALPHA, by=["age"])
    assert tight.tightened and not loose.tightened
    loose_cov = _coverage(test_df, *loose.intervals(test_df["prediction"])).groupby(bins, observed=True).mean()
    tight_cov = _coverage(test_df, *tight.intervals(test_df["prediction"])).groupby(bins, observed=True).mean()
    limits = {g: binomial_limit(int((bins == g).sum()), int((cal_bins == g).sum())) for g in loose_cov.index}
    # without tightening, the hull over-covers the accurate [40,60) bin well beyond sampling noise
    g40 = loose_cov.index[2]
    assert loose_cov[g40] - 0.9 > limits[g40]
    for g in tight_cov.index:
        assert abs(tight_cov[g] - 0.9) < limits[g], (g, tight_cov[g])
    residuals = np.abs(cal_df["prediction"] - cal_df["age"]).to_numpy()
    for (name, group), interval in zip(tight.groups.items(), cal_bins.cat.categories):
        assert group.quantile <= group.split_quantile == loose.groups[name].quantile
        # never below the group's own 80% quantile
        assert group.quantile >= _order_statistic(residuals[(cal_bins == interval).to_numpy()], 2 * ALPHA)


def test_training_goes_on_without_intervals_when_the_valid_split_is_tiny(tmp_path):
    from fairage.config.presets import load_preset
    from fairage.store.run_folder import RunFolder
    from fairage.training.run import calibrate

    cfg = load_preset("M1", "tiny")
    folder = RunFolder(tmp_path)
    faces = pd.DataFrame({"age": [10.0, 20, 30, 40], "image": list("abcd")})
    calibration, notes = calibrate(cfg, faces, np.array([11.0, 19, 33, 40]), folder)
    assert calibration is None and notes == [
        "no age intervals: the valid split has 4 faces, fewer than the 10 a 90% interval needs"
    ]
    assert not (tmp_path / RunFolder.CONFORMAL).exists()


def test_training_goes_on_without_intervals_when_a_group_is_never_known(tmp_path):
    from fairage.config.presets import load_preset
    from fairage.store.run_folder import RunFolder
    from fairage.training.run import calibrate

    cfg = load_preset("M1", "tiny", ["eval.conformal.by=[site]"])
    faces = pd.DataFrame({"age": np.arange(20.0), "site": ["unknown"] * 20})
    calibration, notes = calibrate(cfg, faces, np.arange(20.0) + 1, RunFolder(tmp_path))
    assert calibration is None
    assert notes == [
        "no age intervals: calibration: no face has a known 'site' (all unknown), so it cannot group by it"
    ]
