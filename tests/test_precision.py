"""Training precision: what ``precision: auto`` picks per device, and float32 evaluation after bf16 training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import square_faces

from fairage.config.presets import load_preset
from fairage.config.schema import HeadBlock, ModelConfig, StageConfig, TrainerConfig
from fairage.data import write_synthetic
from fairage.models.regressor import AgeRegressor, build_model
from fairage.store.checkpoint import load_weights as load_module_checkpoint
from fairage.training import (
    RunContext,
    StageArrays,
    StageSpec,
    fit_stage,
    images_to_input,
    load_run_data,
    predict,
    resolve_precision,
    train,
)


def _cpu_capability(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (True, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_auto_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    _cpu_capability(monkeypatch, avx512_bf16, amx)
    assert resolve_precision(TrainerConfig(accelerator="cpu")) == expected


def test_a_forced_precision_is_kept(monkeypatch):
    _cpu_capability(monkeypatch, True, True)
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="32-true")) == "32-true"
    _cpu_capability(monkeypatch, False, False)
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, bf16, expected):
    _cpu_capability(monkeypatch, True, True)  # the CPU's capability does not matter on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_precision(TrainerConfig(accelerator="gpu")) == expected
    assert resolve_precision(TrainerConfig(accelerator="auto")) == expected


def _fp32_and_bf16_years(
    model: AgeRegressor, images: np.ndarray, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The model's ages by a plain float32 forward, and by the same forward under bf16 autocast;
    ``channels_last``: with the weights in the layout a run trained them in."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = images_to_input(torch.from_numpy(np.array(images)))
    with torch.no_grad():
        fp32 = model.years(model(x)).double().numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.years(model(x)).double().numpy()
    return fp32, bf16


def test_predictions_after_bf16_training_are_float32():
    train_images, train_ages = square_faces(64, seed=0)
    val_images, val_ages = square_faces(32, seed=1)
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone="resnet18", projection_dim=16, head=[HeadBlock(units=32)]))
    result = fit_stage(
        model,
        StageSpec.stage2(StageConfig(lr=1e-3, batch_size=16, max_epochs=1)),
        StageArrays(train_images, train_ages, val_images, val_ages),
        context=RunContext(trainer=TrainerConfig(accelerator="cpu", precision="bf16-mixed")),
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    years = predict(model, val_images)
    fp32, bf16 = _fp32_and_bf16_years(model, val_images)
    np.testing.assert_array_equal(years, fp32)
    # bf16 would have given other ages: the comparison above can tell the two apart
    assert np.abs(bf16 - fp32).max() > 1e-3
    # the validation step scored the model in float32 too (the one epoch is the best one)
    val_mae = float(result.history["val_mae"].iloc[0])
    assert val_mae == pytest.approx(np.abs(fp32 - val_ages).mean(), rel=1e-5)
    assert abs(val_mae - np.abs(bf16 - val_ages).mean()) > 1e-3


def test_a_bf16_run_records_its_precision_and_predicts_the_test_split_in_float32(tmp_path):
    data_dir = write_synthetic(tmp_path / "data", n_train=48, n_valid=16, n_test=24, size=32, seed=0, workers=1)
    cfg = load_preset(
        "M1",
        "tiny",
        [
            "eval.n_boot=0",
            "trainer.accelerator=cpu",
            "trainer.precision=bf16-mixed",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run_dir = tmp_path / "run"
    train(cfg, data_dir, run_dir, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["precision"] == "bf16-mixed"
    model = AgeRegressor(cfg.model)
    load_module_checkpoint(model, run_dir / "checkpoints" / "stage2-best.ckpt")
    test_images = load_run_data(cfg, data_dir, progress=False).images["test"]
    fp32, bf16 = _fp32_and_bf16_years(model, test_images, channels_last=cfg.trainer.channels_last)
    written = pd.read_csv(run_dir / "predictions_test.csv")["prediction"].to_numpy()
    np.testing.assert_allclose(written, fp32, rtol=0, atol=2e-6)  # the file keeps 6 decimals
    assert np.abs(bf16 - fp32).max() > 1e-3
