"""Groups from the data (any attribute, any values, intersections), the field's metrics, and
training that stops when its predictions collapse."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import invoke, tiny_config_file, tiny_synthetic
from PIL import Image

from fairage.config.presets import load_preset
from fairage.config.schema import WeightingConfig
from fairage.data import load_faces
from fairage.data.schema import attribute_columns
from fairage.errors import FairageError
from fairage.fairness.metrics import compare, epsilon_errors, evaluate
from fairage.fairness.weighting import face_group_names


def _table(rows):
    """A prediction table from (age, prediction, **attributes) dicts."""
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- metrics, hand-worked


def five_group_table() -> pd.DataFrame:
    # skin_tone groups A..E with absolute errors 1, 2, 3, 4, 5 (two faces each)
    rows = []
    for k, tone in enumerate("ABCDE"):
        for _ in range(2):
            rows.append({"age": 30.0, "prediction": 30.0 + (k + 1), "skin_tone": tone})
    return _table(rows)


def test_bias_over_five_groups_of_a_custom_attribute():
    result = evaluate(five_group_table(), attributes=["skin_tone"], n_boot=0, min_group=1)
    # pairs of (1..5): differences 1 x4, 2 x3, 3 x2, 4 x1 -> (4 + 6 + 6 + 4) / 10 = 2.0
    assert result.bias["skin_tone"] == pytest.approx(2.0)
    assert list(result.groups["skin_tone"]) == ["A", "B", "C", "D", "E"]
    assert result.worst_group["skin_tone"].group == "E" and result.worst_group["skin_tone"].mae == pytest.approx(5)
    # population std of 1..5 = sqrt(2)
    assert result.group_mae_std["skin_tone"].value == pytest.approx(math.sqrt(2))


def intersection_table() -> pd.DataFrame:
    rows = [
        # young asian: errors 1, 1, 1 (3 faces); young caucasian: 3, 3, 3 (3 faces)
        *[{"age": 10.0, "prediction": 11.0, "ethnicity": "asian", "gender": "male"}] * 3,
        *[{"age": 10.0, "prediction": 13.0, "ethnicity": "caucasian", "gender": "female"}] * 3,
        # old asian: errors 5, 5 (2 faces); one old caucasian: error 9 (a small cell)
        *[{"age": 70.0, "prediction": 65.0, "ethnicity": "asian", "gender": "female"}] * 2,
        {"age": 70.0, "prediction": 79.0, "ethnicity": "caucasian", "gender": "male"},
    ]
    return _table(rows)


def test_intersection_cells_bias_and_small_cell_flag():
    df = intersection_table()
    result = evaluate(
        df,
        attributes=["age", "ethnicity"],
        intersections=[["age", "ethnicity"]],
        n_boot=0,
        min_group=2,
        age_edges=(20, 40, 60),
    )
    cells = result.groups["age*ethnicity"]
    assert {g: (s.n, s.mae) for g, s in cells.items()} == {
        "[0,20) & asian": (3, 1.0),
        "[0,20) & caucasian": (3, 3.0),
        "[60,inf) & asian": (2, 5.0),
        "[60,inf) & caucasian": (1, 9.0),
    }
    # the four cell MAEs 1, 3, 5, 9: pairs 2 4 8 2 6 4 -> 26 / 6
    assert result.bias["age*ethnicity"] == pytest.approx(26 / 6)
    assert result.small_groups["age*ethnicity"] == ["[60,inf) & caucasian"]
    # the one-face cell is flagged and left out of the worst group
    assert result.worst_group["age*ethnicity"].group == "[60,inf) & asian"
    assert result.intersections == ["age*ethnicity"]
    assert "age*ethnicity" in result.to_json()["bias"]


def test_field_metrics_against_hand_worked_values():
    ages = np.array([10.0, 20.0, 30.0, 40.0])
    preds = np.array([12.0, 20.0, 37.0, 45.0])  # errors 2, 0, 7, 5
    std = np.array([2.0, 1.0, 7.0, np.nan])
    df = pd.DataFrame({"age": ages, "prediction": preds, "age_std": std, "gender": ["male", "female"] * 2})
    result = evaluate(df, attributes=["gender"], n_boot=0, min_group=1, cs_k=(5, 1), age_bin_edges=(13, 35))
    assert result.cs["5"].value == pytest.approx(3 / 4)  # |e| <= 5: 2, 0, 5
    assert result.cs["1"].value == pytest.approx(1 / 4)
    # (2/2)^2 / 2 = 0.5 -> 1 - e^-0.5; 0 -> 0; (7/7)^2 / 2 -> 1 - e^-0.5; the face without std is left out
    expected = (2 * (1 - math.exp(-0.5)) + 0.0) / 3
    assert result.epsilon_error.value == pytest.approx(expected)
    # gender: male errors 2, 7 -> 4.5 ; female 0, 5 -> 2.5
    assert result.worst_group["gender"].group == "male" and result.worst_group["gender"].mae == pytest.approx(4.5)
    assert result.group_mae_std["gender"].value == pytest.approx(1.0)
    assert {g: s.mae for g, s in result.age_bins.items()} == {"[0,13)": 2.0, "[13,35)": 3.5, "[35,inf)": 5.0}
    assert np.isnan(epsilon_errors([1.0], [1.0], [0.0])[0])  # no raters' spread: not scored


def test_field_metrics_intervals_and_json_round_trip():
    from fairage.fairness.metrics import EvaluationResult

    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame(
        {
            "age": rng.uniform(1, 80, n),
            "gender": rng.choice(["male", "female"], n),
            "ethnicity": rng.choice(["a", "b", "c", "d", "e"], n),
        }
    )
    df["prediction"] = df["age"] + rng.normal(0, 5, n)
    result = evaluate(
        df, attributes=["age", "gender", "ethnicity"], intersections=[["gender", "ethnicity"]], n_boot=200, seed=1
    )
    lo, hi = result.cs["5"].ci
    assert lo <= result.cs["5"].value <= hi
    lo, hi = result.worst_group["ethnicity"].ci
    assert lo <= result.worst_group["ethnicity"].mae + 1e-9 and hi > lo
    again = EvaluationResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.to_json() == result.to_json()
    # a metrics file of an older fairage (no field metrics) still reads
    old = {k: v for k, v in result.to_json().items() if k in ("n", "mae", "mae_ci", "bias", "groups")}
    assert EvaluationResult.from_json(old).cs == {}


def test_compare_reports_cs_and_worst_group_differences():
    df = intersection_table()
    df["image"] = [f"{k}.jpg" for k in range(len(df))]
    better = df.copy()
    better["prediction"] = better["age"]  # B is exact
    result = compare(df, better, attributes=["ethnicity"], n_boot=50, min_group=1)
    # A: errors 1,1,1,3,3,3,5,5,9 -> 4 of 9 within 1... within 5: all but the 9 -> 8/9
    assert result.cs_a["5"] == pytest.approx(8 / 9) and result.cs_b["5"] == pytest.approx(1.0)
    # A's worst ethnicity: caucasian (3+3+3+9)/4 = 4.5; B's: 0
    assert result.worst_a["ethnicity"] == pytest.approx(4.5) and result.worst_b["ethnicity"] == pytest.approx(0)
    names = [row[0] for row in result.field_rows()]
    assert names == ["CS@5", "ethnicity worst-group MAE"]


# --------------------------------------------------------------------------- groups from the data


def _write_image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 40, 90)).save(path)


def test_utkface_with_all_five_race_codes_loads_and_scores_every_value(tmp_path):
    root = tmp_path / "utk"
    names = [f"{20 + k}_{k % 2}_{k % 5}_2017{k:04d}.jpg.chip.jpg" for k in range(40)]
    for k, name in enumerate(names):
        _write_image(root / name, k)
    faces = load_faces(root)
    assert set(faces["ethnicity"]) == {"caucasian", "afroamerican", "asian", "indian", "others"}
    df = faces.copy()
    df["prediction"] = df["age"] + 1.0
    result = evaluate(df, n_boot=0)
    assert list(result.groups["ethnicity"]) == ["asian", "afroamerican", "caucasian", "indian", "others"]
    res = invoke("data", "info", root, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (
        sum(sum(info["splits"][s]["ethnicity"].get(e, 0) for s in info["splits"]) for e in ("indian", "others")) == 16
    )


def test_age_ethnicity_scheme_with_five_ethnicities_merges_every_old_group():
    eth = ["asian", "afroamerican", "caucasian", "indian", "others"]
    faces = pd.DataFrame({"age": [10.0, 30.0, 50.0, 70.0] * 5, "ethnicity": [e for e in eth for _ in range(4)]})
    names = face_group_names(faces, WeightingConfig(scheme="age_ethnicity"))
    # 3 bins below 60 x 5 ethnicities, plus one group for everyone aged 60 or more
    assert names.nunique() == 16
    assert set(names[faces["age"] >= 60]) == {"[60,inf)"}
    assert names.iloc[0] == "[0,20)|asian"


def test_attribute_columns_finds_further_categorical_columns():
    faces = pd.DataFrame(
        {
            "image": ["a"],
            "age": [3.0],
            "gender": ["male"],
            "ethnicity": ["x"],
            "expression": ["unknown"],
            "split": ["train"],
            "path": ["/p"],
            "frame": [-1],
            "age_std": [1.0],
            "skin_tone": ["III"],
        }
    )
    assert attribute_columns(faces) == ["gender", "ethnicity", "expression", "skin_tone"]


def test_csv_dataset_with_a_six_valued_attribute_trains_and_evaluates(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "csv"
    rows = []
    for k in range(60):
        age = float(rng.uniform(5, 80))
        name = f"img/{k}.png"
        _write_image(root / name, int(age * 3))
        rows.append(
            {
                "image": name,
                "age": age,
                "gender": ["male", "female"][k % 2],
                "ethnicity": ["w", "x", "y", "z"][k % 4],
                "skin_tone": f"type{k % 6 + 1}",
                "split": ["train", "train", "valid", "test"][k % 4] if k < 56 else "test",
            }
        )
    pd.DataFrame(rows).to_csv(root / "faces.csv", index=False)
    cfg = tiny_config_file(
        tmp_path, "M2", ["eval.attributes=[age,gender,ethnicity,skin_tone]", "eval.n_perm=0", "eval.min_group=2"]
    )
    res = invoke("train", "--config", cfg, "--data", root, "--out", tmp_path / "run", "--quiet")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "metrics_test.json").read_text())
    test = [r for r in rows if r["split"] == "test"]
    assert set(metrics["groups"]["skin_tone"]) == {r["skin_tone"] for r in test}
    assert metrics["bias"]["skin_tone"] is not None
    assert {"age*ethnicity", "gender*ethnicity"} <= set(metrics["bias"])


# --------------------------------------------------------------------------- collapse


def test_a_collapsing_second_stage_stops_and_the_model_is_the_first_stage(tmp_path, tiny_data):
    from fairage.store.run_folder import RunFolder
    from fairage.training import train

    # stage II at a learning rate of 50 saturates the sigmoid output in its first epoch
    cfg = load_preset("M3", "tiny", ["eval.n_boot=0", "eval.n_perm=0", "stage2.lr=50", "stage2.max_epochs=3"])
    train(cfg, tiny_data, tmp_path / "run", progress=False)
    folder = RunFolder.open(tmp_path / "run")
    record = folder.record
    assert "stage2" in record.collapsed_stages and "collapsed in epoch 1" in record.collapsed_stages["stage2"]
    assert record.completed_stages == ["stage1"]
    assert folder.best_checkpoint() == folder.checkpoint("stage1", "best")
    history = folder.history()
    assert len(history[history["stage"] == "stage2"]) == 1  # stopped after the epoch it happened in
    preds = pd.read_csv(folder.file(RunFolder.PREDICTIONS))["prediction"]
    assert preds.std() > 0.5  # stage I's model, not the collapsed one


def test_a_collapsing_single_stage_fails_with_one_line(tmp_path, tiny_data):
    from fairage.training import train

    cfg = load_preset("M1", "tiny", ["eval.n_boot=0", "stage2.lr=50", "stage2.max_epochs=3"])
    with pytest.raises(FairageError, match=r"stage2 collapsed in epoch 1: .*nearly constant"):
        train(cfg, tiny_data, tmp_path / "run", progress=False)


def test_suite_marks_a_collapsed_run_and_exits_1(tmp_path):
    data = tiny_synthetic(tmp_path / "data", n_train=48, n_valid=16, n_test=32)
    res = invoke(
        "suite",
        "--data",
        data,
        "--out",
        tmp_path / "suite",
        "--presets",
        "M2,M3",
        "--scale",
        "tiny",
        "--set",
        "stage2.lr=50",
        "--set",
        "eval.n_boot=0",
        "--set",
        "eval.n_perm=0",
        "--quiet",
    )
    assert res.exit_code == 1, res.output
    assert "collapsed" in res.output and "1 run(s) failed or collapsed" in res.output
    html = (tmp_path / "suite" / "report.html").read_text()
    assert "collapsed: stage2" in html
