"""The suite end to end at tiny scale on a tiny synthetic set, and reuse of finished runs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fairage import training
from fairage.cli import app
from fairage.config.files import dump_config
from fairage.config.presets import load_preset
from fairage.data import write_synthetic
from fairage.models.regressor import build_model
from fairage.workflows import suite

TABLE1 = [
    "Model",
    "Learning rate",
    "Training strategy",
    "Gender bias",
    "Expression bias",
    "Ethnicity bias",
    "Age bias",
    "MAE",
]
MEASURED = ["Gender bias", "Expression bias", "Ethnicity bias", "Age bias", "MAE"]


@pytest.fixture(scope="module")
def finished_suite(tmp_path_factory):
    """Train M1 (all layers) and M2 (head only, age weights) once at tiny scale."""
    root = tmp_path_factory.mktemp("suite")
    data = write_synthetic(root / "data", n_train=80, n_valid=60, n_test=80, size=32, seed=0)
    out = root / "out"
    report = suite.run_suite(data, out, presets=["M1", "M2"], scale="tiny", progress=False)
    return data, out, report


def test_suite_writes_table_plots_and_report(finished_suite):
    _data, out, report = finished_suite
    assert report == out / "report.html"
    table = pd.read_csv(out / "comparison.csv")
    want = TABLE1 + [f"{c} CI {e}" for c in MEASURED for e in ("low", "high")] + ["Runs"]
    assert list(table.columns) == want
    assert list(table["Model"]) == ["M1", "M2"]
    for _, row in table.iterrows():
        preds = pd.read_csv(out / row["Model"] / "predictions_test.csv")
        assert len(preds) == 80
        # MAE recomputed from the predictions file: mean |prediction - age|
        assert row["MAE"] == pytest.approx(np.mean(np.abs(preds["prediction"] - preds["age"])), abs=1e-6)
        # gender bias of two groups = |MAE(male) - MAE(female)|
        err = (preds["prediction"] - preds["age"]).abs()
        by_gender = err.groupby(preds["gender"]).mean()
        assert row["Gender bias"] == pytest.approx(abs(by_gender["male"] - by_gender["female"]), abs=1e-6)
        assert row["MAE CI low"] <= row["MAE"] <= row["MAE CI high"]
    # the runs carry age intervals, so the coverage-by-group plot joins the three others
    for png in ("training_curves.png", "group_mae.png", "group_coverage.png", "bias_vs_mae.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = report.read_text(encoding="utf-8")
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', page)) == 4
    assert "faces per ethnicity" in page
    assert (out / "comparison.md").is_file()


def test_finished_runs_are_reused(finished_suite, monkeypatch, tmp_path):
    data, finished, _ = finished_suite
    out = tmp_path / "out"
    for p in ("M1", "M2"):
        shutil.copytree(finished / p, out / p)
    calls = []

    def fake_train(cfg, data_dir, run_dir, resume=False, **kw):
        # stands in for a retraining: a finished run folder with the new config
        calls.append((cfg.name, resume))
        shutil.copytree(finished / cfg.name, run_dir, dirs_exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    monkeypatch.setattr(training, "train", fake_train)
    before = {p: (out / p / "metrics_test.json").stat().st_mtime_ns for p in ("M1", "M2")}
    suite.run_suite(data, out, presets=["M1", "M2"], scale="tiny", progress=False)
    assert calls == []
    assert before == {p: (out / p / "metrics_test.json").stat().st_mtime_ns for p in ("M1", "M2")}
    # a changed config retrains that preset only (stage1 exists in M2, not in M1);
    # the old run is kept under another name
    suite.run_suite(data, out, presets=["M1", "M2"], scale="tiny", overrides=["stage1.lr=0.01"], progress=False)
    assert calls == [("M2", False)]
    assert (out / "M2.replaced-1" / "metrics_test.json").is_file()
    assert (out / "M1" / "metrics_test.json").stat().st_mtime_ns == before["M1"]
    # an interrupted run of the same config is resumed, not restarted
    (out / "M1" / "metrics_test.json").unlink()
    suite.run_suite(data, out, presets=["M1"], scale="tiny", progress=False)
    assert calls[-1] == ("M1", True)


def test_a_stage_stopped_on_nan_shows_in_the_suite_console(finished_suite, monkeypatch, tmp_path):
    data, out, _ = finished_suite
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stop = "stage2: val_loss became nan at epoch 2; stage stopped, keeping its best checkpoint"
    info = json.loads((copy / "M1" / "run.json").read_text())
    (copy / "M1" / "run.json").write_text(json.dumps({**info, "stopped_stages": {"stage2": stop}}))

    def fail(*a, **k):
        raise AssertionError("train() called for a finished run")

    monkeypatch.setattr(training, "train", fail)
    res = CliRunner().invoke(
        app, ["suite", "--data", str(data), "--out", str(copy), "--presets", "M1,M2", "--scale", "tiny", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert f"warning: [1/2] M1: {stop}" in " ".join(res.output.split())
    assert "M2: stage" not in res.output


def test_cli_suite_reuses_and_prints_the_table(finished_suite, monkeypatch):
    data, out, _ = finished_suite

    def fail(*a, **k):
        raise AssertionError("train() called for a finished run")

    monkeypatch.setattr(training, "train", fail)
    res = CliRunner().invoke(
        app,
        ["suite", "--data", str(data), "--out", str(out), "--presets", "M1,M2", "--scale", "tiny", "--quiet"],
        env={"COLUMNS": "250"},
    )
    assert res.exit_code == 0, res.output
    assert "Ethnicity bias" in res.output and "M2" in res.output
    assert "report.html" in res.output


def test_cli_report_from_run_folders(finished_suite, tmp_path):
    _, out, _ = finished_suite
    res = CliRunner().invoke(app, ["report", str(out / "M1"), str(out / "M2"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "r" / "comparison.csv")["Model"]) == ["M1", "M2"]


def test_unfinished_or_other_data_is_not_reused(finished_suite, tmp_path):
    data, out, _ = finished_suite
    cfg = dict(suite.suite_configs(["M1"], "tiny"))["M1"]
    assert suite.is_finished_run(out / "M1", cfg, data)
    assert not suite.is_finished_run(out / "M1", cfg, tmp_path)  # run.json names another data folder
    assert not suite.is_finished_run(out / "M1", cfg.model_copy(update={"seed": 5}), data)
    assert not suite.is_finished_run(tmp_path / "missing", cfg, data)
    info = json.loads((out / "M1" / "run.json").read_text())
    assert info["status"] == "finished"


def test_suite_configs_seeds_and_overrides():
    plan = suite.suite_configs(["M1", "M2"], "tiny", seeds=2, overrides=["stage2.lr=0.5", "seed=10"])
    assert [n for n, _ in plan] == ["M1-seed0", "M1-seed1", "M2-seed0", "M2-seed1"]
    assert [c.seed for _, c in plan] == [10, 11, 10, 11]
    # an override inside a stage the preset lacks does not add that stage
    assert plan[0][1].stage2.lr == 0.5 and plan[2][1].stage2 is None


def test_bad_suite_arguments_are_clear(tmp_path):
    from fairage.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'M9'"):
        suite.suite_configs(["M1", "M9"], "tiny")
    with pytest.raises(ConfigError, match="listed twice"):
        suite.suite_configs(["M1", "M1"], "tiny")
    res = CliRunner().invoke(
        app,
        [
            "suite",
            "--data",
            str(tmp_path),
            "--presets",
            "M1",
            "--set",
            "stage2.lrr=1",
            "--scale",
            "tiny",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "lrr" in res.output


def _backbone_from_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model.backbone.") :]: v for k, v in state.items() if k.startswith("model.backbone.")}


def test_export_backbone_writes_the_best_checkpoints_backbone(finished_suite, tmp_path):
    _, out, _ = finished_suite
    for run, stage in (("M1", "stage2"), ("M2", "stage1")):  # M2 is head-only: its last stage is stage I
        path = training.export_backbone(out / run, tmp_path / f"{run}.safetensors")
        saved = load_file(str(path))
        want = _backbone_from_checkpoint(out / run / "checkpoints" / f"{stage}-best.ckpt")
        assert set(saved) == set(want) and "conv1.weight" in saved and not any(k.startswith("fc.") for k in saved)
        for k in want:
            assert torch.equal(saved[k], want[k]), k
    # .pth works too, and the file loads as model.weights of another config
    pth = training.export_backbone(out / "M1", tmp_path / "M1.pth")
    cfg = load_preset("M5", "tiny", [f"model.weights={pth}"])
    model, info = build_model(cfg.model)
    assert info["weights_loaded"]
    m1 = load_file(str(tmp_path / "M1.safetensors"))
    assert all(torch.equal(model.backbone.state_dict()[k], m1[k]) for k in m1)


def test_export_backbone_refuses_unfinished_runs(finished_suite, tmp_path):
    _, out, _ = finished_suite
    run = tmp_path / "M1"
    shutil.copytree(out / "M1", run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    res = CliRunner().invoke(app, ["export-backbone", str(run), "--out", str(tmp_path / "b.safetensors")])
    assert res.exit_code == 2 and "no finished run" in res.output
    res = CliRunner().invoke(app, ["export-backbone", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.pth")])
    assert res.exit_code == 2 and "not a fairage run folder" in res.output
    res = CliRunner().invoke(app, ["export-backbone", str(out / "M1"), "--out", str(tmp_path / "b.npz")])
    assert res.exit_code == 2 and "b.npz" in res.output
    assert not (tmp_path / "b.safetensors").exists()


def test_demo_starts_from_the_pretrained_backbone(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    kw = {
        "presets": ["M2"],
        "scale": "tiny",
        "n_train": 60,
        "n_valid": 40,
        "n_test": 40,
        "size": 32,
        "pretrain_sizes": {"n_train": 60, "n_valid": 40, "n_test": 20},
        "progress": False,
    }
    report = suite.run_demo(out, **kw)
    weights = out / "pretrained-backbone.safetensors"
    info = json.loads((out / "M2" / "run.json").read_text())
    assert info["weights_loaded"] and info["weights"] == str(weights.resolve())
    # the pretraining data is another draw (other seed), not the demo's faces
    [pre_dir] = [p for p in out.glob("synthetic-*seed1")]
    [demo_dir] = [p for p in out.glob("synthetic-*seed0")]
    assert (pre_dir / "train" / "000000.jpg_face.jpg").read_bytes() != (
        demo_dir / "train" / "000000.jpg_face.jpg"
    ).read_bytes()
    # M2 freezes the backbone: its best checkpoint still holds the pretrained tensors exactly
    pretrained = load_file(str(weights))
    trained = _backbone_from_checkpoint(out / "M2" / "checkpoints" / "stage1-best.ckpt")
    assert set(trained) == set(pretrained)
    assert all(torch.equal(trained[k], pretrained[k]) for k in pretrained)
    assert list(pd.read_csv(out / "comparison.csv")["Model"]) == ["M2"]
    assert report == out / "report.html"

    # a second demo reuses the data, the backbone and the finished run
    def fail(*a, **k):
        raise AssertionError("train() called again")

    monkeypatch.setattr(training, "train", fail)
    assert suite.run_demo(out, **kw) == report
