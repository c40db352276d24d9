"""The methods of fairage.models.losses in training: config checks, the DEX head, Group DRO's q log, label_std."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fairage.config.presets import load_preset
from fairage.config.schema import (
    DROConfig,
    HeadBlock,
    ModelConfig,
    StageConfig,
    validate_config,
)
from fairage.errors import ConfigError, DataError
from fairage.models.losses import StageObjective
from fairage.models.regressor import build_model
from fairage.training import StageArrays, StageSpec, fit_stage, images_to_input
from fairage.training.methods import build_objective, face_arrays, uses_methods
from fairage.workflows.suite import PRESET_GROUPS, expand_presets, suite_configs

SIZE = 16


def brightness_faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 16, 16, 3) grey images whose level is 30 + 2.2 age (+- 3 noise); ages (n,) uniform in [2, 90)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(2, 90, n).astype(np.float32)
    level = 30 + 2.2 * ages[:, None, None, None] + rng.normal(0, 3, (n, SIZE, SIZE, 1))
    return np.repeat(np.clip(level, 0, 255), 3, axis=3).astype(np.uint8), ages


def head_val_mae(output: str, loss: str, data, steps: int = 300) -> float:
    """Validation MAE (years) of a head trained full-batch on a frozen random resnet18's features."""
    train_images, train_ages, val_images, val_ages = data
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only wait for each other
    try:
        return _train_head(output, loss, train_images, train_ages, val_images, val_ages, steps)
    finally:
        torch.set_num_threads(threads)


def _train_head(output, loss, train_images, train_ages, val_images, val_ages, steps):
    model = build_model(
        ModelConfig(backbone="resnet18", projection_dim=None, head=[HeadBlock(units=64)], output=output)
    )[0].eval()
    with torch.no_grad():
        train_x = model.features(images_to_input(torch.from_numpy(train_images)))
        val_x = model.features(images_to_input(torch.from_numpy(val_images)))
    objective = StageObjective(loss, label_scale=model.label_scale, dex_sigma=2.0)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=3e-3)
    target = torch.from_numpy(train_ages)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(model.head_forward(train_x), target).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model.years(model.head_forward(val_x)) - torch.from_numpy(val_ages)).abs().mean())


def test_dex_head_learns_as_well_as_the_regression_head():
    """Both heads read the brightness through the same frozen features; DEX predicts the expected age."""
    data = (*brightness_faces(192, seed=0), *brightness_faces(96, seed=1))
    baseline = float(np.abs(data[3] - data[1].mean()).mean())  # always predicting the mean age
    regression = head_val_mae("sigmoid", "mse", data)
    dex = head_val_mae("dex", "ce", data)
    assert regression < 0.2 * baseline
    assert dex < 0.2 * baseline
    assert dex < 1.5 * regression + 1.0


def test_dex_model_outputs_logits_and_years_is_the_expectation():
    model = build_model(ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)], output="dex"))[0]
    model.eval()
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 101)
    probs = torch.softmax(out, 1)
    assert model.years(out).tolist() == pytest.approx((probs * torch.arange(101.0)).sum(1).tolist(), rel=1e-5)
    # the existing outputs keep their label units
    for output, scale in (("sigmoid", 100.0), ("linear", 1.0)):
        m = build_model(ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)], output=output))[0]
        assert m.label_scale == scale and m.years(torch.tensor([0.25])).tolist() == [0.25 * scale]


def test_loss_and_output_must_fit():
    raw = {"model": {"output": "dex"}, "stage2": {"loss": "mse"}}
    with pytest.raises(ConfigError, match="stage2.loss 'mse' does not fit model.output 'dex'"):
        validate_config(raw)
    with pytest.raises(ConfigError, match="loss ce needs output dex"):
        validate_config({"stage2": {"loss": "ce"}})
    with pytest.raises(ConfigError, match="unknown key 'stage2.dro.etaa'"):
        validate_config({"stage2": {"dro": {"enabled": True, "etaa": 1}}})
    assert validate_config({"model": {"output": "dex"}, "stage1": {"loss": "ce"}}).model.output == "dex"


def test_defaults_leave_every_method_off():
    for name in ("M1", "M2", "M3", "M4", "M5", "M5-lds", "M5-sampler"):
        cfg = load_preset(name, "cpu")
        for _, stage in cfg.stages():
            assert not uses_methods(stage)
            assert build_objective(stage, 100.0, np.zeros(3), None, 0) is None


def test_methods_group_and_presets():
    assert expand_presets(["methods"]) == ["M1", "M5", "M5-dro", "M5-bmc", "M5-std", "M5-dex", "M5-coral", "M5-corn"]
    assert expand_presets(["M2", "methods"])[:2] == ["M2", "M1"]
    assert [n for n, _ in suite_configs(["methods"], "tiny")] == list(PRESET_GROUPS["methods"])
    assert load_preset("M5-dro", "cpu").stage2.dro.enabled
    assert load_preset("M5-bmc", "cpu").stage2.loss == "bmc"
    assert load_preset("M5-std", "cpu").stage2.label_std == "sample"
    dex = load_preset("M5-dex", "cpu")
    assert dex.model.output == "dex" and dex.stage1.loss == dex.stage2.loss == "ce"


def faces_table(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": [f"f{i}.jpg" for i in range(n)],
            "age": [10.0, 30.0, 30.0, 50.0, 70.0, 25.0, 45.0, 65.0][:n],
            "ethnicity": [
                "caucasian",
                "asian",
                "caucasian",
                "afroamerican",
                "asian",
                "caucasian",
                "caucasian",
                "caucasian",
            ][:n],
            "age_std": [1.0, 2.0, 3.0, 0.5, 4.0, 2.0, 1.5, 2.5][:n],
        }
    )


def test_face_arrays_groups_and_std():
    faces = faces_table()
    stage = StageConfig(dro=DROConfig(enabled=True, scheme="age_ethnicity"), label_std="weight")
    arrays = face_arrays(faces, stage)
    # non-empty groups in scheme order: [0,20)|caucasian, [20,40)|asian, [20,40)|caucasian,
    # [40,60)|afroamerican, [40,60)|caucasian, [60,inf) (asian 70 and caucasian 65 merged)
    assert arrays.group_names == [
        "[0,20)|caucasian",
        "[20,40)|asian",
        "[20,40)|caucasian",
        "[40,60)|afroamerican",
        "[40,60)|caucasian",
        "[60,inf)",
    ]
    assert arrays.groups.tolist() == [0, 1, 2, 3, 5, 2, 4, 5]
    assert arrays.group_sizes.tolist() == [1, 1, 2, 1, 1, 2]
    assert arrays.age_std.tolist() == faces["age_std"].tolist()


def test_label_std_without_age_std_is_a_clear_error():
    faces = faces_table().drop(columns="age_std")
    with pytest.raises(ConfigError, match="stage2.label_std 'sample' needs .*age_std"):
        face_arrays(faces, StageConfig(label_std="sample"), "stage2")
    faces = faces_table()
    faces.loc[3, "age_std"] = np.nan
    with pytest.raises(DataError, match="1 training face.*'f3.jpg'"):
        face_arrays(faces, StageConfig(label_std="weight"), "stage2")


def test_fit_stage_with_dro_bmc_and_label_noise_writes_the_q_trajectory(tmp_path):
    images, ages = brightness_faces(48, seed=2)
    faces = pd.DataFrame(
        {
            "image": [f"f{i}" for i in range(48)],
            "age": ages,
            "ethnicity": np.where(np.arange(48) % 4 == 0, "asian", "caucasian"),
            "age_std": np.full(48, 2.0),
        }
    )
    stage = StageConfig(
        lr=1e-3,
        batch_size=16,
        max_epochs=2,
        loss="bmc",
        label_std="sample",
        dro=DROConfig(enabled=True, scheme="custom", attributes=["ethnicity"], eta=5.0),
    )
    arrays = face_arrays(faces, stage)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=8)]))[0]
    result = fit_stage(
        model,
        StageSpec.stage2(stage),
        StageArrays(images, ages, images[:16], ages[:16], face_arrays=arrays),
        run_dir=tmp_path,
    )
    assert len(result.history) == 2 and np.isfinite(result.history["train_loss"]).all()
    q = pd.read_csv(tmp_path / "dro_q.csv")
    assert list(q.columns) == ["epoch", "stage", "q[asian]", "q[caucasian]"]
    assert q["epoch"].tolist() == [1, 2] and set(q["stage"]) == {"stage2"}
    assert q[["q[asian]", "q[caucasian]"]].sum(axis=1).to_numpy() == pytest.approx([1.0, 1.0])
    assert not np.allclose(q["q[asian]"], 0.5)  # q moved away from uniform
    ckpt = torch.load(tmp_path / "checkpoints" / "stage2-last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["objective.dro.q"].tolist() == pytest.approx(q.iloc[-1, 2:].tolist(), rel=1e-6)
    assert "objective.bmc.noise_sigma" in ckpt["state_dict"]
    with pytest.raises(ConfigError, match="dro.enabled needs"):
        fit_stage(
            model,
            StageSpec.stage2(stage),
            StageArrays(images, ages, images[:16], ages[:16]),
            run_dir=tmp_path / "again",
        )
