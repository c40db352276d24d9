"""Stage I with ``trainable: projection+head`` (the kit's stage I), Keras optimiser/init options, replication."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import square_faces

from fairage.config.schema import HeadBlock, ModelConfig, StageConfig
from fairage.models.regressor import build_model
from fairage.training import AgeModule, StageArrays, StageSpec, extract_features, fit_stage
from fairage.training.augment import replicate_faces

SIZE = 32


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="resnet18", projection_dim=16, head=[HeadBlock(units=8)]))[0]


@pytest.fixture(scope="module")
def faces():
    return (*square_faces(48, 0), *square_faces(16, 1))


def test_feature_cache_holds_the_pooled_backbone_output_when_the_projection_trains(faces):
    model = tiny_model()
    images = faces[0][:4]
    assert extract_features(model, images).shape == (4, 16)
    pooled = extract_features(model, images, trainable="projection+head")
    assert pooled.shape == (4, 512)  # resnet18 pools 512-d, before the projection
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(model.eval().trainable_forward(pooled, "projection+head"), model(x))


@pytest.mark.parametrize("cache", [True, False])
def test_projection_and_head_train_backbone_stays(faces, cache):
    model = tiny_model(seed=1)
    backbone = copy.deepcopy(model.backbone.state_dict())
    projection = copy.deepcopy(model.projection.state_dict())
    head = copy.deepcopy(model.head.state_dict())
    stage = StageConfig(lr=1e-2, batch_size=16, max_epochs=1, trainable="projection+head", cache_features=cache)
    fit_stage(model, StageSpec.stage1(stage), StageArrays(*faces))
    for name, value in backbone.items():  # BatchNorm statistics included
        assert torch.equal(model.backbone.state_dict()[name], value), name
    assert not torch.equal(model.projection.weight, projection["weight"])
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in head.items())


def test_cached_and_uncached_projection_training_agree(faces):
    cached, plain = tiny_model(seed=2), tiny_model(seed=2)
    stage = StageConfig(lr=1e-2, batch_size=16, max_epochs=2, trainable="projection+head")
    a = fit_stage(cached, StageSpec.stage1(stage), StageArrays(*faces), cache_features=True)
    b = fit_stage(plain, StageSpec.stage1(stage), StageArrays(*faces), cache_features=False)
    torch.testing.assert_close(cached.projection.weight, plain.projection.weight, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a.history["val_loss"], b.history["val_loss"], atol=1e-4, rtol=0)


def test_module_freezes_what_trainable_says():
    model = tiny_model()
    head_only = AgeModule(model, StageConfig(), frozen=True)
    assert not any(p.requires_grad for p in model.projection.parameters())
    both = AgeModule(model, StageConfig(trainable="projection+head"), frozen=True)
    assert all(p.requires_grad for p in model.projection.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    both.train()
    assert not model.backbone.training and model.projection.training
    stage2 = AgeModule(model, StageConfig(trainable="head"), frozen=False)  # stage II: everything trains
    assert all(p.requires_grad for p in model.parameters())
    assert head_only.frozen_modules() and stage2.frozen_modules() == []


def test_adam_eps_reaches_the_optimizer():
    module = AgeModule(tiny_model(), StageConfig(adam_eps=1e-7), frozen=False)
    assert module.configure_optimizers()["optimizer"].param_groups[0]["eps"] == 1e-7
    assert StageConfig().adam_eps == 1e-8  # torch's default unless asked


def test_keras_head_init_is_glorot_uniform_with_zero_bias():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(backbone="resnet18", projection_dim=512, head=[HeadBlock(units=128)], head_init="keras")
    )[0]
    linear = model.head[0].requires_grad_(False)
    bound = math.sqrt(6 / (512 + 128))  # glorot-uniform limit
    assert float(linear.weight.abs().max()) <= bound
    assert float(linear.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform std = limit/sqrt(3)
    assert torch.equal(linear.bias, torch.zeros(128))
    torch_default = build_model(ModelConfig(backbone="resnet18", projection_dim=512, head=[HeadBlock(units=128)]))[0]
    assert bool((torch_default.head[0].bias != 0).any())


# --------------------------------------------------------------------------- replication


def test_replicate_copies_faces_at_least_min_age():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    ages = np.array([30.0, 60.0, 59.9, 75.0])
    out, source = replicate_faces(images, ages, min_age=60, seed=1)
    assert out.shape == (4 + 2 * 4, 64, 64, 3) and out.dtype == np.uint8
    assert source.tolist() == [0, 1, 2, 3, 1, 1, 1, 1, 3, 3, 3, 3]
    assert np.array_equal(out[:4], images)
    assert np.array_equal(out[4], images[1][:, ::-1])  # horizontal flip
    again, _ = replicate_faces(images, ages, min_age=60, seed=1)
    assert np.array_equal(out, again)  # seeded
    everyone, source_all = replicate_faces(images, ages, min_age=None, seed=1)
    assert len(everyone) == 20 and source_all[4:8].tolist() == [0, 0, 0, 0]


def test_replicate_brightness_halves_hsv_value():
    face = np.zeros((1, 16, 16, 3), np.uint8)
    face[0, :, :8] = (200, 100, 50)  # V = 200 -> 100: every channel halves, hue and saturation kept
    face[0, :, 8:] = (90, 90, 90)  # grey: V 90 -> 45
    darker = replicate_faces(face, np.array([70.0]))[0][2]
    assert np.abs(darker[0, 0].astype(int) - (100, 50, 25)).max() <= 1
    assert darker[0, 15].tolist() == [45, 45, 45]


def test_replicate_blur_is_5x5_gaussian_sigma_1():
    face = np.zeros((1, 15, 15, 3), np.uint8)
    face[0, 7, 7] = 255
    blurred = replicate_faces(face, np.array([70.0]))[0][3].astype(float)
    g = np.exp(-(np.arange(-2, 3) ** 2) / 2.0)
    g /= g.sum()
    expected = 255 * np.outer(g, g)  # separable kernel, 5x5 support
    assert np.abs(blurred[5:10, 5:10, 0] - expected).max() <= 1
    assert blurred[4, 7, 0] == 0 and blurred[7, 10, 0] == 0  # nothing beyond the 5x5 support


def _shift_of(shifted: np.ndarray) -> tuple[int, int]:
    """(dx, dy) of an image moved with a black border, from where the border is."""
    side = shifted.shape[0]
    rows = np.flatnonzero(shifted.any(axis=(1, 2)))
    cols = np.flatnonzero(shifted.any(axis=(0, 2)))
    dy = rows[0] if rows[0] > 0 else -(side - 1 - rows[-1])
    dx = cols[0] if cols[0] > 0 else -(side - 1 - cols[-1])
    return int(dx), int(dy)


@pytest.mark.parametrize("side, max_shift", [(224, 25), (64, 7)])
def test_replicate_shift_is_within_25_of_224_of_the_side(side, max_shift):
    rng = np.random.default_rng(3)
    images = rng.integers(1, 256, (8, side, side, 3), dtype=np.uint8)  # no zero pixels: borders show
    out, _ = replicate_faces(images, np.full(8, 80.0), seed=4)
    shifts = []
    for i in range(8):
        shifted = out[8 + 4 * i + 3]
        dx, dy = _shift_of(shifted)
        assert abs(dx) <= max_shift and abs(dy) <= max_shift
        expected = np.zeros_like(images[i])
        expected[max(dy, 0) : side + min(dy, 0), max(dx, 0) : side + min(dx, 0)] = images[i][
            max(-dy, 0) : side - max(dy, 0), max(-dx, 0) : side - max(dx, 0)
        ]
        assert np.array_equal(shifted, expected), i
        shifts.append((dx, dy))
    assert len(set(shifts)) > 1  # drawn, not one fixed shift


def test_plateau_threshold_is_absolute_with_lr_min_delta():
    scheduler = AgeModule(tiny_model(), StageConfig(lr_min_delta=1e-4), frozen=False).configure_optimizers()
    plateau = scheduler["lr_scheduler"]["scheduler"]
    assert (plateau.threshold, plateau.threshold_mode) == (1e-4, "abs")
    default = AgeModule(tiny_model(), StageConfig(), frozen=False).configure_optimizers()["lr_scheduler"]["scheduler"]
    assert default.threshold_mode == "rel"


def test_run_trains_on_the_replicated_faces(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from fairage.config.presets import load_preset
    from fairage.data import load_faces, write_synthetic
    from fairage.training import train

    data = write_synthetic(tmp_path / "data", n_train=40, n_valid=16, n_test=16, size=32, seed=0, workers=1)
    faces = load_faces(data)
    old = int((faces[(faces["split"] == "train")]["age"] >= 60).sum())
    assert old > 0

    class TrainingSetSize(Callback):
        sizes: ClassVar[list[int]] = []  # one list for every instance Lightning makes

        def on_train_start(self, trainer, pl_module):
            self.sizes.append(len(trainer.train_dataloader.dataset))

    cfg = load_preset(
        "M2",
        "tiny",
        [
            "stage1.max_epochs=1",
            "eval.n_boot=10",
            "stage1.augment.enabled=true",
            "stage1.augment.mode=replicate",
            "stage1.augment.min_age=60",
        ],
    )
    seen = TrainingSetSize()
    train(cfg, data, tmp_path / "run", progress=False, callbacks=[seen])
    assert seen.sizes == [40 + 4 * old]
