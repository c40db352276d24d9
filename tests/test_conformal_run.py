"""Conformal intervals end to end on a tiny trained run: stored in the run folder, written into its
predictions, scored in its metrics, carried by exports and answered by predict and the service."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import GRACE_HOPPER, invoke
from fastapi.testclient import TestClient

from fairage.data.schema import age_bins
from fairage.inference.predictor import (
    AgePredictor,
    load_model,
    predict_faces,
    read_image,
)
from fairage.outputs.modelcard import build_model_card, card_markdown
from fairage.store.run_folder import RunFolder


def test_run_folder_stores_its_calibration_and_writes_intervals(tiny_run):
    folder = RunFolder.open(tiny_run)
    cal = folder.calibration()
    assert cal is not None and cal.by == ["age"] and cal.level == pytest.approx(0.9)
    valid = folder.faces("valid")
    assert cal.n == len(valid)
    # the plain quantile by hand: the ceil((n + 1) * 0.9)-th smallest absolute validation error
    errors = np.sort(np.abs(predict_faces(tiny_run, valid) - valid["age"].to_numpy()))
    assert cal.plain == pytest.approx(errors[math.ceil((len(valid) + 1) * 0.9) - 1], abs=1e-4)
    # bins with fewer than 10 validation faces fall back, and the run records which
    counts = pd.Series(age_bins(valid["age"])).value_counts()
    small = {b for b in cal.values["age"] if counts.get(b, 0) < 10}
    assert {g for g, s in cal.groups.items() if s.fallback} == small
    warning = next(w for w in folder.warnings() if w.startswith("conformal groups"))
    assert all(f"{b} (n={counts.get(b, 0)})" in warning for b in small)

    preds = pd.read_csv(tiny_run / RunFolder.PREDICTIONS)
    assert list(preds.columns[:4]) == ["image", "prediction", "age_lo", "age_hi"]
    assert (preds["age_lo"] <= preds["prediction"]).all() and (preds["prediction"] <= preds["age_hi"]).all()
    metrics = json.loads((tiny_run / RunFolder.METRICS).read_text())
    covered = (preds["age"] >= preds["age_lo"]) & (preds["age"] <= preds["age_hi"])
    assert metrics["coverage"]["conformal"]["coverage"] == pytest.approx(covered.mean())
    assert metrics["coverage"]["conformal"]["width"] == pytest.approx((preds["age_hi"] - preds["age_lo"]).mean())
    plain = (preds["age"] - preds["prediction"]).abs() <= cal.plain
    assert metrics["coverage"]["plain"]["coverage"] == pytest.approx(plain.mean())
    assert metrics["coverage_target"] == pytest.approx(0.9)

    result = invoke("evaluate", tiny_run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["coverage"] == metrics["coverage"]
    text = invoke("evaluate", tiny_run, "--n-perm", "0")
    assert text.exit_code == 0 and "coverage gap" in text.output and "aiming at 90.0%" in text.output


def test_exports_and_the_service_carry_the_intervals(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime")
    cal = RunFolder.open(tiny_run).calibration()
    onnx_path = tmp_path / "m.onnx"
    assert invoke("export", tiny_run, "--format", "onnx", "--out", onnx_path).exit_code == 0
    exported = load_model(onnx_path)
    assert exported.calibration is not None and exported.calibration.to_json() == cal.to_json()
    ts_path = tmp_path / "m.pt"
    assert invoke("export", tiny_run, "--format", "torchscript", "--out", ts_path).exit_code == 0
    import torch

    extra = {"fairage.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated
        torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(json.loads(extra["fairage.json"])["fairage_conformal"]) == cal.to_json()

    predictor = AgePredictor(exported, device="cpu")
    crop = read_image(GRACE_HOPPER)
    face = predictor.predict_image(crop, faces_only=True).faces[0]
    lo, hi = cal.intervals([face.age])
    assert (face.age_lo, face.age_hi) == pytest.approx((lo[0], hi[0]))
    with TestClient(create_app_for(predictor)) as client:
        r = client.post(
            "/predict?faces_only=true",
            files={"file": ("f.jpg", GRACE_HOPPER.read_bytes(), "image/jpeg")},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["interval_level"] == pytest.approx(0.9)
    (answer,) = body["faces"]
    assert answer["age_lo"] <= answer["age"] <= answer["age_hi"]
    assert (answer["age_lo"], answer["age_hi"]) == pytest.approx(tuple(x[0] for x in cal.intervals([answer["age"]])))


def create_app_for(predictor):
    from fairage.serve import create_app

    return create_app(predictor)


def test_predict_csv_has_interval_columns_and_an_old_run_has_none(tiny_run, tmp_path):
    out = tmp_path / "faces.csv"
    result = invoke("predict", tiny_run, GRACE_HOPPER, "--faces", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["image", "age", "age_lo", "age_hi"]
    cal = RunFolder.open(tiny_run).calibration()
    lo, hi = cal.intervals(table["age"].to_numpy())
    np.testing.assert_allclose(table[["age_lo", "age_hi"]].to_numpy(), np.c_[lo, hi], atol=1e-5)

    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old)
    (old / RunFolder.CONFORMAL).unlink()
    predictor = AgePredictor(old, device="cpu")
    face = predictor.predict_image(read_image(GRACE_HOPPER), faces_only=True).faces[0]
    assert predictor.intervals([30.0]) is None and face.age_lo is None
    out_old = tmp_path / "old.csv"
    assert invoke("predict", old, GRACE_HOPPER, "--faces", "--out", out_old, "--quiet").exit_code == 0
    assert list(pd.read_csv(out_old).columns) == ["image", "age"]


def test_annotated_copy_shows_the_interval(tiny_run, tmp_path):
    from fairage.inference.predictor import FaceResult, ImageResult, draw_faces

    rgb = np.full((200, 200, 3), 128, np.uint8)
    plain, with_interval = tmp_path / "a.png", tmp_path / "b.png"
    draw_faces(rgb, ImageResult(200, 200, [FaceResult((50, 60, 80, 80), 1.0, 31.0)]), plain)
    draw_faces(
        rgb,
        ImageResult(200, 200, [FaceResult((50, 60, 80, 80), 1.0, 31.0, age_lo=24.0, age_hi=39.0)]),
        with_interval,
    )
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (plain, with_interval))
    label_rows = slice(0, 60)  # the label sits above the box
    # the longer label "31 (24-39)" fills more of the label band than "31"
    filled = [(np.abs(x[label_rows].astype(int) - 128).sum(axis=2) > 0).sum() for x in (a, b)]
    assert filled[1] > 2 * filled[0]


def test_model_card_reports_coverage_by_group(tiny_run):
    card = build_model_card(tiny_run)
    intervals = card["evaluation"]["intervals"]
    metrics = json.loads((tiny_run / RunFolder.METRICS).read_text())
    assert set(intervals["sets"]) == {"conformal", "plain"}
    assert intervals["sets"]["conformal"]["coverage"] == pytest.approx(metrics["coverage"]["conformal"]["coverage"])
    ages = {r["group"]: r for r in intervals["sets"]["conformal"]["groups"]["age"]}
    assert ages.keys() == metrics["coverage"]["conformal"]["groups"]["age"].keys()
    text = card_markdown(card)
    assert "### Age intervals" in text
    assert f"{100 * metrics['coverage']['conformal']['coverage']:.1f}%" in text
    assert "Coverage gap of age" in text
    calibration = intervals["calibration"]
    assert calibration["by"] == ["age"] and calibration["n"] == len(RunFolder.open(tiny_run).faces("valid"))
    assert f"calibrated on {calibration['n']} valid faces, separately for each age group" in text


def test_report_plots_coverage_beside_mae(tiny_run, tmp_path):
    from fairage.outputs.report import (
        build_report,
        coverage_table,
        group_coverage_frame,
    )

    metrics = json.loads((tiny_run / RunFolder.METRICS).read_text())
    frame = group_coverage_frame([tiny_run])
    age = frame[(frame["attribute"] == "age") & (frame["intervals"] == "conformal")].set_index("group")
    for group, row in metrics["coverage"]["conformal"]["groups"]["age"].items():
        assert age.at[group, "coverage"] == pytest.approx(row["coverage"]) and age.at[group, "n"] == row["n"]
    table = coverage_table([tiny_run])
    assert table.loc[0, "conformal coverage %"] == pytest.approx(100 * metrics["coverage"]["conformal"]["coverage"])
    assert table.loc[0, "Target"] == pytest.approx(90.0)
    report = build_report([tiny_run], tmp_path / "report")
    assert (tmp_path / "report" / "group_coverage.png").is_file()
    html = report.read_text()
    assert (
        html.index("Per-group test MAE")
        < html.index("Per-group coverage of the age intervals")
        < html.index("Bias vs MAE")
    )
    assert 'id="coverage"' in html


def test_calibrate_command_refits_a_run_and_calibrates_a_model_folder(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / RunFolder.CONFORMAL).unlink()
    metrics = json.loads((run / RunFolder.METRICS).read_text())
    result = invoke("calibrate", run, "--by", "none", "--alpha", "0.2", "--quiet")
    assert result.exit_code == 0, result.output
    cal = RunFolder.open(run).calibration()
    assert cal.by == [] and cal.alpha == 0.2
    valid = RunFolder.open(run).faces("valid")
    errors = np.sort(np.abs(predict_faces(run, valid) - valid["age"].to_numpy()))
    assert cal.plain == pytest.approx(errors[math.ceil((len(valid) + 1) * 0.8) - 1], abs=1e-4)
    preds = pd.read_csv(run / RunFolder.PREDICTIONS)
    np.testing.assert_allclose(
        preds["age_hi"] - preds["prediction"],
        np.minimum(cal.plain, 150 - preds["prediction"]),
        atol=1e-6,
    )
    rewritten = json.loads((run / RunFolder.METRICS).read_text())
    assert rewritten["mae"] == metrics["mae"] and set(rewritten["coverage"]) == {"conformal"}
    assert rewritten["coverage_target"] == pytest.approx(0.8)
    # an intersection calibration is scored on the intersection too
    assert invoke("calibrate", run, "--by", "age", "--by", "gender", "--quiet").exit_code == 0
    rewritten = json.loads((run / RunFolder.METRICS).read_text())
    crossed = rewritten["coverage"]["conformal"]["groups"]["age*gender"]
    test = RunFolder.open(run).faces("test")
    assert sum(g["n"] for g in crossed.values()) == int(test["gender"].isin(["male", "female"]).sum())
    assert set(rewritten["coverage"]) == {"conformal", "plain"}

    # a model folder (config.yaml + model.safetensors) calibrates on a dataset given with --data
    from safetensors.torch import save_file

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    save_file(
        {k: v.contiguous() for k, v in load_model(run).model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    assert load_model(folder).calibration is None
    assert invoke("calibrate", folder, "--quiet").exit_code == 2  # no --data
    data_dir = RunFolder.open(run).data_dir
    result = invoke("calibrate", folder, "--data", data_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert load_model(folder).calibration.to_json()["plain"] == pytest.approx(
        errors[math.ceil((len(valid) + 1) * 0.9) - 1], abs=1e-4
    )


def test_an_unknown_interval_group_fails_before_training(tiny_data, tmp_path):
    result = invoke(
        "train",
        "--preset",
        "M1",
        "--scale",
        "tiny",
        "--data",
        tiny_data,
        "--out",
        tmp_path / "r",
        "--quiet",
        "--set",
        "eval.conformal.by=[age, hairstyle]",
    )
    assert result.exit_code == 2
    assert "eval.conformal.by names 'hairstyle'" in " ".join(result.output.split())
    assert not (tmp_path / "r" / "history.csv").exists()
