"""Sample weighting: exact weights on hand-built tables, LDS, loss and sampler."""

import numpy as np
import pandas as pd
import pytest
import torch

from fairage.config.schema import WeightingConfig as W
from fairage.errors import ConfigError
from fairage.fairness.weighting import (
    compute_weights,
    describe,
    dominant_groups_per_face,
    face_group_names,
    group_table,
    lds_weights,
    make_sampler,
    summarize_weights,
)
from fairage.models.losses import weighted_loss


@pytest.fixture
def faces():
    # 10 faces: ages by bin [0,20):2, [20,40):5, [40,60):1, [60,inf):2
    return pd.DataFrame(
        {
            "age": [5, 19.9, 20, 25, 30, 35, 39, 45, 60, 88],
            "ethnicity": [
                "asian",
                "caucasian",
                "caucasian",
                "caucasian",
                "asian",
                "caucasian",
                "afroamerican",
                "caucasian",
                "asian",
                "caucasian",
            ],
            "expression": [
                "happy",
                "neutral",
                "neutral",
                "happy",
                "other",
                "neutral",
                "slightlyhappy",
                "neutral",
                "happy",
                "neutral",
            ],
            "gender": ["male", "female"] * 5,
        }
    )


def test_none_is_all_ones(faces):
    assert np.array_equal(compute_weights(faces, W()), np.ones(10))
    assert set(face_group_names(faces, W())) == {"all"}


def test_age_inverse_matches_report_formula(faces):
    w = compute_weights(faces, W(scheme="age"))
    # N/(K n_j) with N=10, K=4: [0,20) 10/8, [20,40) 10/20, [40,60) 10/4, [60,inf) 10/8
    expected = [1.25, 1.25, 0.5, 0.5, 0.5, 0.5, 0.5, 2.5, 1.25, 1.25]
    assert np.allclose(w, expected)
    assert w.mean() == pytest.approx(1.0)


def test_age_bins_closed_on_left(faces):
    labels = list(face_group_names(faces, W(scheme="age")))
    assert labels[1] == "[0,20)" and labels[2] == "[20,40)" and labels[8] == "[60,inf)"


def test_age_ethnicity_ten_groups_merge_old(faces):
    labels = face_group_names(faces, W(scheme="age_ethnicity"))
    assert labels[8] == "[60,inf)" and labels[9] == "[60,inf)"  # asian and caucasian merged
    table = group_table(faces, W(scheme="age_ethnicity"))
    assert len(table) == 10
    # non-empty groups: [0,20)|asian 1, [0,20)|caucasian 1, [20,40)|caucasian 3, [20,40)|asian 1,
    # [20,40)|afroamerican 1, [40,60)|caucasian 1, [60,inf) 2 -> K = 7
    w = compute_weights(faces, W(scheme="age_ethnicity"))
    k = 7
    assert w[0] == pytest.approx(10 / (k * 1))
    assert w[2] == pytest.approx(10 / (k * 3))
    assert w[9] == pytest.approx(10 / (k * 2))
    empty = table[table["n"] == 0]
    assert len(empty) == 3 and empty["weight"].isna().all() and (empty["share"] == 0).all()
    assert table["share"].sum() == pytest.approx(1.0)
    # every non-empty group carries the same share under the inverse formula
    assert np.allclose(table.loc[table["n"] > 0, "share"], 1 / 7)


def test_custom_scheme_reproduces_ten_groups(faces):
    old = "[60,inf)"
    custom = W(
        scheme="custom",
        attributes=["age", "ethnicity"],
        merges={old: [f"{old}|asian", f"{old}|afroamerican", f"{old}|caucasian"]},
    )
    assert list(face_group_names(faces, custom)) == list(face_group_names(faces, W(scheme="age_ethnicity")))
    assert np.allclose(compute_weights(faces, custom), compute_weights(faces, W(scheme="age_ethnicity")))


def test_custom_bins_and_attribute(faces):
    cfg = W(scheme="custom", attributes=["age", "gender"], age_edges=[30])
    labels = face_group_names(faces, cfg)
    assert labels[0] == "[0,30)|male" and labels[9] == "[30,inf)|female"


def test_48_groups(faces):
    table = group_table(faces, W(scheme="age_ethnicity_expression"))
    assert len(table) == 48
    # 9 distinct non-empty groups among these 10 faces ([20,40)|caucasian|neutral has 2)
    assert (table["n"] > 0).sum() == 9
    w = compute_weights(faces, W(scheme="age_ethnicity_expression"))
    assert w[2] == pytest.approx(10 / (9 * 2)) and w[0] == pytest.approx(10 / 9)


def test_sqrt_inverse_and_effective_number(faces):
    w = compute_weights(faces, W(scheme="age", formula="sqrt_inverse"))
    raw = np.array([2, 2, 5, 5, 5, 5, 5, 1, 2, 2], dtype=float) ** -0.5
    assert np.allclose(w, raw / raw.mean())
    beta = 0.9
    w = compute_weights(faces, W(scheme="age", formula="effective_number", beta=beta))
    n = np.array([2, 2, 5, 5, 5, 5, 5, 1, 2, 2], dtype=float)
    raw = (1 - beta) / (1 - beta**n)
    assert np.allclose(w, raw / raw.mean())


def test_pseudo_count(faces):
    w = compute_weights(faces, W(scheme="age", pseudo_count=1))
    raw = 10 / (4 * (np.array([2, 2, 5, 5, 5, 5, 5, 1, 2, 2]) + 1.0))
    assert np.allclose(w, raw / raw.mean())  # differs from the report's raw weights by one factor
    assert not np.allclose(w, raw)


def test_max_weight_clips_and_keeps_mean_one(faces):
    w = compute_weights(faces, W(scheme="age", max_weight=2.0))
    assert w.max() == pytest.approx(2.0)
    assert w.mean() == pytest.approx(1.0)
    # the 40-60 face is clipped to 2; the other 9 faces share 8 in their original ratios
    free = np.array([1.25, 1.25, 0.5, 0.5, 0.5, 0.5, 0.5, 1.25, 1.25])
    assert np.allclose(np.delete(w, 7), free * 8 / free.sum())
    # clipping repeats until stable: at 1.3 the rescaled 1.25-faces (1.45) are clipped in a
    # second round, so the five clipped faces hold 6.5 and the five 0.5-faces share 3.5
    w = compute_weights(faces, W(scheme="age", max_weight=1.3))
    assert np.allclose(w, [1.3, 1.3, 0.7, 0.7, 0.7, 0.7, 0.7, 1.3, 1.3, 1.3])
    with pytest.raises(ConfigError):
        compute_weights(faces, W(scheme="age", max_weight=0.5))


def test_lds_against_direct_numpy():
    ages = np.array([20.2, 20.7, 21.5, 22.0, 30.0, 30.9, 55.0])
    # kernel as in Yang et al.'s get_lds_kernel_window: a filtered 5-tap delta over its max
    from scipy.ndimage import gaussian_filter1d

    k = gaussian_filter1d(np.eye(5)[2], 2.0)
    k = k / k.max()
    hist = np.zeros(56)
    for a in ages:
        hist[int(a)] += 1
    smooth = np.array([sum(hist[j] * k[i - j + 2] for j in range(56) if abs(i - j) <= 2) for i in range(56)])
    expected = 1 / smooth[ages.astype(int)]
    assert np.allclose(lds_weights(ages, 5, 2.0), expected)
    # combined with a group scheme: product, then mean 1
    faces = pd.DataFrame({"age": ages, "ethnicity": ["asian"] * 7})
    w = compute_weights(faces, W(scheme="age", lds=True))
    group = 7 / (2 * np.array([6, 6, 6, 6, 6, 6, 1.0]))  # N/(K n_j): 6 faces in [20,40), 1 in [40,60)
    prod = group * expected
    assert np.allclose(w, prod / prod.mean())


def test_unknown_values_form_their_own_group():
    faces = pd.DataFrame({"age": [30, 30, 30], "ethnicity": ["asian", "unknown", "asian"]})
    labels = list(face_group_names(faces, W(scheme="age_ethnicity")))
    assert labels == ["[20,40)|asian", "[20,40)|unknown", "[20,40)|asian"]


def test_bad_custom_config_names_the_key(faces):
    with pytest.raises(ConfigError, match="makeup"):
        compute_weights(faces, W(scheme="custom", attributes=["makeup"]))
    with pytest.raises(ConfigError, match="nonexistent"):
        compute_weights(faces, W(scheme="custom", attributes=["age"], merges={"x": ["nonexistent"]}))
    with pytest.raises(ConfigError):
        compute_weights(faces, W(scheme="custom"))


def test_weighted_loss_matches_hand_computation():
    pred = torch.tensor([0.2, 0.5, 0.9])
    target = torch.tensor([0.4, 0.5, 0.3])
    weight = torch.tensor([2.0, 1.0, 0.5])
    # mse per face: 0.04, 0, 0.36 -> (0.08 + 0 + 0.18) / 3
    assert weighted_loss(pred, target, weight, "mse").item() == pytest.approx(0.26 / 3)
    # mae per face: 0.2, 0, 0.6 -> (0.4 + 0.3) / 3
    assert weighted_loss(pred, target, weight, "mae").item() == pytest.approx(0.7 / 3)
    # huber delta 0.5: 0.5*0.04=0.02 ; 0 ; 0.5*(0.6-0.25)=0.175 -> (0.04 + 0.0875)/3
    assert weighted_loss(pred, target, weight, "huber", 0.5).item() == pytest.approx(0.1275 / 3)
    assert weighted_loss(pred, target, None, "mse").item() == pytest.approx(0.4 / 3)
    assert weighted_loss(pred.view(3, 1), target, torch.ones(3), "mse").item() == pytest.approx(0.4 / 3)


def test_sampler_balances_groups(faces):
    w = compute_weights(faces, W(scheme="age"))
    sampler = make_sampler(w, num_samples=40000, seed=3)
    draws = np.array(list(sampler))
    groups = face_group_names(faces, W(scheme="age")).to_numpy()[draws]
    freq = pd.Series(groups).value_counts(normalize=True)
    assert np.allclose(freq.to_numpy(), 0.25, atol=0.01)
    again = np.array(list(make_sampler(w, num_samples=100, seed=3)))
    assert np.array_equal(again, np.array(list(make_sampler(w, num_samples=100, seed=3))))


def test_dominant_group_warning_and_describe(faces):
    summary = summarize_weights(faces, W(scheme="age"))
    # one face in [40,60) carries 2.5/10 = 25% of all weight
    assert "[40,60)" in summary.heavy
    assert (
        summary.warnings[summary.heavy.index("[40,60)")]
        == "group '[40,60)': one face carries more than 1% of all weight"
    )
    assert describe(W(scheme="age_ethnicity", lds=True, mode="sampler")) == "age_ethnicity/inverse x LDS (sampler)"
    assert describe(W()) == "none"


def test_dominance_per_face_sees_one_heavy_face_inside_a_group():
    labels = pd.Series(["a"] * 60 + ["b"] * 40)
    # group a: mean weight 1.0 but one face holds 2 of 100 total (2%); group b: all 0.5% each
    weights = np.array([2.0] + [58 / 59] * 59 + [1.0] * 40)
    assert weights.sum() == pytest.approx(100.0)
    assert dominant_groups_per_face(labels, weights) == ["a"]
    assert dominant_groups_per_face(labels, np.ones(100)) == []  # 1% exactly is not more than 1%
