"""CLI: fairage synth and fairage data info, including every bad-input case (exit 2, message names the file)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from test_data_loaders import (
    CSV_ROWS,
    jpeg_bytes,
    write_appa,
    write_csv_dataset,
    write_npy,
    write_utk,
)
from typer.testing import CliRunner

from fairage.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_then_info_json(tmp_path):
    out = tmp_path / "syn"
    res = invoke("synth", out, "--n-train", 12, "--n-valid", 4, "--n-test", 6, "--size", 32, "--seed", 1, "--quiet")
    assert res.exit_code == 0, res.output
    assert "wrote 22 synthetic faces" in res.output
    res = invoke("data", "info", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert set(info) == {"layout", "attributes", "splits", "age", "age_histogram"}
    assert info["attributes"] == ["gender", "ethnicity", "expression", "makeup", "time"]
    assert sum(info["age_histogram"]["counts"]) == 22
    assert info["layout"] == "appa"
    assert {s: v["n"] for s, v in info["splits"].items()} == {"train": 12, "valid": 4, "test": 6}
    gt = pd.read_csv(out / "gt_avg_test.csv")
    cats = pd.read_csv(out / "allcategories_test.csv")
    assert info["splits"]["test"]["ethnicity"] == cats["race"].value_counts().to_dict()
    assert info["age"]["test"]["max"] == pytest.approx(gt["apparent_age_avg"].max())
    assert info["age"]["test"]["mean"] == pytest.approx(gt["apparent_age_avg"].mean())


def test_info_tables_and_counts(tmp_path):
    root = write_appa(tmp_path / "appa")
    res = invoke("data", "info", root)
    assert res.exit_code == 0, res.output
    assert "layout appa" in res.output and "6 faces" in res.output
    assert "age histogram" in res.output
    info = json.loads(invoke("data", "info", root, "--json").stdout)
    # counted by hand from APPA_CATS
    assert info["splits"]["train"] == {
        "n": 3,
        "gender": {"female": 1, "male": 2},
        "ethnicity": {"afroamerican": 1, "asian": 1, "caucasian": 1},
        "expression": {"happy": 1, "neutral": 1, "slightlyhappy": 1},
        "makeup": {"makeup": 1, "nomakeup": 2},
        "time": {"modernphoto": 2, "oldphoto": 1},
    }
    assert info["age"]["train"] == {"min": 8.25, "max": 61.0, "mean": pytest.approx((25.5 + 61 + 8.25) / 3)}
    real = json.loads(invoke("data", "info", root, "--json", "--target", "real").stdout)
    assert real["age"]["train"]["max"] == 65


def test_info_other_layouts(tmp_path):
    write_npy(tmp_path / "npy")
    assert json.loads(invoke("data", "info", tmp_path / "npy", "--json").stdout)["layout"] == "npy"
    write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    assert json.loads(invoke("data", "info", tmp_path / "csv", "--json").stdout)["layout"] == "csv"
    write_utk(tmp_path / "utk", ["20_0_3_2017.jpg", "30_1_0_2017.jpg"])
    res = invoke("data", "info", tmp_path / "utk", "--json", "--extra-categories", "keep")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["layout"] == "utkface"
    eth = {k: v for s in info["splits"].values() for k, v in s["ethnicity"].items()}
    assert set(eth) == {"indian", "caucasian"}
    mapped = json.loads(invoke("data", "info", tmp_path / "utk", "--json", "--extra-categories", "indian=asian").stdout)
    assert {k for s in mapped["splits"].values() for k in s["ethnicity"]} == {"asian", "caucasian"}
    # a layout forced on the wrong folder is an error, not a guess
    res = invoke("data", "info", tmp_path / "csv", "--layout", "npy")
    assert res.exit_code == 2 and "no data_{train,valid,test}.npy found" in res.output


def _corrupt(root):
    (root / "train" / "000002.jpg_face.jpg").write_bytes(b"garbage")


def _truncate(root):
    data = jpeg_bytes()
    (root / "test" / "000000.jpg_face.jpg").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "breaker, message",
    [
        (_corrupt, r"train/000002\.jpg_face\.jpg: cannot decode image"),
        (_truncate, r"test/000000\.jpg_face\.jpg: cannot decode image.*truncated"),
        (lambda r: (r / "valid" / "000000.jpg_face.jpg").unlink(), r"valid/000000\.jpg_face\.jpg: file not found"),
    ],
)
def test_bad_images_exit_2_or_are_skipped(tmp_path, breaker, message):
    root = write_appa(tmp_path / "appa")
    breaker(root)
    res = invoke("data", "info", root)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert re.search(message, res.output.replace("\n", "")), res.output
    res = invoke("data", "info", root, "--skip-bad", "--json")
    assert res.exit_code == 0, res.output
    assert sum(s["n"] for s in json.loads(res.stdout)["splits"].values()) == 5
    broken = message.split(":")[0].replace("\\", "")  # the split/file part of the expected message
    assert "skipped 1 bad image(s)" in res.stderr and broken in res.stderr.replace("\n", "")


def _edit_csv(path, **columns):
    df = pd.read_csv(path)
    for k, v in columns.items():
        if v is None:
            df = df.drop(columns=k)
        else:
            df[k] = v
    df.to_csv(path, index=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: _edit_csv(r / "faces.csv", age=None), r"faces\.csv: missing required column\(s\) age"),
        (lambda r: _edit_csv(r / "faces.csv", age=[12, np.nan, 80, 33]), r"faces\.csv: row 3: age"),
        (lambda r: _edit_csv(r / "faces.csv", age=[12, 45, 80, 121]), r"faces\.csv: row 5: age '121'"),
        (
            lambda r: _edit_csv(r / "faces.csv", gender=["female", "male", "robot", "male"]),
            r"faces\.csv: row 4: gender value 'robot'",
        ),
        (lambda r: (r / "faces.csv").unlink(), r"no known dataset layout"),
    ],
)
def test_bad_csv_exit_2(tmp_path, edit, message):
    root = write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    edit(root)
    res = invoke("data", "info", root, "--extra-categories", "error")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert re.search(message, res.output.replace("\n", "")), res.output


def test_npy_mismatch_and_missing_folder_exit_2(tmp_path):
    root = tmp_path / "npy"
    write_npy(root)
    np.save(root / "meta_data_train.npy", np.array([["male", "asian", "neutral"]] * 4))
    res = invoke("data", "info", root)
    assert res.exit_code == 2
    assert "data_train.npy 3, labels_train.npy 3, meta_data_train.npy 4" in res.output.replace("\n", "")
    res = invoke("data", "info", tmp_path / "missing")
    assert res.exit_code == 2 and "missing: dataset folder not found" in res.output.replace("\n", "")


def test_unusable_output_path_exits_2_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(
        app, ["synth", str(blocker / "out"), "--n-train", "2", "--n-valid", "2", "--n-test", "2", "--size", "32"]
    )
    assert res.exit_code == 2
    assert "a_file" in res.output and "Not a directory" in res.output and "Traceback" not in res.output
