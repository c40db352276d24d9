"""Real run folders: resume after a kill, self-describing checkpoints, evaluate = metrics_test.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import invoke, tiny_config_file
from lightning.pytorch.callbacks import Callback

from fairage.config.presets import load_preset
from fairage.data import load_faces
from fairage.store.checkpoint import model_from_checkpoint as load_model_from_checkpoint
from fairage.store.run_folder import RunFolder
from fairage.training import resume_run, train


class Killed(Exception):
    """Stands in for a kill: raised inside training, it leaves the run folder as a kill would."""


class KillAtEpochStart(Callback):
    """Raise at the start of ``epoch`` (0-based) of stage II, i.e. inside that epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if not pl_module.frozen and trainer.current_epoch == self.epoch:
            raise Killed(f"killed in epoch {self.epoch + 1}")


class EpochRecorder(Callback):
    """Records the (0-based) epochs that start training."""

    def __init__(self):
        self.started: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(trainer.current_epoch)


def test_resume_after_non_improving_epochs_redoes_only_the_interrupted_epoch(tiny_data, tmp_path):
    # Adam at lr 1.0 saturates the sigmoid in the first epoch: the validation loss stops improving,
    # so a "last" checkpoint written only on improvement would sit at epoch 1 (the collapse stop,
    # which would end the stage there, is off)
    cfg = load_preset(
        "M1",
        "tiny",
        [
            "eval.n_boot=0",
            "stage2.lr=1.0",
            "stage2.max_epochs=6",
            "stage2.patience=10",
            "stage2.lr_patience=10",
            "stage2.stop_on_collapse=false",
        ],
    )
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, tiny_data, run, progress=False, callbacks=[KillAtEpochStart(4)])  # in epoch 5
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    best_epoch = int(history["epoch"][history["val_loss"].idxmin()])
    assert best_epoch <= 2, history  # epochs 3 and 4 did not improve
    last = torch.load(run / "checkpoints" / "stage2-last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3  # the last completed epoch (0-based), not the best one

    recorder = EpochRecorder()
    resume_run(run, progress=False, callbacks=[recorder])
    assert recorder.started == [4, 5]  # epoch 5 (interrupted) redone, epoch 6 run; nothing before
    after = pd.read_csv(run / "history.csv")
    assert list(after["epoch"]) == [1, 2, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(after.iloc[:4], history)


@pytest.fixture(scope="module")
def real_target_run(tiny_data, tmp_path_factory):
    """A finished tiny M5 run trained on the real age (data.target: real), through the CLI."""
    root = tmp_path_factory.mktemp("real-target")
    run = root / "run"
    res = invoke(
        "train",
        "--config",
        tiny_config_file(root, "M5", ["data.target=real"]),
        "--data",
        tiny_data,
        "--out",
        run,
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    return run


def test_evaluate_of_a_run_equals_its_metrics_for_the_real_age_target(
    real_target_run, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # not where the run was trained
    res = invoke("evaluate", real_target_run, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == json.loads((real_target_run / "metrics_test.json").read_text())
    # the run's targets are the real ages, which differ from the default (apparent) ones
    faces = RunFolder.open(real_target_run).faces("test")
    apparent = load_faces(tiny_data)
    apparent = apparent[apparent["split"] == "test"].reset_index(drop=True)
    assert list(faces["image"]) == list(apparent["image"])
    assert np.abs(faces["age"] - apparent["age"]).mean() > 0.5


def test_a_checkpoint_alone_rebuilds_the_model(real_target_run, tmp_path):
    ckpt = tmp_path / "alone.ckpt"
    shutil.copy(real_target_run / "checkpoints" / "stage2-best.ckpt", ckpt)
    model, cfg = load_model_from_checkpoint(ckpt)
    assert cfg == RunFolder.open(real_target_run).config()
    assert cfg.data.target == "real" and not model.training
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{name}"]), name
    res = invoke("export-backbone", ckpt, "--out", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "b.safetensors"))
    assert set(saved) == {k[len("model.backbone.") :] for k in state if k.startswith("model.backbone.")}

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    res = invoke("export-backbone", truncated, "--out", tmp_path / "c.pth")
    assert res.exit_code == 2 and f"{truncated} is corrupt or truncated" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_resume_with_a_truncated_last_checkpoint_exits_2(real_target_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_target_run, run)
    (run / "metrics_test.json").unlink()
    folder = RunFolder.open(run)
    folder.update(status="running", stage="stage2", completed_stages=["stage1"])
    last = run / "checkpoints" / "stage2-last.ckpt"
    last.write_bytes(last.read_bytes()[:2000])
    res = invoke("train", "--resume", run, "--quiet")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{last} is corrupt or truncated" in res.output

    (run / "history.csv").write_bytes(b"\x00\x01\x02\xff" * 100)
    res = invoke("train", "--resume", run, "--quiet")
    assert res.exit_code == 2 and f"{run / 'history.csv'}" in res.output


def test_report_shows_the_published_table_marked_as_such(real_target_run, tmp_path):
    res = invoke("report", real_target_run, "--out", tmp_path / "r", "--reference", "seed")
    assert res.exit_code == 0, res.output
    assert "published figures on APPA-REAL (seed report), not measured by fairage" in res.output
    assert "report M5" in res.output and "8.01" in res.output and "kit stage II" in res.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert 'id="reference"' in page and "not measured by fairage" in page
    assert '<td class="num">0.322</td>' in page  # report M5's ethnicity bias, as published
    res = invoke("report", real_target_run, "--out", tmp_path / "r2", "--reference", "nope")
    assert res.exit_code == 2 and "nope" in res.output
