"""fairage.training core on in-memory arrays: learning, stage I freezing, feature cache, NaN stop.

Images are procedural: a bright square whose side grows with the age, so a tiny
resnet18 at 32 px can learn the age in a few epochs.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import square_faces
from lightning.pytorch.callbacks import Callback

from fairage.config.schema import HeadBlock, ModelConfig, StageConfig
from fairage.models.regressor import build_model
from fairage.training import NonFiniteLossError, RunContext, StageArrays, StageSpec, fit_stage, predict

SIZE = 32


@pytest.fixture(scope="module")
def faces():
    train_images, train_ages = square_faces(96, seed=0)
    val_images, val_ages = square_faces(32, seed=1)
    return train_images, train_ages, val_images, val_ages


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    base = {"backbone": "resnet18", "projection_dim": 16, "head": [HeadBlock(dropout=0.2, units=32)]}
    base.update(kw)
    return build_model(ModelConfig(**base))[0]


def test_loss_decreases_and_model_learns_the_age(faces, tmp_path):
    train_images, train_ages, val_images, val_ages = faces
    model = tiny_model(projection_dim=None, head=[HeadBlock(units=32)])
    result = fit_stage(
        model,
        StageSpec.stage2(StageConfig(lr=1e-3, batch_size=16, max_epochs=3)),
        StageArrays(train_images, train_ages, val_images, val_ages),
        run_dir=tmp_path,
    )
    h = result.history
    assert list(h["epoch"]) == [1, 2, 3] and set(h["stage"]) == {"stage2"}
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    # baseline: always predicting the mean training age
    baseline_mae = float(np.abs(val_ages - train_ages.mean()).mean())
    assert h["val_mae"].min() < 0.75 * baseline_mae
    # the model now holds the best epoch's weights: its val MAE is the best logged one
    years = predict(model, val_images)
    assert years.shape == (32,)
    np.testing.assert_allclose(np.abs(years - val_ages).mean(), h["val_mae"].min(), rtol=1e-4)
    # history.csv on disk matches; checkpoints load with weights_only=True
    on_disk = pd.read_csv(tmp_path / "history.csv")
    assert list(on_disk.columns) == ["epoch", "stage", "train_loss", "val_loss", "train_mae", "val_mae", "lr"]
    np.testing.assert_allclose(on_disk["val_loss"], h["val_loss"])
    assert (on_disk["lr"] == 1e-3).all()
    for name in ("stage2-best.ckpt", "stage2-last.ckpt"):
        ckpt = torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert "state_dict" in ckpt
    last = torch.load(tmp_path / "checkpoints" / "stage2-last.ckpt", weights_only=True)
    assert last["epoch"] == 2  # zero-based: three epochs ran


def test_stage1_leaves_backbone_and_batchnorm_statistics_untouched(faces):
    train_images, train_ages, val_images, val_ages = faces
    model = tiny_model()
    before_features = copy.deepcopy(model.backbone.state_dict()) | {
        f"projection.{k}": v.clone() for k, v in model.projection.state_dict().items()
    }
    head_before = copy.deepcopy(model.head.state_dict())
    fit_stage(
        model,
        StageSpec.stage1(StageConfig(lr=1e-2, batch_size=16, max_epochs=1, cache_features=False)),
        StageArrays(train_images, train_ages, val_images, val_ages),
    )
    after = model.backbone.state_dict() | {f"projection.{k}": v for k, v in model.projection.state_dict().items()}
    assert any("running_mean" in k for k in after)
    for name, value in before_features.items():
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())


def test_cached_and_uncached_stage1_agree(faces):
    train_images, train_ages, val_images, val_ages = faces
    cached, uncached = tiny_model(seed=3), tiny_model(seed=3)
    stage = StageConfig(lr=1e-2, batch_size=16, max_epochs=2)
    arrays = StageArrays(train_images, train_ages, val_images, val_ages)
    r_cached = fit_stage(cached, StageSpec.stage1(stage), arrays, cache_features=True)
    r_plain = fit_stage(uncached, StageSpec.stage1(stage), arrays, cache_features=False)
    for name, value in uncached.head.state_dict().items():
        torch.testing.assert_close(cached.head.state_dict()[name], value, atol=1e-4, rtol=0)
    np.testing.assert_allclose(r_cached.history["val_loss"], r_plain.history["val_loss"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(r_cached.history["train_loss"], r_plain.history["train_loss"], atol=1e-4, rtol=0)
    # training changed the head (the comparison is not between two untouched models)
    assert not torch.equal(cached.head[1].weight, tiny_model(seed=3).head[1].weight)


class ExplodeLearningRate(Callback):
    """From the second epoch on, set a learning rate that makes the loss non-finite."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e10


def test_non_finite_loss_stops_the_stage_and_keeps_the_best(faces, tmp_path):
    # few faces: non-finite arithmetic is slow on CPUs
    train_images, train_ages, val_images, val_ages = (a[:32] for a in faces)
    model = tiny_model(projection_dim=None, head=[HeadBlock(units=32)], output="linear")
    result = fit_stage(
        model,
        StageSpec.stage2(StageConfig(lr=1e-3, batch_size=16, max_epochs=4)),
        StageArrays(train_images, train_ages, val_images, val_ages),
        run_dir=tmp_path,
        context=RunContext(callbacks=[ExplodeLearningRate()]),
    )
    h = result.history
    assert list(h["epoch"]) == [1, 2]  # stopped right after the first non-finite epoch
    assert np.isfinite(h["val_loss"].iloc[0]) and not np.isfinite(h["train_loss"].iloc[1])
    assert "stage2" in result.non_finite and "epoch 2" in result.non_finite
    assert result.best_val_loss == pytest.approx(h["val_loss"].iloc[0], rel=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    np.testing.assert_allclose(np.abs(predict(model, val_images) - val_ages).mean(), h["val_mae"].iloc[0], rtol=1e-4)


def test_non_finite_from_the_first_epoch_is_an_error(faces):
    train_images, train_ages, val_images, val_ages = (a[:16] for a in faces)
    model = tiny_model(projection_dim=None, head=[HeadBlock(units=32)], output="linear")
    with pytest.raises(NonFiniteLossError, match="no finite validation loss"):
        fit_stage(
            model,
            StageSpec.stage2(StageConfig(lr=1e10, batch_size=8, max_epochs=3)),
            StageArrays(train_images, train_ages, val_images, val_ages),
        )


def test_augmentation_only_for_chosen_ages():
    from fairage.config.schema import AugmentConfig
    from fairage.training import AgeModule, images_to_input

    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    ages = torch.tensor([10.0, 70.0, 60.0])
    flip_only = AugmentConfig(enabled=True, hflip=1.0, brightness=0, contrast=0, blur_sigma=0, translate=0, min_age=60)
    module = AgeModule(tiny_model(), StageConfig(augment=flip_only), frozen=False, image_size=SIZE)
    plain = images_to_input(images)
    out = module.prepare_images(images, ages, augment=True)
    torch.testing.assert_close(out[0], plain[0])  # 10 years: below min_age, untouched
    torch.testing.assert_close(out[1], plain[1].flip(-1))  # flipped horizontally (p = 1)
    torch.testing.assert_close(out[2], plain[2].flip(-1))  # min_age is inclusive
    # validation batches are never augmented
    torch.testing.assert_close(module.prepare_images(images, ages, augment=False), plain)


def test_augmented_stage_trains_on_all_transforms(faces):
    from fairage.config.schema import AugmentConfig

    train_images, train_ages, val_images, val_ages = (a[:32] for a in faces)
    model = tiny_model()
    stage = StageConfig(lr=1e-3, batch_size=16, max_epochs=1, augment=AugmentConfig(enabled=True, min_age=40))
    # augmentation on: stage I cannot use cached features and runs the image path
    result = fit_stage(model, StageSpec.stage1(stage), StageArrays(train_images, train_ages, val_images, val_ages))
    assert np.isfinite(result.history["train_loss"]).all() and len(result.history) == 1


def test_same_seed_same_run(faces):
    from fairage.config.schema import TrainerConfig

    train_images, train_ages, val_images, val_ages = (a[:32] for a in faces)
    stage = StageConfig(lr=1e-3, batch_size=8, max_epochs=1)
    runs = []
    for _ in range(2):
        model = tiny_model(seed=7)
        result = fit_stage(
            model,
            StageSpec.stage2(stage),
            StageArrays(train_images, train_ages, val_images, val_ages),
            context=RunContext(trainer=TrainerConfig(deterministic=True), seed=11),
        )
        runs.append((result.history, predict(model, val_images)))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_loss_mode_weights_reach_the_loss(faces):
    train_images, train_ages, val_images, val_ages = (a[:32] for a in faces)
    model = tiny_model()
    head_before = copy.deepcopy(model.head.state_dict())
    stage = StageConfig(lr=1e-2, batch_size=8, max_epochs=1)  # weighting.mode defaults to "loss"
    # every face weighted 0: zero loss, zero gradients, Adam leaves the head exactly as it was
    result = fit_stage(
        model,
        StageSpec.stage1(stage),
        StageArrays(train_images, train_ages, val_images, val_ages, train_weights=np.zeros(32)),
    )
    assert result.history["train_loss"].iloc[0] == 0.0
    assert result.history["val_loss"].iloc[0] > 0  # validation loss is never weighted
    for name, value in head_before.items():
        assert torch.equal(model.head.state_dict()[name], value), name


def test_random_shift_is_a_whole_pixel_affine_move_within_the_range():
    from torchvision.transforms.v2 import functional as F

    from fairage.training.module import random_shift

    torch.manual_seed(3)
    x = torch.rand(40, 3, 20, 20)
    out = random_shift(x, 0.1)  # up to round(2.0) = 2 pixels each way
    seen = set()
    for img, moved in zip(x, out, strict=True):
        matches = [
            (dx, dy)
            for dx in range(-2, 3)
            for dy in range(-2, 3)
            if torch.equal(F.affine(img, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0]), moved)
        ]
        assert len(matches) == 1, matches  # random images: exactly one offset explains the result
        seen.add(matches[0])
    assert len(seen) > 10  # offsets differ from image to image
    assert {dx for dx, _ in seen} == {-2, -1, 0, 1, 2}


def test_translate_only_augmentation_moves_only_chosen_faces():
    from fairage.config.schema import AugmentConfig
    from fairage.training import AgeModule, images_to_input

    rng = np.random.default_rng(6)
    images = torch.from_numpy(rng.integers(1, 256, (6, SIZE, SIZE, 3), dtype=np.uint8))
    ages = torch.tensor([10.0, 70.0, 10.0, 70.0, 70.0, 70.0])
    shift_only = AugmentConfig(
        enabled=True, hflip=0, brightness=0, contrast=0, blur_sigma=0, translate=0.25, min_age=60
    )
    module = AgeModule(tiny_model(), StageConfig(augment=shift_only), frozen=False, image_size=SIZE)
    torch.manual_seed(0)
    out = module.prepare_images(images, ages, augment=True)
    plain = images_to_input(images)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]])
    # a shifted face keeps its pixels, moved, with zeros where it left the frame
    moved = [not torch.equal(out[i], plain[i]) for i in (1, 3, 4, 5)]
    assert any(moved)
    for i in (1, 3, 4, 5):
        assert torch.isin(out[i].flatten(), torch.cat([plain[i].flatten(), torch.zeros(1)])).all()
