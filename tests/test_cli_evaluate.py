"""CLI: fairage evaluate / compare / submit on a hand-written APPA-REAL-layout test split."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from conftest import invoke
from PIL import Image

AGES = [10, 15, 25, 30, 45, 50, 65, 70]
ERRORS = [1, -1, 2, -2, 3, -3, 4, -4]  # |error| per age group: 1, 2, 3, 4
NAMES = [f"{i:06d}.jpg" for i in range(len(AGES))]
GENDERS = ["male", "female"] * 4
RACES = ["asian"] * 4 + ["caucasian"] * 4
MAKEUP = ["makeup", "no_makeup", "no_makeup", "makeup", "makeup", "no_makeup", "no_makeup", "makeup"]


def run_folder(tmp_path, predictions, data_dir):
    """A finished run folder of a real config (M1 at tiny scale) with the given predictions file."""
    from fairage.config.files import dump_config
    from fairage.config.presets import load_preset

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_preset("M1", "tiny")))
    (run / "predictions_test.csv").write_text(predictions.read_text())
    (run / "run.json").write_text(json.dumps({"data_dir": str(data_dir), "status": "finished"}))
    return run


@pytest.fixture
def appa(tmp_path):
    """Test split of 8 faces in the APPA-REAL release layout (tiny JPEGs written with Pillow)."""
    root = tmp_path / "appa"
    (root / "test").mkdir(parents=True)
    gt = ["file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age"]
    cats = ["file,gender,race,makeup,time,happiness"]
    for name, age, gender, race, makeup in zip(NAMES, AGES, GENDERS, RACES, MAKEUP):
        gt.append(f"{name},10,{age},2.0,{age + 1}")
        cats.append(f"{name},{gender},{race},{makeup},01,neutral")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (age, 100, 150)).save(buf, format="JPEG")
        (root / "test" / f"{name}_face.jpg").write_bytes(buf.getvalue())
    (root / "gt_avg_test.csv").write_text("\n".join(gt) + "\n")
    (root / "allcategories_test.csv").write_text("\n".join(cats) + "\n")
    return root


def write_preds(path, rows):
    path.write_text("image,prediction\n" + "".join(f"{name},{pred}\n" for name, pred in rows))
    return path


@pytest.fixture
def preds(tmp_path):
    return write_preds(tmp_path / "a.csv", [(n, a + e) for n, a, e in zip(NAMES, AGES, ERRORS)])


def test_evaluate_json_has_exact_keys_and_hand_worked_values(appa, preds):
    res = invoke("evaluate", "--data", appa, "--split", "test", "--predictions", preds, "--json", "--n-boot", 200)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # exactly one JSON object on stdout
    assert {"n", "mae", "mae_ci", "bias", "bias_ci", "groups", "skipped_groups"} <= set(result)
    assert result["n"] == 8
    assert result["mae"] == pytest.approx(2.5)
    # the four attributes, then the default intersections (every column they need is present)
    assert list(result["bias"]) == ["age", "gender", "ethnicity", "expression", "age*ethnicity", "gender*ethnicity"]
    assert result["intersections"] == ["age*ethnicity", "gender*ethnicity"]
    # age groups 1, 2, 3, 4: pairs 1 2 3 1 2 1 -> 10 / 6
    assert result["bias"]["age"] == pytest.approx(10 / 6)
    assert result["bias"]["gender"] == pytest.approx(0.0)  # male 1,2,3,4 ; female 1,2,3,4
    assert result["bias"]["ethnicity"] == pytest.approx(2.0)  # asian 1.5 ; caucasian 3.5
    assert result["bias"]["expression"] is None and result["bias_ci"]["expression"] is None
    assert result["skipped_groups"]["expression"] == ["slightlyhappy", "happy", "other"]
    assert result["skipped_groups"]["ethnicity"] == ["afroamerican"]
    assert result["groups"]["age"] == {
        g: {"n": 2, "mae": float(m)} for g, m in zip(["[0,20)", "[20,40)", "[40,60)", "[60,inf)"], [1, 2, 3, 4])
    }
    lo, hi = result["mae_ci"]
    assert 1 <= lo <= 2.5 <= hi <= 4
    # equal gender MAEs: every relabelling gives a bias >= 0, so p = 1; no expression bias, no test
    assert result["n_perm"] == 1000
    assert result["bias_p"]["gender"] == 1.0 and result["bias_p"]["expression"] is None
    assert 0 < result["bias_p"]["age"] <= 1
    no_test = json.loads(
        invoke("evaluate", "--data", appa, "--predictions", preds, "--json", "--n-boot", 0, "--n-perm", 0).stdout
    )
    assert no_test["n_perm"] == 0 and set(no_test["bias_p"].values()) == {None}


def test_evaluate_human_output_and_custom_attribute(appa, preds):
    res = invoke(
        "evaluate",
        "--data",
        appa,
        "--predictions",
        preds,
        "--n-boot",
        50,
        "--attribute",
        "age",
        "--attribute",
        "makeup",
        "--age-edges",
        "40",
    )
    assert res.exit_code == 0, res.output
    assert "MAE 2.50" in res.output
    assert "[0,40)" in res.output and "[40,inf)" in res.output
    assert "no_makeup" in res.output
    # [0,40): 1,1,2,2 -> 1.5 ; [40,inf): 3,3,4,4 -> 3.5 ; makeup 1,2,3,4 vs 1,2,3,4 -> 0
    assert "age bias 2.00" in res.output
    assert "makeup bias 0.00" in res.output
    assert "permutation p = 1" in res.output.split("makeup bias")[1].splitlines()[0]


def test_evaluate_run_dir(appa, preds, tmp_path):
    run = run_folder(tmp_path, preds, appa)
    res = invoke("evaluate", run, "--json", "--n-boot", 20)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mae"] == pytest.approx(2.5)


def test_evaluate_missing_duplicate_and_extra_predictions_exit_2(appa, tmp_path):
    rows = [(n, 30.0) for n in NAMES[:6]] + [(NAMES[2], 31.0), ("nobody.jpg", 5.0)]
    bad = write_preds(tmp_path / "bad.csv", rows)
    res = invoke("evaluate", "--data", appa, "--predictions", bad, "--json")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "Traceback" not in res.output
    assert NAMES[6] in res.output and NAMES[7] in res.output  # missing
    assert "more than one prediction: 000002.jpg" in res.output
    assert "nobody.jpg" in res.output


def test_evaluate_bad_prediction_value_exit_2(appa, tmp_path):
    bad = write_preds(tmp_path / "nan.csv", [(n, "x" if i == 3 else 20) for i, n in enumerate(NAMES)])
    res = invoke("evaluate", "--data", appa, "--predictions", bad)
    assert res.exit_code == 2
    assert "nan.csv: row 5" in res.output


def test_compare_json_and_table(appa, preds, tmp_path):
    # B: the [60,inf) faces predicted exactly, everything else as A
    better = write_preds(tmp_path / "b.csv", [(n, a if a >= 60 else a + e) for n, a, e in zip(NAMES, AGES, ERRORS)])
    res = invoke("compare", preds, better, "--data", appa, "--json", "--n-boot", 100)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["diff"]["mae"]["estimate"] == pytest.approx(-1.0)  # 8 fewer error-years over 8 faces
    # B's age groups 1, 2, 3, 0: pairs 1 2 1 1 2 3 -> 10 / 6 ; same as A
    assert result["diff"]["bias"]["age"]["estimate"] == pytest.approx(0.0)
    assert result["diff"]["bias"]["expression"] is None
    res = invoke("compare", preds, better, "--data", appa, "--n-boot", 50)
    assert res.exit_code == 0, res.output
    assert "B - A" in res.output and "ethnicity bias" in res.output


def test_submit_round_trip_and_refusal(appa, tmp_path):
    shuffled = [(n, a + e) for n, a, e in zip(NAMES, AGES, ERRORS)][::-1]
    path = write_preds(tmp_path / "p.csv", shuffled)
    out = tmp_path / "sub" / "predictions.zip"
    res = invoke("submit", path, "--data", appa, "--out", out)
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(out) as archive:
        ages = np.loadtxt(io.StringIO(archive.read("predictions.csv").decode()))
    np.testing.assert_allclose(ages, np.array(AGES, float) + ERRORS)  # test order, not file order

    short = write_preds(tmp_path / "short.csv", shuffled[:-1])
    res = invoke("submit", short, "--data", appa, "--out", tmp_path / "x.zip")
    assert res.exit_code == 2
    assert "7 predictions but the test split has 8" in res.output
    assert not (tmp_path / "x.zip").exists()

    run = run_folder(tmp_path, path, appa)
    res = invoke("submit", run, "--out", tmp_path / "run.zip")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run.zip").is_file()
