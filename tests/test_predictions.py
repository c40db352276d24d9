"""Predictions file (write/read/join) and the competition submission zip."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest

from fairage.errors import DataError
from fairage.store.predictions import (
    join_predictions,
    read_predictions,
    write_predictions,
)
from fairage.store.submission import read_submission, write_submission


def _faces(n=5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": [f"{i:03d}" for i in range(n)],  # leading zeros must survive as strings
            "age": np.arange(n, dtype=float) * 10 + 5,
            "gender": ["male", "female"] * (n // 2) + ["male"] * (n % 2),
            "ethnicity": ["asian"] * n,
            "expression": ["happy"] * n,
            "split": ["test"] * n,
        }
    )


def test_write_read_round_trip(tmp_path):
    faces = _faces()
    preds = np.array([1.5, 22.25, 30.0, 44.125, 61.0])
    path = tmp_path / "p.csv"
    write_predictions(path, faces, preds)
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]  # no temp file left behind
    assert path.read_text().splitlines()[0] == "image,prediction,age,gender,ethnicity,expression"
    table = read_predictions(path)
    assert table["image"].tolist() == ["000", "001", "002", "003", "004"]
    np.testing.assert_allclose(table["prediction"], preds)
    assert table["gender"].tolist() == faces["gender"].tolist()


def test_read_predictions_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_predictions(tmp_path / "none.csv")
    bad = tmp_path / "cols.csv"
    bad.write_text("image,guess\n1,3\n")  # (image,age is what `fairage predict --faces` writes)
    with pytest.raises(DataError, match=r"cols.csv.*prediction"):
        read_predictions(bad)
    nan = tmp_path / "nan.csv"
    nan.write_text("image,prediction\na,3\nb,\nc,4\n")
    with pytest.raises(DataError, match=r"nan.csv: row 3 \(image b\)"):
        read_predictions(nan)
    text = tmp_path / "text.csv"
    text.write_text("image,prediction\na,3\nb,4\nc,old\n")
    with pytest.raises(DataError, match=r"text.csv: row 4 \(image c\).*'old'"):
        read_predictions(text)


def test_join_predictions_orders_by_faces():
    faces = _faces()
    preds = pd.DataFrame({"image": ["004", "000", "002", "001", "003"], "prediction": [4.0, 0.0, 2.0, 1.0, 3.0]})
    joined = join_predictions(faces, preds, "p.csv")
    assert joined["image"].tolist() == faces["image"].tolist()
    assert joined["prediction"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_join_predictions_names_missing_duplicated_and_extra_ids():
    faces = _faces()
    preds = pd.DataFrame({"image": ["000", "001", "001", "003", "999"], "prediction": [1.0] * 5})
    with pytest.raises(DataError) as err:
        join_predictions(faces, preds, "p.csv")
    message = str(err.value)
    assert message.startswith("p.csv: ")
    assert "without a prediction: 002, 004" in message
    assert "more than one prediction: 001" in message
    assert "not in the split: 999" in message


def test_submission_round_trip_in_test_order(tmp_path):
    faces = _faces(6)
    ages = np.array([10.5, 20.25, 33.0, 47.75, 51.0, 69.125])
    shuffled = pd.DataFrame({"image": faces["image"].iloc[::-1].to_numpy(), "prediction": ages[::-1]})
    out = tmp_path / "predictions.zip"
    write_submission(out, faces, shuffled)
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["predictions.csv"]
        lines = archive.read("predictions.csv").decode().splitlines()
    assert len(lines) == 6 and float(lines[0]) == 10.5  # no header, test order
    np.testing.assert_allclose(read_submission(out), ages)


def test_submission_refuses_mismatched_predictions(tmp_path):
    faces = _faces(4)
    out = tmp_path / "predictions.zip"
    with pytest.raises(DataError, match="3 predictions but the test split has 4"):
        write_submission(out, faces, pd.DataFrame({"image": ["000", "001", "002"], "prediction": [1.0] * 3}))
    with pytest.raises(DataError, match="without a prediction: 003"):
        write_submission(out, faces, pd.DataFrame({"image": ["000", "001", "002", "002"], "prediction": [1.0] * 4}))
    assert not out.exists()
