"""`fairage train` end to end on a tiny synthetic dataset: run folder, resume, typos, weights, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import invoke, tiny_config_file
from lightning.pytorch.callbacks import Callback

from fairage.config.presets import load_preset
from fairage.data import load_faces
from fairage.training import resume_run, train

#: the tiny scale: stage I and stage II each 2 epochs, patience 2 (no early stop possible)
FULL_SEQUENCE = [(1, "stage1"), (2, "stage1"), (1, "stage2"), (2, "stage2")]
RUN_FILES = {"config.yaml", "run.json", "history.csv", "curves.png", "predictions_test.csv", "metrics_test.json"}


def sequence(run_dir: Path) -> list[tuple[int, str]]:
    h = pd.read_csv(run_dir / "history.csv")
    return list(zip(h["epoch"].astype(int), h["stage"]))


def test_train_command_writes_the_run_folder(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(
        *[
            "train",
            "--config",
            str(tiny_config_file(tmp_path)),
            "--data",
            str(tiny_data),
            "--out",
            str(run_dir),
            "--quiet",
            "--set",
            "stage2.weighting.mode=sampler",
            "--deterministic",
        ]
    )
    assert result.exit_code == 0, result.output
    assert RUN_FILES | {"weights_stage2.png"} <= {p.name for p in run_dir.iterdir()}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "stage1-best.ckpt",
        "stage1-last.ckpt",
        "stage2-best.ckpt",
        "stage2-last.ckpt",
    }
    assert sequence(run_dir) == FULL_SEQUENCE
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["weights_loaded"] is False
    assert run["data_dir"] == str(tiny_data.resolve()) and run["seed"] == 0
    # predictions: every test face once, in dataset order, ages in the sigmoid's [0, 100]
    test_faces = load_faces(tiny_data).query("split == 'test'")
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    assert list(preds["image"].astype(str)) == list(test_faces["image"])
    assert preds["prediction"].between(0, 100).all()
    metrics = json.loads((run_dir / "metrics_test.json").read_text())
    mae = float(np.abs(preds["prediction"].to_numpy() - test_faces["age"].to_numpy()).mean())
    assert metrics["mae"] == pytest.approx(mae, abs=1e-4)  # the file rounds predictions to 4 decimals
    assert "MAE" in result.output and "stage2: epochs" in result.output
    # the resolved config round-trips and has the command-line settings
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["stage2"]["weighting"]["mode"] == "sampler" and resolved["trainer"]["deterministic"] is True
    for ckpt in (run_dir / "checkpoints").iterdir():
        assert "state_dict" in torch.load(ckpt, map_location="cpu", weights_only=True)
    # a finished run is not overwritten
    again = invoke(
        *[
            "train",
            "--config",
            str(tiny_config_file(tmp_path)),
            "--data",
            str(tiny_data),
            "--out",
            str(run_dir),
            "--quiet",
        ]
    )
    assert again.exit_code == 2 and "already holds a finished run" in again.output


def test_config_typo_exits_2_naming_the_key(tiny_data, tmp_path):
    result = invoke(
        *[
            "train",
            "--config",
            str(tiny_config_file(tmp_path)),
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "stage2.lrr=1",
        ]
    )
    assert result.exit_code == 2
    assert "stage2.lrr" in result.output and "did you mean 'lr'" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_weights_file_exits_2(tiny_data, tmp_path):
    result = invoke(
        *[
            "train",
            "--preset",
            "M5",
            "--scale",
            "tiny",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"model.weights={tmp_path}/vgg.pth",
        ]
    )
    assert result.exit_code == 2
    assert "model.weights file not found" in result.output and "vgg.pth" in result.output


def test_single_stage_run_from_a_torchvision_weights_file(tiny_data, tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    run_dir = tmp_path / "run"
    result = invoke(
        *[
            "train",
            "--config",
            str(tiny_config_file(tmp_path)),
            "--data",
            str(tiny_data),
            "--out",
            str(run_dir),
            "--quiet",
            "--set",
            "stage1=null",
            "--set",
            "stage2.max_epochs=1",
            "--set",
            "stage2.weighting.scheme=none",
            "--set",
            f"model.weights={tmp_path / 'resnet18.pth'}",
        ]
    )
    assert result.exit_code == 0, result.output
    assert sequence(run_dir) == [(1, "stage2")]  # the report's single-stage "strategy 1"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["weights_loaded"] is True and run["weights"] == str(tmp_path / "resnet18.pth")
    assert sorted(run["unexpected_keys"]) == ["fc.bias", "fc.weight"]
    assert "projection.weight" in run["missing_keys"] and not any(
        k.startswith("backbone.") for k in run["missing_keys"]
    )
    assert not (run_dir / "weights_stage2.png").exists()  # no weighting, no plot
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"stage2-best.ckpt", "stage2-last.ckpt"}


class Interrupt(Exception):
    pass


class InterruptAfter(Callback):
    """Raise once ``epoch`` (1-based) of ``stage`` is complete (recorded and checkpointed):
    at the start of the next epoch."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        stage = "stage1" if pl_module.frozen else "stage2"
        if stage == self.stage and trainer.current_epoch == self.epoch:
            raise Interrupt(f"interrupted after {stage} epoch {self.epoch}")


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_continues_the_history(tiny_data, tmp_path, stage):
    cfg = load_preset("M5", "tiny", ["eval.n_boot=20"])
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cfg, tiny_data, run_dir, progress=False, callbacks=[InterruptAfter(stage, 1)])
    done = FULL_SEQUENCE[: FULL_SEQUENCE.index((1, stage)) + 1]
    assert sequence(run_dir) == done
    assert not (run_dir / "metrics_test.json").exists()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "running" and run["stage"] == stage
    before = pd.read_csv(run_dir / "history.csv")
    stage1_best = run_dir / "checkpoints" / "stage1-best.ckpt"
    stage1_mtime = stage1_best.stat().st_mtime_ns if stage == "stage2" else None

    # through the CLI, as a user would
    result = invoke(*["train", "--resume", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sequence(run_dir) == FULL_SEQUENCE
    after = pd.read_csv(run_dir / "history.csv")
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)  # earlier rows kept as they were
    if stage1_mtime is not None:  # stage I was finished: not retrained
        assert stage1_best.stat().st_mtime_ns == stage1_mtime
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert (run_dir / "metrics_test.json").is_file()
    # resuming a finished run just returns its metrics
    assert resume_run(run_dir, progress=False).to_json() == json.loads((run_dir / "metrics_test.json").read_text())


@pytest.mark.slow
def test_two_process_cpu_ddp(tiny_data, tmp_path):
    """`--devices 2 --strategy ddp --accelerator cpu`: Lightning re-runs the command in rank 1."""
    fairage = Path(sys.executable).with_name("fairage")
    run_dir = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(fairage),
            "train",
            "--config",
            str(tiny_config_file(tmp_path)),
            "--data",
            str(tiny_data),
            "--out",
            str(run_dir),
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--accelerator",
            "cpu",
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # two processes really ran
    assert sequence(run_dir) == FULL_SEQUENCE
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    assert len(preds) == 32 and preds["image"].is_unique
    assert "devices=2" in json.loads((run_dir / "run.json").read_text())["device"]


def test_a_collapsed_model_is_reported(tiny_data, tmp_path):
    # Adam at lr 1.0 saturates the sigmoid output on the first steps: one age for every face.
    # The stage stops after that epoch; with no epoch before it there is no model: one line, exit 1
    run_dir = tmp_path / "run"
    result = invoke(
        *[
            "train",
            "--preset",
            "M1",
            "--scale",
            "tiny",
            "--data",
            str(tiny_data),
            "--out",
            str(run_dir),
            "--quiet",
            "--set",
            "stage2.lr=1.0",
            "--set",
            "eval.n_boot=20",
        ]
    )
    assert result.exit_code == 1, result.output
    assert "stage2 collapsed in epoch 1" in result.output and "Traceback" not in result.output
    record = json.loads((run_dir / "run.json").read_text())
    assert "collapsed in epoch 1" in record["collapsed_stages"]["stage2"]
    assert not (run_dir / "predictions_test.csv").exists()


def test_collapse_warning_thresholds():
    from fairage.training import collapse_warning

    assert collapse_warning(np.array([30.0, 30.2, 29.9, 30.1])) is not None  # std 0.11 years
    assert collapse_warning(np.array([20.0, 40.0])) is None  # std 10 years
    assert collapse_warning(np.array([30.0])) is None  # one face: no spread to judge
