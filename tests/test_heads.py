"""The ordinal heads (CORAL, CORN), the per-face spread and the loss that follows the head.

Hand-worked values use K = 5 classes (4 thresholds) and logits whose sigmoids are simple:
``sigmoid(0) = 1/2`` and ``sigmoid(ln 3) = 3/4``, so a task's binary cross-entropy is ``ln 2``
at logit 0, ``ln(4/3)`` for a true "older than k" at logit ln 3 and ``ln 4`` for a false one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from coral_pytorch.losses import coral_loss, corn_loss

from fairage.config.presets import load_preset
from fairage.config.schema import HeadBlock, ModelConfig, StageConfig, validate_config
from fairage.errors import ConfigError
from fairage.models.losses import (
    StageObjective,
    coral_loss_per_face,
    corn_loss_per_face,
    dex_spread,
    ordinal_ages,
    ordinal_levels,
    ordinal_spread,
)
from fairage.models.regressor import build_model
from fairage.store.predictions import read_predictions
from fairage.training import StageArrays, StageSpec, fit_stage, train

LN3 = math.log(3.0)
#: three faces (ages 2, 0.4 -> class 0, 4) and their logits over the 4 thresholds
AGES = torch.tensor([2.0, 0.4, 4.0])
LOGITS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, -LN3, 0.0], [LN3, LN3, LN3, LN3]])


def test_ordinal_levels_count_the_thresholds_below_the_age():
    assert ordinal_levels(AGES, 5).tolist() == [
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [1, 1, 1, 1],
    ]
    assert ordinal_levels(torch.tensor([130.0, -3.0]), 101).sum(1).tolist() == [
        100,
        0,
    ]  # clamped to 0..100


def test_coral_loss_by_hand_and_as_coral_pytorch():
    ln2, ln43, ln4 = math.log(2), math.log(4 / 3), math.log(4)
    # face 1: four tasks at logit 0; face 2 (class 0): every task false; face 3 (top class): every task true
    expected = [4 * ln2, ln4 + ln2 + ln43 + ln2, 4 * ln43]
    assert coral_loss_per_face(LOGITS, AGES).tolist() == pytest.approx(expected, rel=1e-6)
    levels = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert float(coral_loss_per_face(LOGITS, AGES).mean()) == pytest.approx(float(coral_loss(LOGITS, levels)))


def test_corn_loss_by_hand_and_as_coral_pytorch():
    ln2, ln43, ln4 = math.log(2), math.log(4 / 3), math.log(4)
    # CORN trains task k on the faces of class > k-1: face 1 (class 2) in tasks 0, 1, 2 (true, true,
    # false), face 2 (class 0) in task 0 only (false), face 3 (class 4) in all four (true)
    sums = [3 * ln2, ln4, 4 * ln43]
    pairs = 3 + 1 + 4
    per_face = corn_loss_per_face(LOGITS, AGES)
    assert per_face.tolist() == pytest.approx([s * 3 / pairs for s in sums], rel=1e-6)
    assert float(per_face.mean()) == pytest.approx(sum(sums) / pairs, rel=1e-6)
    assert float(per_face.mean()) == pytest.approx(float(corn_loss(LOGITS, torch.tensor([2, 0, 4]), 5)), rel=1e-6)


def test_sample_weights_multiply_each_faces_share():
    weight = torch.tensor([2.0, 0.0, 1.0])
    for kind, fn in (("coral", coral_loss_per_face), ("corn", corn_loss_per_face)):
        objective = StageObjective(kind)
        expected = float((fn(LOGITS, AGES) * weight).mean())
        assert float(objective(LOGITS, AGES, weight)) == pytest.approx(expected, rel=1e-6)
        # a face with weight 0 does not change the loss (CORN: up to the shared pair count)
        if kind == "coral":
            two = objective(LOGITS[[0, 2]], AGES[[0, 2]], weight[[0, 2]])
            assert float(two) * 2 == pytest.approx(expected * 3, rel=1e-6)


def test_predictions_count_the_thresholds_passed():
    logits = torch.tensor([[2.0, 1.0, -1.0, -2.0], [1.0, 1.0, 1.0, -3.0], [-1.0, 3.0, 3.0, 3.0]])
    # CORAL: sigmoid > 1/2 where the logit > 0
    assert ordinal_ages(logits, "coral").tolist() == [2, 3, 3]
    # CORN: running products 0.881, 0.644, 0.173, ... / 0.731, 0.534, 0.390, ... / 0.269, ...
    assert ordinal_ages(logits, "corn").tolist() == [2, 2, 0]


def test_spreads_by_hand():
    # P(age > k) = 1, 1/2, 0, 0 (CORN: the running product; CORAL: each sigmoid) -> ages 1 and 2
    # with 1/2 each: mean 1.5, std 0.5
    logits = torch.tensor([[30.0, 0.0, -30.0, -30.0]])
    assert ordinal_spread(logits, "corn").tolist() == pytest.approx([0.5], abs=1e-5)
    assert ordinal_spread(logits, "coral").tolist() == pytest.approx([0.5], abs=1e-5)
    # CORN's later tasks are conditional: P(age > 2) = 1/2 * sigmoid(30) whatever the third logit
    # alone says, so ages 1 and 3 with 1/2 each: std 1
    assert ordinal_spread(torch.tensor([[30.0, 0.0, 30.0, -30.0]]), "corn").tolist() == pytest.approx([1.0], abs=1e-5)
    # a sure age has no spread
    assert ordinal_spread(torch.tensor([[30.0, 30.0, 30.0, -30.0]]), "corn").tolist() == pytest.approx([0.0], abs=1e-5)
    # DEX: ages 30 and 40 equally likely -> std 5 years
    dex = torch.full((1, 101), -1e4)
    dex[0, 30] = dex[0, 40] = 0.0
    assert dex_spread(dex).tolist() == pytest.approx([5.0], rel=1e-5)


@pytest.mark.parametrize("output, width", [("coral", 100), ("corn", 100), ("dex", 101)])
def test_distribution_heads_output_shapes_years_and_spread(output, width):
    model = build_model(
        ModelConfig(
            backbone="resnet18",
            projection_dim=8,
            head=[HeadBlock(units=4)],
            output=output,
        )
    )[0].eval()
    out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, width)
    assert model.has_spread and model.spread(out).shape == (3,)
    years = model.years(out)
    assert years.shape == (3,) and bool(((years >= 0) & (years <= 100)).all())
    if output == "coral":  # one weight vector shared by the 100 thresholds (coral-pytorch's CoralLayer)
        assert model.head[-1].coral_weights.weight.shape == (1, 4) and model.head[-1].coral_bias.shape == (100,)
    regression = build_model(ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)]))[0]
    assert not regression.has_spread and regression.spread(torch.zeros(3)) is None


# --------------------------------------------------------------------------- config


def test_the_loss_follows_the_head_unless_set():
    assert validate_config({"model": {"output": "dex"}, "stage2": {}}).stage2.loss == "ce"
    cfg = validate_config({"model": {"output": "corn"}, "stage1": {}, "stage2": {"lr": 1e-3}})
    assert cfg.stage1.loss == cfg.stage2.loss == "corn"
    assert validate_config({"model": {"output": "coral"}, "stage2": {}}).stage2.loss == "coral"
    assert validate_config({"model": {"output": "linear"}, "stage2": {"loss": "huber"}}).stage2.loss == "huber"
    # the presets leave the loss to the head: only the head changes
    assert load_preset("M1", "cpu", ["model.output=dex"]).stage2.loss == "ce"
    m5 = load_preset("M5", "cpu", ["model.output=coral"])
    assert m5.stage1.loss == m5.stage2.loss == "coral"
    assert load_preset("M1", "cpu").stage2.loss == "mae"  # --scale cpu trains unweighted regression heads with L1
    assert load_preset("M5", "cpu").stage2.loss == "mse"  # and weighted ones with the head's mse
    assert load_preset("M5", "tiny").stage2.loss == "mse"


def test_a_loss_that_does_not_fit_the_head_is_one_line_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        load_preset("M5-bmc", "cpu", ["model.output=dex"])
    text = str(err.value)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0] == "invalid config preset M5-bmc (scale cpu):"
    assert "stage2.loss 'bmc' does not fit model.output 'dex'" in lines[1]
    assert "backbone" not in text and "weighting" not in text  # not a dump of the config
    with pytest.raises(ConfigError, match="stage1.loss 'corn' does not fit model.output 'coral'"):
        validate_config({"model": {"output": "coral"}, "stage1": {"loss": "corn"}})


def test_ordinal_presets_in_the_methods_group():
    for name, output in (("M5-coral", "coral"), ("M5-corn", "corn")):
        cfg = load_preset(name, "cpu")
        assert cfg.model.output == output and cfg.stage1.loss == cfg.stage2.loss == output
        assert cfg.stage2.weighting.scheme == "age_ethnicity"


# --------------------------------------------------------------------------- training


def brightness_faces(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) grey images whose level is 30 + 2.2 age (+- 3 noise); ages (n,) in [2, 90)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(2, 90, n).astype(np.float32)
    level = 30 + 2.2 * ages[:, None, None, None] + rng.normal(0, 3, (n, size, size, 1))
    return np.repeat(np.clip(level, 0, 255), 3, axis=3).astype(np.uint8), ages


@pytest.mark.parametrize("output", ["coral", "corn"])
def test_ordinal_heads_train_with_weights_and_group_dro(output, tmp_path):
    from fairage.config.schema import DROConfig
    from fairage.training.methods import face_arrays

    images, ages = brightness_faces(32, seed=3)
    faces = pd.DataFrame(
        {
            "image": [f"f{i}" for i in range(32)],
            "age": ages,
            "ethnicity": np.where(np.arange(32) % 4 == 0, "asian", "caucasian"),
        }
    )
    stage = StageConfig(
        lr=1e-3,
        batch_size=16,
        max_epochs=1,
        loss=output,
        dro=DROConfig(enabled=True, scheme="custom", attributes=["ethnicity"]),
    )
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            backbone="resnet18",
            projection_dim=8,
            head=[HeadBlock(units=8)],
            output=output,
        )
    )[0]
    weights = np.where(np.arange(32) % 2 == 0, 1.5, 0.5)
    result = fit_stage(
        model,
        StageSpec.stage2(stage),
        StageArrays(
            images,
            ages,
            images[:8],
            ages[:8],
            weights,
            face_arrays=face_arrays(faces, stage),
        ),
        run_dir=tmp_path,
    )
    assert np.isfinite(result.history["train_loss"]).all() and result.best_path


def test_output_dex_alone_trains_and_writes_the_spread(tmp_path):
    from conftest import tiny_synthetic

    data = tiny_synthetic(tmp_path / "data", n_train=32, n_valid=16, n_test=16)
    cfg = load_preset(
        "M1",
        "tiny",
        ["model.output=dex", "stage2.max_epochs=1", "eval.n_boot=0", "eval.n_perm=0"],
    )
    assert cfg.stage2.loss == "ce"
    train(cfg, data, tmp_path / "run", progress=False)
    preds = read_predictions(tmp_path / "run" / "predictions_test.csv")
    assert list(preds.columns[:3]) == ["image", "prediction", "spread"]
    assert len(preds) == 16 and bool((preds["spread"] > 0).all()) and bool((preds["spread"] < 60).all())
    # the same spread through the predictor (predict CSV and service)
    from fairage.data import load_faces, load_images
    from fairage.inference.predictor import AgePredictor, prediction_rows

    predictor = AgePredictor(tmp_path / "run", device="cpu")
    faces = load_faces(data).query("split == 'test'").reset_index(drop=True)
    ages, spreads = predictor.predict_crops_spread(load_images(faces, cfg.data.image_size))
    assert ages == pytest.approx(preds["prediction"].to_numpy(), abs=1e-4)
    assert spreads == pytest.approx(preds["spread"].to_numpy(), abs=1e-4)
    result = predictor.predict_image(load_images(faces.iloc[:1], 32)[0], faces_only=True)
    row = prediction_rows("a.jpg", result, faces_only=True)[0]
    # the run's conformal calibration adds its interval after the spread
    assert set(row) - {"age_lo", "age_hi"} == {"image", "age", "spread"} and row["spread"] == pytest.approx(
        spreads[0], abs=1e-4
    )
    # the service's JSON carries it too (in-process ASGI client, no socket)
    from conftest import jpeg_bytes
    from fastapi.testclient import TestClient
    from PIL import Image

    from fairage.serve import create_app

    crop = np.asarray(Image.fromarray(load_images(faces.iloc[:1], 32)[0]).resize((64, 64)))
    with TestClient(create_app(predictor)) as client:
        answer = client.post(
            "/predict?faces_only=true",
            content=jpeg_bytes(crop),
            headers={"content-type": "image/jpeg"},
        )
    assert answer.status_code == 200
    face = answer.json()["faces"][0]
    assert set(face) - {"age_lo", "age_hi"} == {"box", "score", "age", "spread"} and 0 < face["spread"] < 60


@pytest.mark.parametrize("output", ["dex", "coral", "corn"])
def test_distribution_heads_start_at_the_training_ages_distribution(output):
    model = build_model(
        ModelConfig(
            backbone="resnet18",
            projection_dim=8,
            head=[HeadBlock(units=4)],
            output=output,
        )
    )[0]
    assert model.init_output_bias(np.array([10.0, 10.2, 20.0]))
    # counts over the ages 0..100 with half a face added to each: 2.5 at 10, 1.5 at 20, 0.5 elsewhere
    counts = [0.5] * 101
    counts[10], counts[20] = 2.5, 1.5
    total = sum(counts)  # 53.5
    last = model.head[-1]
    bias = (last.coral_bias if output == "coral" else last.bias).detach().double().numpy()
    if output == "dex":
        expected = [math.log(c / total) for c in counts]
    else:
        above = [sum(counts[k + 1 :]) for k in range(100)]
        below = [total] + above[:-1]  # faces older than k-1
        p = [a / (total if output == "coral" else b) for a, b in zip(above, below)]
        expected = [math.log(q / (1 - q)) for q in p]
    assert bias.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # with the last layer's weights at zero the head predicts from the prior alone
    with torch.no_grad():
        (last.coral_weights.weight if output == "coral" else last.weight).zero_()
    years = model.years(model.eval()(torch.rand(2, 3, 32, 32)))
    if output == "dex":  # the prior's mean
        assert years.tolist() == pytest.approx([sum(k * c for k, c in enumerate(counts)) / total] * 2, rel=1e-5)
    else:  # the thresholds whose P(age > k) exceeds 1/2
        passed = sum(1 for k in range(100) if math.prod(p[: k + 1] if output == "corn" else [p[k]]) > 0.5)
        # by hand: faces older than k are 50.5 - (k + 1) / 2 of 53.5 for k >= 20, more than half up to k = 46
        assert passed == 47
        assert years.tolist() == [passed, passed]
    regression = build_model(ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)]))[0]
    assert not regression.init_output_bias(np.array([10.0, 20.0]))


def test_spread_columns_in_the_prediction_files(tmp_path):
    from fairage.inference.predictor import (
        FaceResult,
        ImageResult,
        prediction_rows,
        write_prediction_csv,
    )
    from fairage.store.predictions import write_predictions

    faces = pd.DataFrame({"image": ["a", "b"], "age": [20.0, 30.0]})
    write_predictions(tmp_path / "p.csv", faces, [21.0, 29.5], spread=[3.0, 4.5])
    table = read_predictions(tmp_path / "p.csv")
    assert list(table.columns) == ["image", "prediction", "spread", "age"]
    assert table["spread"].tolist() == [3.0, 4.5]
    write_predictions(tmp_path / "q.csv", faces, [21.0, 29.5])  # a regression head: no column
    assert "spread" not in read_predictions(tmp_path / "q.csv").columns
    # `fairage predict --faces` output with a spread reads as predictions too
    rows = [
        r
        for label, age in (("a", 21.0), ("b", 29.5))
        for r in prediction_rows(label, ImageResult(8, 8, [FaceResult((0, 0, 8, 8), 1.0, age, 2.0)]), True)
    ]
    write_prediction_csv(tmp_path / "faces.csv", rows, faces_only=True)
    assert (tmp_path / "faces.csv").read_text().splitlines()[0] == "image,age,spread"
    assert read_predictions(tmp_path / "faces.csv")["prediction"].tolist() == [
        21.0,
        29.5,
    ]
    # detect mode: a photo without a face has an empty spread
    detect = prediction_rows("x", ImageResult(8, 8, [FaceResult((1, 2, 3, 4), 0.9, 40.0, 5.0)]), False)
    detect += prediction_rows("y", ImageResult(8, 8, []), False)
    write_prediction_csv(tmp_path / "detect.csv", detect, faces_only=False)
    lines = (tmp_path / "detect.csv").read_text().splitlines()
    assert (
        lines[0] == "image,face,x,y,w,h,score,age,spread" and lines[1].endswith(",40.0,5.0") and lines[2] == "y,,,,,,,,"
    )


@pytest.mark.parametrize("output", ["coral", "corn"])
def test_ordinal_heads_export_to_onnx(output, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import warnings

    from fairage.inference.export import YearsModel

    model = build_model(
        ModelConfig(
            backbone="resnet18",
            projection_dim=8,
            head=[HeadBlock(units=4)],
            output=output,
        )
    )[0].eval()
    model.init_output_bias(np.random.default_rng(0).uniform(0, 90, 200))
    wrapped = YearsModel(model).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (x,),
            str(tmp_path / "m.onnx"),
            input_names=["image"],
            output_names=["age"],
            opset_version=17,
            dynamo=False,
        )
    ages = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert ages.tolist() == wrapped(x).tolist()


def test_dex_l1_adds_the_expected_ages_error():
    from fairage.models.losses import dex_loss_per_face

    # three classes (ages 0, 1, 2) at equal logits: CE of a one-hot target = ln 3, expected age 1
    logits = torch.zeros(2, 3)
    ages = torch.tensor([0.0, 2.0])
    assert dex_loss_per_face(logits, ages).tolist() == pytest.approx([math.log(3)] * 2)
    assert dex_loss_per_face(logits, ages, l1=0.5).tolist() == pytest.approx([math.log(3) + 0.5] * 2)
    # the stage defaults: a Gaussian label distribution of 2 years and the L1 term at weight 1
    stage = StageConfig(loss="ce")
    assert (stage.dex_sigma, stage.dex_l1) == (2.0, 1.0)


@pytest.mark.parametrize("output", ["coral", "corn"])
def test_ordinal_bias_lr_moves_the_thresholds_faster_and_keeps_the_state_dict(output):
    def model(factor):
        torch.manual_seed(0)
        cfg = ModelConfig(
            backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)], output=output, ordinal_bias_lr=factor
        )
        m = build_model(cfg)[0]
        m.init_output_bias([10.0, 20.0, 30.0, 60.0])
        return m

    name = "head.2.coral_bias" if output == "coral" else "head.2.bias"
    plain, fast = model(1.0), model(100.0)
    # the same tensors under the same keys: checkpoints and weights files do not see the multiplier
    assert sorted(fast.state_dict()) == sorted(plain.state_dict())
    assert torch.allclose(fast.state_dict()[name], plain.state_dict()[name])
    x, ages = torch.rand(3, 3, 32, 32), torch.tensor([15.0, 25.0, 50.0])
    moved = {}
    for factor, m in ((1.0, plain), (100.0, fast)):
        m.eval()  # BatchNorm over 3 faces: the same forward for both
        before = m.state_dict()[name].clone()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        StageObjective(output)(m(x), ages).backward()
        opt.step()
        moved[factor] = (m.state_dict()[name] - before).abs()
    # Adam's first step is lr times the gradient's sign: 1e-3 per threshold, and 100 x 1e-3 with the
    # multiplier; CORN's tasks k > 50 have no face (task k trains on the faces older than k - 1) and stay
    used = 100 if output == "coral" else 51
    assert moved[1.0].tolist() == pytest.approx([1e-3] * used + [0.0] * (100 - used), rel=1e-3, abs=1e-9)
    assert moved[100.0].tolist() == pytest.approx([0.1] * used + [0.0] * (100 - used), rel=1e-3, abs=1e-7)
    # a model with the multiplier loads a plain model's weights and computes the same logits
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(fast.eval()(x), plain.eval()(x))


def test_corn_tasks_start_with_one_weight_vector_unless_told():
    def last(**keys):
        torch.manual_seed(0)
        return build_model(
            ModelConfig(backbone="resnet18", projection_dim=8, head=[HeadBlock(units=4)], output="corn", **keys)
        )[0].head[-1]

    shared = last().weight
    assert torch.equal(shared, shared[:1].expand(100, 4))  # every task's row is the first one
    assert ModelConfig().ordinal_bias_lr == 100.0 and ModelConfig().corn_shared_init
    rows = last(corn_shared_init=False).weight  # torch's init: 100 different rows
    assert len({tuple(r.tolist()) for r in rows}) == 100
