"""The lean loop of feature-cached stage I (fairage.training.lean) against Lightning's loop.

Both loops train the same tiny resnet18 on procedural faces (a bright square whose side grows
with the age); the lean loop must give the Lightning loop's head weights, history and best
epoch, and a lean stage killed part-way and resumed must end as an uninterrupted one.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import square_faces
from lightning.pytorch.callbacks import Callback

from fairage.config.presets import load_preset
from fairage.config.schema import (
    DROConfig,
    HeadBlock,
    ModelConfig,
    StageConfig,
    TrainerConfig,
    WeightingConfig,
)
from fairage.errors import ConfigError, DataError
from fairage.models.regressor import build_model
from fairage.store.checkpoint import load_weights as load_module_checkpoint
from fairage.store.checkpoint import read_checkpoint
from fairage.store.run_folder import HISTORY_COLUMNS
from fairage.training import (
    RunContext,
    StageArrays,
    StageSpec,
    fit_stage,
    resume_run,
    train,
)
from fairage.training import lean as lean_module
from fairage.training.interrupt import Terminated
from fairage.training.lean import LEAN_KEY, choose_loop
from fairage.training.methods import FaceArrays
from fairage.training.module import AgeModule

FP32 = TrainerConfig(precision="32-true")


@pytest.fixture(scope="module")
def faces():
    train_images, train_ages = square_faces(96, seed=0)
    val_images, val_ages = square_faces(32, seed=1)
    return train_images, train_ages, val_images, val_ages


def tiny_model(**kw):
    torch.manual_seed(0)
    base = {"backbone": "resnet18", "projection_dim": 16, "head": [HeadBlock(units=32, dropout=0.2)]}
    return build_model(ModelConfig(**{**base, **kw}))[0]


def age_groups(ages: np.ndarray) -> FaceArrays:
    """Two Group DRO groups, under and over 40 years, and a rater spread of 1 + age / 20 years."""
    groups = (np.asarray(ages) >= 40).astype(np.int64)
    return FaceArrays(
        groups=groups,
        group_names=["<40", "40+"],
        group_sizes=np.bincount(groups, minlength=2).astype(np.float64),
        age_std=(1 + np.asarray(ages) / 20).astype(np.float32),
    )


# each case turns on one group of features; "plateau" is tuned so that the learning rate drops
# and early stopping ends the stage before max_epochs (both asserted below)
CASES = {
    "plateau": ({"lr": 3e-2, "lr_patience": 1, "patience": 3, "max_epochs": 14}, {}),
    "loss_weights_clip_warmup": (
        {
            "lr": 1e-2,
            "grad_clip": 0.05,
            "warmup_epochs": 1.5,
            "max_epochs": 4,
            "weighting": WeightingConfig(scheme="age", mode="loss"),
        },
        {"weights": True},
    ),
    "sampler": (
        {"lr": 1e-2, "max_epochs": 4, "weighting": WeightingConfig(scheme="age", mode="sampler")},
        {"weights": True},
    ),
    "dro_label_std": (
        {"lr": 1e-2, "max_epochs": 4, "dro": DROConfig(enabled=True, eta=0.5), "label_std": "sample"},
        {"methods": True},
    ),
    "bmc_projection": ({"lr": 1e-2, "max_epochs": 3, "loss": "bmc", "trainable": "projection+head"}, {}),
}


def run_case(faces, loop: str, name: str, run_dir=None, trainer: TrainerConfig = FP32):
    settings, needs = CASES[name]
    train_images, train_ages, val_images, val_ages = faces
    # face weights that differ per face (1 to 3), so that weighting changes the loss
    weights = 1 + 2 * (train_ages - train_ages.min()) / np.ptp(train_ages) if needs.get("weights") else None
    arrays = StageArrays(
        train_images,
        train_ages,
        val_images,
        val_ages,
        train_weights=weights,
        face_arrays=age_groups(train_ages) if needs.get("methods") else None,
    )
    model = tiny_model()
    result = fit_stage(
        model,
        StageSpec.stage1(StageConfig(batch_size=16, loop=loop, **settings)),
        arrays,
        run_dir,
        context=RunContext(trainer=trainer, config_yaml="name: lean-test\n"),
    )
    return model, result


@pytest.mark.parametrize("name", list(CASES))
def test_lean_loop_gives_the_lightning_loops_weights_and_history(faces, name, tmp_path):
    a, ra = run_case(faces, "lightning", name, tmp_path / "lightning")
    b, rb = run_case(faces, "lean", name, tmp_path / "lean")
    assert (ra.loop, rb.loop) == ("lightning", "lean")
    assert rb.epochs == ra.epochs and len(rb.history) == ra.epochs
    assert list(rb.history.columns) == HISTORY_COLUMNS
    pd.testing.assert_frame_equal(rb.history, ra.history, check_exact=False, atol=1e-5, rtol=1e-5)
    assert rb.best_val_loss == pytest.approx(ra.best_val_loss, abs=1e-6)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-5, rtol=0, msg=key)
    # the model holds the best epoch's weights, the ones in -best.ckpt, which the rest of fairage reads
    best = read_checkpoint(rb.best_path)
    assert best["fairage_config"] == "name: lean-test\n"
    reloaded = tiny_model()
    load_module_checkpoint(reloaded, rb.best_path)
    for key, value in b.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    on_disk = pd.read_csv(tmp_path / "lean" / "history.csv")
    pd.testing.assert_frame_equal(
        on_disk, pd.read_csv(tmp_path / "lightning" / "history.csv"), check_exact=False, atol=1e-5, rtol=1e-5
    )
    # the comparison is between models that trained: the head moved from its initial weights
    assert not torch.equal(b.head[1].weight, tiny_model().head[1].weight)
    if name == "plateau":  # the schedule and the stop were exercised
        assert ra.history["lr"].nunique() > 1
        assert ra.epochs < CASES[name][0]["max_epochs"]
    if name == "dro_label_std":
        assert (tmp_path / "lean" / "dro_q.csv").read_text() == (tmp_path / "lightning" / "dro_q.csv").read_text()


def test_lean_loop_under_bf16_autocast_matches_lightnings(faces):
    # bf16-mixed: features extracted and training steps run under bf16 autocast, validation in
    # float32 (on a CPU without native bf16 this is emulated: slower, the same arithmetic)
    bf16 = TrainerConfig(precision="bf16-mixed")
    a, ra = run_case(faces, "lightning", "loss_weights_clip_warmup", trainer=bf16)
    b, rb = run_case(faces, "lean", "loss_weights_clip_warmup", trainer=bf16)
    _, r32 = run_case(faces, "lean", "loss_weights_clip_warmup")
    assert rb.loop == "lean"
    pd.testing.assert_frame_equal(rb.history, ra.history, check_exact=False, atol=1e-5, rtol=1e-5)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-5, rtol=0, msg=key)
    # bf16 is in effect: the float32 run's losses differ
    assert not np.allclose(rb.history["train_loss"], r32.history["train_loss"], atol=1e-7, rtol=0)


class _Abort(Exception):
    """Ends a run after the files of a kill have been copied."""


def test_lean_stage_resumed_after_a_hard_kill_ends_as_an_uninterrupted_one(faces, tmp_path, monkeypatch):
    whole, r_whole = run_case(faces, "lean", "dro_label_std", tmp_path / "whole")
    # write -last.ckpt after every epoch, and take the run folder as a SIGKILL after epoch 2 leaves it
    monkeypatch.setattr(lean_module, "LAST_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(lean_module, "LAST_EVERY_WRITES", 0.0)
    real_save = lean_module.save_torch
    killed = tmp_path / "killed"

    def save_then_kill(obj, path):
        real_save(obj, path)
        if path.name == "stage1-last.ckpt" and obj["epoch"] == 1:
            shutil.copytree(tmp_path / "cut", killed)
            raise _Abort

    monkeypatch.setattr(lean_module, "save_torch", save_then_kill)
    with pytest.raises(_Abort):
        run_case(faces, "lean", "dro_label_std", tmp_path / "cut")
    monkeypatch.setattr(lean_module, "save_torch", real_save)
    last = killed / "checkpoints" / "stage1-last.ckpt"
    assert read_checkpoint(last)["epoch"] == 1 and LEAN_KEY in read_checkpoint(last)
    history = pd.read_csv(killed / "history.csv")
    assert list(history["epoch"]) == [1, 2]

    settings, _ = CASES["dro_label_std"]
    train_images, train_ages, val_images, val_ages = faces
    arrays = StageArrays(train_images, train_ages, val_images, val_ages, face_arrays=age_groups(train_ages))
    resumed = tiny_model()
    r_resumed = fit_stage(
        resumed,
        StageSpec.stage1(StageConfig(batch_size=16, **settings)),
        arrays,
        killed,
        context=RunContext(trainer=FP32, config_yaml="name: lean-test\n"),
        ckpt_path=last,
        previous_history=history,
    )
    assert r_resumed.loop == "lean" and r_resumed.epochs == r_whole.epochs == 4
    pd.testing.assert_frame_equal(r_resumed.history, r_whole.history)
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert (killed / "dro_q.csv").read_text() == (tmp_path / "whole" / "dro_q.csv").read_text()


def test_run_killed_by_sigterm_in_a_lean_stage_resumes_as_if_uninterrupted(tiny_data, tmp_path, monkeypatch):
    # M2: one cached head-only stage; 6 epochs that neither stop early nor reduce the rate
    cfg = load_preset(
        "M2",
        "tiny",
        [
            "eval.n_boot=0",
            "eval.conformal.enabled=false",
            "stage1.max_epochs=6",
            "stage1.patience=10",
            "stage1.lr_patience=10",
        ],
    )
    train(cfg, tiny_data, tmp_path / "whole", progress=False)
    real_warm_up = AgeModule.warm_up

    def warm_up_or_terminate(self, optimizer, step, batches_per_epoch):  # called before every training step
        if step == 3 * batches_per_epoch + 1:  # inside epoch 4: SIGTERM, as fairage.training.interrupt raises it
            raise Terminated()
        real_warm_up(self, optimizer, step, batches_per_epoch)

    monkeypatch.setattr(AgeModule, "warm_up", warm_up_or_terminate)
    run = tmp_path / "run"
    with pytest.raises(Terminated):
        train(cfg, tiny_data, run, progress=False)
    # the interrupted loop wrote the last finished epoch (epoch 3) before the exception left it
    assert read_checkpoint(run / "checkpoints" / "stage1-last.ckpt")["epoch"] == 2
    monkeypatch.setattr(AgeModule, "warm_up", real_warm_up)
    resume_run(run, progress=False)
    for name in ("history.csv", "predictions_test.csv", "metrics_test.json"):
        assert (run / name).read_text() == (tmp_path / "whole" / name).read_text(), name


class Noop(Callback):
    pass


def test_the_loop_is_chosen_explicitly(faces, tmp_path):
    stage = StageConfig()
    assert choose_loop("stage1", stage, FP32, use_cache=True) == "lean"
    assert choose_loop("stage1", stage, FP32, use_cache=False) == "lightning"  # images: Lightning
    assert choose_loop("stage1", stage.model_copy(update={"loop": "lightning"}), FP32, use_cache=True) == "lightning"
    for trainer in (
        TrainerConfig(precision="16-mixed"),
        TrainerConfig(precision="32-true", logger="csv"),
        TrainerConfig(precision="32-true", devices=2),
        TrainerConfig(precision="32-true", deterministic=True),
    ):
        assert choose_loop("stage1", stage, trainer, use_cache=True) == "lightning"
    assert choose_loop("stage1", stage, FP32, use_cache=True, callbacks=[Noop()]) == "lightning"
    with pytest.raises(ConfigError, match="stage1.loop 'lean' cannot train this stage: extra Lightning callbacks"):
        choose_loop("stage1", stage.model_copy(update={"loop": "lean"}), FP32, use_cache=True, callbacks=[Noop()])

    # an interrupted stage resumes in the loop that wrote its -last.ckpt
    _, lightning = run_case(faces, "lightning", "bmc_projection", tmp_path / "a")
    _, lean = run_case(faces, "auto", "bmc_projection", tmp_path / "b")
    assert lean.loop == "lean"
    assert choose_loop("stage1", stage, FP32, use_cache=True, ckpt_path=lightning.last_path) == "lightning"
    assert choose_loop("stage1", stage, FP32, use_cache=True, ckpt_path=lean.last_path) == "lean"
    with pytest.raises(DataError, match="written by the lean loop"):
        choose_loop(
            "stage1", stage.model_copy(update={"loop": "lightning"}), FP32, use_cache=True, ckpt_path=lean.last_path
        )
