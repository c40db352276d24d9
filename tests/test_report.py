"""Comparison report from hand-made run folders (no training involved)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fairage.config.files import dump_config
from fairage.config.presets import load_preset
from fairage.errors import DataError
from fairage.outputs import report

BIAS_KEYS = ("age", "gender", "ethnicity", "expression")


def make_run(
    root: Path, folder: str, preset: str, mae: float, bias: dict, seed: int = 0, n_epochs: tuple[int, int] = (3, 2)
) -> Path:
    """Write a finished run folder by hand: config.yaml, history.csv, predictions, metrics.

    Intervals are mae +- 1 and bias +- 0.5; group MAEs are mae + offsets.
    """
    run = root / folder
    run.mkdir(parents=True)
    cfg = load_preset(preset, "tiny", [f"seed={seed}"])
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    rows = []
    for stage, n in (("stage1", n_epochs[0]), ("stage2", n_epochs[1])):
        if getattr(cfg, stage) is None:
            continue
        for e in range(1, n + 1):
            rows.append(
                {
                    "epoch": e,
                    "stage": stage,
                    "train_loss": 1.0 / e,
                    "val_loss": 1.2 / e,
                    "train_mae": 20.0 / e,
                    "val_mae": 22.0 / e,
                    "lr": 1e-3,
                }
            )
    pd.DataFrame(rows).to_csv(run / "history.csv", index=False)
    preds = pd.DataFrame(
        {
            "image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
            "prediction": [10.0, 30.0, 50.0, 70.0, 25.0],
            "age": [12.0, 33.0, 41.0, 75.0, 22.0],
            "gender": ["male", "female", "male", "female", "female"],
            "ethnicity": ["asian", "caucasian", "caucasian", "afroamerican", "caucasian"],
            "expression": ["neutral", "happy", "other", "neutral", "slightlyhappy"],
        }
    )
    preds.to_csv(run / "predictions_test.csv", index=False)
    metrics = {
        "n": 5,
        "mae": mae,
        "mae_ci": [mae - 1.0, mae + 1.0],
        "bias": dict(bias),
        "bias_ci": {k: [v - 0.5, v + 0.5] for k, v in bias.items()},
        "groups": {
            "age": {
                "[0,20)": {"n": 1, "mae": mae + 1},
                "[20,40)": {"n": 2, "mae": mae},
                "[40,60)": {"n": 1, "mae": mae - 1},
                "[60,inf)": {"n": 1, "mae": mae + 3},
            },
            "gender": {"male": {"n": 2, "mae": mae}, "female": {"n": 3, "mae": mae + 0.5}},
            "ethnicity": {
                "asian": {"n": 1, "mae": mae + 2},
                "afroamerican": {"n": 1, "mae": mae},
                "caucasian": {"n": 3, "mae": mae - 0.5},
            },
            "expression": {
                "neutral": {"n": 2, "mae": mae},
                "slightlyhappy": {"n": 1, "mae": mae},
                "happy": {"n": 1, "mae": mae + 1},
                "other": {"n": 1, "mae": mae},
            },
        },
        "skipped_groups": {},
    }
    (run / "metrics_test.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


@pytest.fixture()
def two_runs(tmp_path):
    a = make_run(tmp_path / "runs", "M1", "M1", 9.5, {"age": 5.0, "gender": 0.25, "ethnicity": 2.5, "expression": 1.5})
    b = make_run(
        tmp_path / "runs", "M5", "M5", 8.0, {"age": 3.0, "gender": 0.125, "ethnicity": 0.5, "expression": 0.75}
    )
    return [a, b]


def test_comparison_table_columns_and_values(two_runs):
    table = report.comparison_table(two_runs)
    assert list(table.columns[:8]) == [
        "Model",
        "Learning rate",
        "Training strategy",
        "Gender bias",
        "Expression bias",
        "Ethnicity bias",
        "Age bias",
        "MAE",
    ]
    for col in ("Gender bias", "Expression bias", "Ethnicity bias", "Age bias", "MAE"):
        assert f"{col} CI low" in table.columns and f"{col} CI high" in table.columns
    assert list(table["Model"]) == ["M1", "M5"]
    m1 = table.iloc[0]
    assert m1["MAE"] == 9.5 and m1["Age bias"] == 5.0 and m1["Gender bias"] == 0.25
    assert m1["MAE CI low"] == 8.5 and m1["MAE CI high"] == 10.5
    assert m1["Ethnicity bias CI low"] == 2.0 and m1["Ethnicity bias CI high"] == 3.0
    # tiny scale raises the lr to 1e-3; the table says so as the report writes rates
    assert m1["Learning rate"] == "0.001"
    assert m1["Training strategy"] == "II: all layers"
    assert table.iloc[1]["Training strategy"] == "I: head; II: all layers, age_ethnicity weights"
    assert list(table["Runs"]) == [1, 1]


def test_several_seeds_give_mean_and_std(tmp_path):
    runs = [
        make_run(
            tmp_path, "M2-seed0", "M2", 6.0, {"age": 2.0, "gender": 0.0, "ethnicity": 1.0, "expression": 1.0}, seed=0
        ),
        make_run(
            tmp_path, "M2-seed1", "M2", 8.0, {"age": 4.0, "gender": 1.0, "ethnicity": 1.0, "expression": 3.0}, seed=1
        ),
    ]
    table = report.comparison_table(runs)
    assert len(table) == 1
    row = table.iloc[0]
    # mean of 6 and 8 is 7; sample std = sqrt(((6-7)^2 + (8-7)^2) / 1) = 1.414
    assert row["MAE"] == "7.000 ± 1.414"
    assert row["Age bias"] == "3.000 ± 1.414"
    assert row["Ethnicity bias"] == "1.000 ± 0.000"
    assert row["MAE CI low"] == "6.000 ± 1.414"
    assert row["Runs"] == 2


def test_same_name_different_configs_are_not_merged(tmp_path):
    a = make_run(tmp_path, "x", "M1", 9.0, {"age": 1.0, "gender": 1.0, "ethnicity": 1.0, "expression": 1.0})
    b = make_run(tmp_path, "y", "M1", 7.0, {"age": 1.0, "gender": 1.0, "ethnicity": 1.0, "expression": 1.0})
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["stage2"]["lr"] = 0.5
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    table = report.comparison_table([a, b])
    assert list(table["Model"]) == ["M1 (x)", "M1 (y)"]
    assert list(table["Learning rate"]) == ["0.001", "0.5"]


def test_markdown_table():
    table = pd.DataFrame({"Model": ["M1"], "MAE": [9.59], "Training strategy": ["a|b"]})
    assert report.to_markdown(table) == ("| Model | MAE | Training strategy |\n|---|---|---|\n| M1 | 9.590 | a\\|b |\n")


def test_format_lr():
    assert report.format_lr(1e-5) == "1e-5"
    assert report.format_lr(5e-5) == "5e-5"
    assert report.format_lr(0.001) == "0.001"


def test_build_report_writes_everything(two_runs, tmp_path):
    out = tmp_path / "report"
    html_path = report.build_report(two_runs, out)
    assert html_path == out / "report.html"
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv["Model"]) == ["M1", "M5"]
    assert list(csv["MAE"]) == [9.5, 8.0]
    assert list(csv["Ethnicity bias"]) == [2.5, 0.5]
    md = (out / "comparison.md").read_text()
    assert md.startswith("| Model | Learning rate | Training strategy | Gender bias | Expression bias |")
    assert "9.500 [8.500, 10.500]" in md
    for png in ("training_curves.png", "group_mae.png", "bias_vs_mae.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = html_path.read_text(encoding="utf-8")
    # self-contained: nothing fetched from elsewhere, images inline
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "@import" not in page and "<link" not in page.lower()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert 'id="comparison"' in page
    # dataset summary counted from the predictions: 2 male, 3 female test faces
    assert "faces per gender" in page
    gender_table = re.search(r"<caption>faces per gender</caption>(.*?)</table>", page, re.DOTALL).group(1)
    assert re.search(r">male</td><td[^>]*>2</td>", gender_table)
    assert re.search(r">female</td><td[^>]*>3</td>", gender_table)
    # each model's config is shown
    assert page.count("<pre>") == 2 and "age_ethnicity" in page


def test_dataset_summary_from_face_table(two_runs, tmp_path):
    faces = pd.DataFrame(
        {
            "age": [5.0, 25.0, 65.0, 20.0],
            "gender": ["male", "male", "female", "male"],
            "ethnicity": ["asian"] * 4,
            "expression": ["happy"] * 4,
            "split": ["train", "train", "valid", "test"],
        }
    )
    summary = report.summarize_faces(faces)
    assert summary["gender"].loc["male"].to_dict() == {"train": 2, "valid": 0, "test": 1, "total": 3}
    # age 20 is in [20,40): bins are closed on the left
    assert summary["age"]["total"].to_dict() == {"[0,20)": 1, "[20,40)": 2, "[60,inf)": 1}
    page = report.build_report(two_runs, tmp_path / "r", dataset_summary=faces).read_text()
    assert "all splits" in page and "faces per ethnicity" in page


def test_unfinished_run_is_a_clear_error(two_runs, tmp_path):
    (two_runs[0] / "metrics_test.json").unlink()
    with pytest.raises(DataError, match="metrics_test.json"):
        report.build_report(two_runs, tmp_path / "r")
    with pytest.raises(DataError, match="run folder not found"):
        report.load_run(tmp_path / "nope")


def test_corrupt_metrics_is_a_clear_error(two_runs):
    (two_runs[1] / "metrics_test.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        report.comparison_table(two_runs)


def test_report_shows_the_start_and_the_runs_warnings(two_runs, tmp_path):
    m1, m5 = two_runs
    (m1 / "run.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "data_dir": "/d",
                "weights_loaded": False,
                "warnings": ["the model collapsed: <constant>"],
            }
        )
    )
    (m5 / "run.json").write_text(
        json.dumps(
            {"status": "finished", "data_dir": "/d", "weights_loaded": True, "weights": "/w/backbone.safetensors"}
        )
    )
    page = report.build_report(two_runs, tmp_path / "r").read_text(encoding="utf-8")
    m1_part, m5_part = page.split("<h3>M1</h3>")[1].split("<h3>M5</h3>")
    assert (
        "random initialisation" in m1_part
        and 'class="warning">warning: the model collapsed: &lt;constant&gt;' in m1_part
    )
    assert "pretrained weights /w/backbone.safetensors" in m5_part and "warning" not in m5_part


def test_permutation_pvalues_get_their_own_table(two_runs, tmp_path):
    # runs scored without permutations: no p-value section
    assert report.pvalue_table(two_runs) is None
    assert 'id="pvalues"' not in report.build_report(two_runs, tmp_path / "plain").read_text(encoding="utf-8")
    for run, p_age in zip(two_runs, (0.000999, 0.25)):
        metrics = json.loads((run / "metrics_test.json").read_text())
        metrics["bias_p"] = {"age": p_age, "gender": 0.5234, "ethnicity": 0.0123, "expression": None}
        metrics["n_perm"] = 1000
        (run / "metrics_test.json").write_text(json.dumps(metrics))
    table = report.pvalue_table(two_runs)
    assert list(table.columns) == [
        "Model",
        "Seed",
        "Gender bias",
        "Expression bias",
        "Ethnicity bias",
        "Age bias",
        "Permutations",
    ]
    assert list(table["Model"]) == ["M1", "M5"] and list(table["Age bias"]) == [0.000999, 0.25]
    assert table["Expression bias"].isna().all()
    page = report.build_report(two_runs, tmp_path / "with-p").read_text(encoding="utf-8")
    section = re.search(r'<table id="pvalues">(.*?)</table>', page, re.DOTALL).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", section)
    assert cells == [
        "M1",
        "0",
        "0.523",
        "n/a",
        "0.0123",
        "0.000999",
        "1000",
        "M5",
        "0",
        "0.523",
        "n/a",
        "0.0123",
        "0.25",
        "1000",
    ]


def test_training_strategy_names_the_methods_beyond_weighting():
    strategy = {name: report._strategy(load_preset(name, "cpu")) for name in ("M5", "M5-dro", "M5-dex", "M5-std")}
    assert strategy["M5"] == "I: head; II: all layers, age_ethnicity weights"
    assert strategy["M5-dro"] == "I: head; II: all layers, Group DRO (age_ethnicity)"
    assert strategy["M5-dex"] == "I: head, DEX; II: all layers, age_ethnicity weights, DEX"
    assert strategy["M5-std"] == "I: head; II: all layers, age_ethnicity weights, label std (sample)"
