"""The report of a tune's Pareto front, from hand-written trials.csv / front.csv and hand-made run folders."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import invoke
from test_report import make_run

from fairage.errors import DataError
from fairage.outputs import report
from fairage.workflows.tune import front_points, read_tune_folder

#: the hand-made runs' test faces (test_report.make_run): ages and their age groups
AGES = [12.0, 33.0, 41.0, 75.0, 22.0]
#: the trial's predictions: exact but for the 41-year-old (4 years high)
TRIAL_PREDICTIONS = [12.0, 33.0, 45.0, 75.0, 22.0]
BIAS = {"age": 5.0, "gender": 0.25, "ethnicity": 2.5, "expression": 1.5}


def _trial_run(root: Path, name: str) -> Path:
    """A hand-made run folder named like a trial, whose predictions are TRIAL_PREDICTIONS."""
    run = make_run(root, name, "M1", 0.8, {"age": 2.0, "gender": 0.0, "ethnicity": 0.0, "expression": 0.0})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["name"] = name  # a trial's config is named after its folder
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    preds = pd.read_csv(run / "predictions_test.csv")
    assert list(preds["age"]) == AGES
    preds["prediction"] = TRIAL_PREDICTIONS
    preds.to_csv(run / "predictions_test.csv", index=False)
    return run


@pytest.fixture()
def tune_dir(tmp_path) -> Path:
    """A tune folder: trials 3 and 7 on the front (7's run folder is elsewhere), trial 5 finished off it, 6 failed."""
    out = tmp_path / "tune"
    (out / "trials").mkdir(parents=True)
    t3 = _trial_run(out / "trials", "trial-0003")
    t5 = make_run(out / "trials", "trial-0005", "M1", 7.5, BIAS)
    pd.DataFrame(
        {
            "number": [3, 5, 6, 7],
            "state": ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"],
            "stage2.lr": [1e-3, 2e-3, 3e-3, 4e-3],
            "val_mae": [4.5, 7.0, None, 3.0],
            "val_age_bias": [1.25, 4.0, None, 2.5],
            # trial 3's folder as another machine named it: found under OUT/trials by its name
            "run_dir": ["/elsewhere/tune/trials/trial-0003", str(t5), None, "/elsewhere/trial-0007"],
            "error": [None, None, "RuntimeError: planted", None],
            "retry_of": [None] * 4,
            "duration_s": [10.0, 11.0, 2.0, 12.0],
        }
    ).to_csv(out / "trials.csv", index=False)
    pd.DataFrame(
        {
            "number": [3, 7],
            "val_mae": [4.5, 3.0],
            "val_age_bias": [1.25, 2.5],
            "test_mae": [5.125, 3.5],
            "test_mae_ci_low": [4.5, 3.0],
            "test_mae_ci_high": [5.75, 4.0],
            "test_age_bias": [2.0, 2.75],
            "test_age_bias_ci_low": [1.0, 2.25],
            "test_age_bias_ci_high": [3.0, 3.25],
            "run_dir": ["/elsewhere/tune/trials/trial-0003", "/elsewhere/trial-0007"],
        }
    ).to_csv(out / "front.csv", index=False)
    assert t3.is_dir()
    return out


def _table_rows(page: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.DOTALL).group(1)
    head = [html.unescape(c) for c in re.findall(r"<th class=\"[^\"]*\">(.*?)</th>", body)]
    rows = [
        [html.unescape(c) for c in re.findall(r"<td class=\"[^\"]*\">(.*?)</td>", r)]
        for r in re.findall(r"<tr>(.*?)</tr>", body)[1:]
    ]
    return [head, *rows]


def test_report_shows_the_front_table_and_plot(tmp_path, tune_dir):
    m1 = make_run(tmp_path / "runs", "M1", "M1", 4.4, BIAS)
    path = report.build_report([m1], tmp_path / "report", tune=tune_dir)
    page = path.read_text()
    head, *rows = _table_rows(page, "tune-front")
    assert head == ["Trial", "val mae", "val age_bias", "test mae", "test age_bias", "mae - M1", "age_bias - M1"]
    assert [r[0] for r in rows] == ["3", "7"]
    # values and intervals as front.csv holds them
    assert rows[0][1:5] == ["4.500", "1.250", "5.125 [4.500, 5.750]", "2.000 [1.000, 3.000]"]
    assert rows[1][1:5] == ["3.000", "2.500", "3.500 [3.000, 4.000]", "2.750 [2.250, 3.250]"]
    # paired differences trial 3 - M1 on the five faces: M1's errors 2, 3, 9, 5, 3 (MAE 4.4), the
    # trial's 0, 0, 4, 0, 0 (MAE 0.8): -3.6, lower on every face, so the interval excludes 0;
    # age groups [0,20) [20,40) [40,60) [60,inf): M1 2, 3, 9, 5 -> bias (1+7+3+6+2+4)/6 = 23/6,
    # the trial 0, 0, 4, 0 -> 12/6 = 2
    assert rows[0][5].startswith("-3.600 [") and rows[0][5].endswith("] *")
    low, high = map(float, re.search(r"\[(.*), (.*)\]", rows[0][5]).groups())
    assert low <= -3.6 <= high < 0
    assert rows[0][6].startswith(f"{2 - 23 / 6:.3f} [")
    assert rows[1][5:] == ["n/a", "n/a"]  # trial 7's run folder is not here
    assert "trial 7: its run folder is not here" in page
    frame = pd.read_csv(tmp_path / "report" / report.TUNE_FRONT)
    assert frame.loc[0, "mae - M1"] == pytest.approx(-3.6)
    assert frame.loc[0, "age_bias - M1"] == pytest.approx(2 - 23 / 6)
    assert frame.loc[0, "mae - M1 excludes 0"] == "yes"

    # the plot, embedded in the page like the report's other plots
    png = (tmp_path / "report" / "front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    embedded = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="Pareto front', page).group(1)
    assert base64.b64decode(embedded) == png
    # the front's trial with a run folder joins the comparison beside M1
    assert [r[0] for r in _table_rows(page, "comparison")[1:]] == ["M1", "trial-0003"]


def test_front_points_take_the_front_from_front_csv_and_other_trials_from_their_runs(tune_dir):
    tune = read_tune_folder(tune_dir)
    assert tune.objectives == ["mae", "age_bias"]
    points = front_points(tune, tune.objectives).set_index("number")
    assert list(points.index) == [3, 7, 5]  # the front, then finished trials off it; failed 6 left out
    assert list(points["front"]) == [True, True, False]
    assert points.loc[3, ["x", "x_low", "x_high", "y", "y_low", "y_high"]].tolist() == [5.125, 4.5, 5.75, 2.0, 1.0, 3.0]
    # trial 5 from its metrics_test.json (make_run: MAE 7.5 +- 1, age bias 5.0 +- 0.5)
    assert points.loc[5, ["x", "x_low", "x_high", "y", "y_low", "y_high"]].tolist() == [7.5, 6.5, 8.5, 5.0, 4.5, 5.5]


def test_report_command_takes_a_tune_folder_alone(tmp_path, tune_dir):
    result = invoke("report", "--tune", tune_dir, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "report.html").read_text()
    head, *rows = _table_rows(page, "tune-front")
    assert head == ["Trial", "val mae", "val age_bias", "test mae", "test age_bias"]  # no baseline, no differences
    assert [r[0] for r in rows] == ["3", "7"]
    result = invoke("report", "--out", tmp_path / "rep2")
    assert result.exit_code == 2 and "--tune" in result.output


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda f: f.drop(columns=["test_mae_ci_low"]), "missing column test_mae_ci_low"),
        (lambda f: f.assign(test_mae=["5.1", "lots"]), "line 3, column test_mae: 'lots' is not a finite number"),
        (lambda f: f.assign(number=[3, 7.5]), "column number"),
        (lambda f: f.rename(columns={"val_mae": "val_maee"}), "val_maee"),
    ],
)
def test_bad_front_csv_is_refused_naming_the_cell(tmp_path, tune_dir, change, words):
    front = pd.read_csv(tune_dir / "front.csv")
    change(front).to_csv(tune_dir / "front.csv", index=False)
    with pytest.raises(DataError, match=re.escape(words)):
        read_tune_folder(tune_dir)
    result = invoke("report", "--tune", tune_dir, "--out", tmp_path / "rep")
    assert result.exit_code == 2 and "front.csv" in result.output


def test_a_folder_without_front_csv_is_not_a_tune_folder(tmp_path):
    with pytest.raises(DataError, match="is not a tune folder: no front.csv"):
        read_tune_folder(tmp_path)


def test_a_front_without_trials_gives_an_empty_table_and_no_plot(tmp_path, tune_dir):
    front = pd.read_csv(tune_dir / "front.csv")
    front.iloc[:0].to_csv(tune_dir / "front.csv", index=False)  # header only: nothing finished yet
    m1 = make_run(tmp_path / "runs", "M1", "M1", 4.4, BIAS)
    page = report.build_report([m1], tmp_path / "report", tune=tune_dir).read_text()
    head, *rows = _table_rows(page, "tune-front")
    assert head == ["Trial"] and rows == []
    # trial 5, finished off the front with its run folder here, is still drawn
    assert (tmp_path / "report" / "front.png").is_file() and 'alt="Pareto front' in page
    (tune_dir / "trials.csv").unlink()
    page = report.build_report([m1], tmp_path / "report2", tune=tune_dir).read_text()
    assert 'alt="Pareto front' not in page and not (tmp_path / "report2" / "front.png").exists()
