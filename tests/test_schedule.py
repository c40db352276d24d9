"""The stage learning-rate schedules: the plateau schedule's warm-up and the cosine schedule."""

from __future__ import annotations

import pytest

from fairage.config.presets import load_preset
from fairage.store.run_folder import RunFolder


def test_cosine_schedule_warms_up_then_decays_to_min_lr(tmp_path, tiny_data):
    from fairage.training import train

    # 64 training faces at batch 16: 4 steps an epoch, 16 in all; warm-up over the first 4
    cfg = load_preset(
        "M1",
        "tiny",
        [
            "eval.n_boot=0",
            "eval.n_perm=0",
            "stage2.lr_schedule=cosine",
            "stage2.lr=1e-3",
            "stage2.min_lr=1e-5",
            "stage2.warmup_epochs=1",
            "stage2.max_epochs=4",
            "stage2.patience=4",
            "stage2.batch_size=16",
            "stage2.stop_on_collapse=false",
        ],
    )
    train(cfg, tiny_data, tmp_path / "run", progress=False)
    history = RunFolder.open(tmp_path / "run").history()
    # the rate at each epoch's first step (steps 0, 4, 8, 12): 1e-3 * factor, with
    # factor = (step + 1) / 4 in the warm-up, then 0.01 + 0.99 * (1 + cos(pi * (step - 4) / 12)) / 2
    expected = [2.5e-4, 1e-3, 7.525e-4, 2.575e-4]
    assert history["lr"].tolist() == pytest.approx(expected, rel=1e-6)


def test_plateau_schedule_warm_up_is_linear_per_step(tmp_path, tiny_data):
    from fairage.training import train

    cfg = load_preset(
        "M1",
        "tiny",
        [
            "eval.n_boot=0",
            "eval.n_perm=0",
            "stage2.lr=1e-3",
            "stage2.warmup_epochs=2",
            "stage2.max_epochs=3",
            "stage2.patience=3",
            "stage2.batch_size=16",
            "stage2.stop_on_collapse=false",
        ],
    )
    train(cfg, tiny_data, tmp_path / "run", progress=False)
    lrs = RunFolder.open(tmp_path / "run").history()["lr"].tolist()
    # 8 warm-up steps: the history records the rate an epoch started with, before that epoch's
    # first warm-up step sets it (epoch 1: Adam's initial 1e-3; epoch 2: step 3's 4/8 * 1e-3)
    assert lrs[1] == pytest.approx(0.5e-3) and lrs[2] == pytest.approx(1e-3)


def test_max_images_caps_the_epochs_and_the_cosine_schedule_follows(tmp_path, tiny_data):
    from fairage.training import train

    # 64 training faces, at most 150 images: floor(150 / 64) = 2 epochs of 4 steps, though max_epochs is 5
    cfg = load_preset(
        "M1",
        "tiny",
        [
            "eval.n_boot=0",
            "eval.n_perm=0",
            "stage2.lr_schedule=cosine",
            "stage2.lr=1e-3",
            "stage2.min_lr=0",
            "stage2.max_epochs=5",
            "stage2.patience=5",
            "stage2.max_images=150",
            "stage2.batch_size=16",
            "stage2.stop_on_collapse=false",
        ],
    )
    train(cfg, tiny_data, tmp_path / "run", progress=False)
    history = RunFolder.open(tmp_path / "run").history()
    assert history["epoch"].tolist() == [1, 2]
    # no warm-up; 8 steps: epoch 2 starts at step 4, halfway down the cosine to 0
    assert history["lr"].tolist() == pytest.approx([1e-3, 0.5e-3], rel=1e-6)


def test_epochs_for_keeps_within_the_image_budget():
    from fairage.config.schema import StageConfig

    assert StageConfig(max_epochs=20, max_images=100_000).epochs_for(7_000) == 14  # 98,000 images
    assert StageConfig(max_epochs=20, max_images=100_000).epochs_for(3_000) == 20
    assert StageConfig(max_epochs=20, max_images=100_000).epochs_for(200_000) == 1
    assert StageConfig(max_epochs=20).epochs_for(3_000) == 20


def test_a_cosine_stage_trains_in_the_lightning_loop():
    from fairage.config.schema import StageConfig, TrainerConfig
    from fairage.training.lean import choose_loop

    trainer = TrainerConfig(accelerator="cpu", precision="32-true", logger="none")
    assert choose_loop("stage1", StageConfig(), trainer, use_cache=True) == "lean"
    assert choose_loop("stage1", StageConfig(lr_schedule="cosine"), trainer, use_cache=True) == "lightning"
