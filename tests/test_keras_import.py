"""fairage import-keras: Keras 2 HDF5 files of the VGGFace2 ResNet50 -> model folder, checked against Keras.

The reference ages in tests/data/keras_vggface2_reference.json were computed once by Keras
(tests/tools/make_keras_vggface2_reference.py) for the seeded weights and faces of
tests/tools/keras_vggface2_spec.py; here the same weights are written in both Keras 2 HDF5
layouts with h5py, imported, and fairage's ages must match Keras's within 0.05 years.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fairage.cli import app
from fairage.config.schema import HeadBlock, validate_config
from fairage.errors import DataError
from fairage.models.regressor import build_model

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import keras_vggface2_spec as spec

REFERENCE = json.loads((Path(__file__).parent / "data" / "keras_vggface2_reference.json").read_text())
TOLERANCE_YEARS = 0.05
runner = CliRunner()


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """Both Keras 2 HDF5 kinds of the reference weights, and the reference faces as PNG files."""
    root = tmp_path_factory.mktemp("keras")
    layers = spec.random_weights(REFERENCE["weights_seed"])
    spec.write_full_model(root / "full_model.h5", layers)
    spec.write_weights_only(root / "weights_only.h5", layers)
    spec.write_nested_weights_only(root / "nested.h5", layers)
    pngs = []
    for seed in REFERENCE["image_seeds"]:
        pngs.append(root / f"face_{seed}.png")
        Image.fromarray(spec.face_image(seed)).save(pngs[-1])
    return {
        "full model": root / "full_model.h5",
        "weights only": root / "weights_only.h5",
        "nested": root / "nested.h5",
        "pngs": pngs,
    }


@pytest.fixture(scope="module")
def zero_files(tmp_path_factory):
    """Small (compressed, all-zero) Keras files to corrupt in the bad-input tests."""
    return tmp_path_factory.mktemp("zero"), spec.zero_weights()


def _ages(folder: Path, pngs: list[Path]) -> np.ndarray:
    """fairage's ages (fp32) for PNG faces read as RGB in [0, 1], from a model folder."""
    cfg = validate_config(yaml.safe_load((folder / "config.yaml").read_text()), "folder")
    model, info = build_model(cfg.model.model_copy(update={"weights": folder}))
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return model.eval().years(model(x)).numpy()


@pytest.mark.parametrize("kind", ["full model", "weights only"])
def test_imported_model_gives_keras_ages(keras_files, tmp_path, kind):
    for path, digest in zip(keras_files["pngs"], REFERENCE["image_rgb_sha256"]):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == digest, f"{path.name} differs from Keras's input"
    result = runner.invoke(app, ["import-keras", str(keras_files[kind]), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"{kind} Keras HDF5" in output
    assert "106 layers (53 convolutions, 53 BatchNorms)" in output
    assert "dense 128 relu, dense_1 32 relu, dense_2 1 sigmoid" in output
    source = "model_config" if kind == "full model" else "kit convention"
    assert f"activations from {source}" in output
    ages = _ages(tmp_path / "model", keras_files["pngs"])
    keras = np.array(REFERENCE["ages_years"][kind])
    assert np.abs(ages - keras).max() < TOLERANCE_YEARS, (ages, keras)
    assert ages.max() - ages.min() > 1.0  # the faces get distinct ages: the comparison means something


def test_backbone_nested_as_one_sub_model_layer_gives_keras_ages(keras_files, tmp_path):
    # an age model that wraps the VGGFace2 network as one layer: its weights sit in one group
    result = runner.invoke(app, ["import-keras", str(keras_files["nested"]), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "106 layers" in " ".join(result.output.split())
    ages = _ages(tmp_path / "model", keras_files["pngs"])
    assert np.abs(ages - np.array(REFERENCE["ages_years"]["weights only"])).max() < TOLERANCE_YEARS


def test_model_folder_contents(keras_files, tmp_path):
    out = tmp_path / "model"
    assert runner.invoke(app, ["import-keras", str(keras_files["full model"]), "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "import.json", "model.safetensors"]
    cfg = validate_config(yaml.safe_load((out / "config.yaml").read_text()), "config.yaml")
    assert (cfg.model.backbone, cfg.model.input_norm, cfg.model.projection_dim) == (
        "vggface2_resnet50",
        "vggface2",
        512,
    )
    assert [b.units for b in cfg.model.head] == [128, 32] and cfg.model.output == "sigmoid"
    assert cfg.data.image_size == 224
    assert cfg.stage1.trainable == "projection+head"
    info = json.loads((out / "import.json").read_text())
    assert info["kind"] == "full model" and info["layers_mapped"] == 106 + 1 + 3
    assert info["mapping"]["conv3_1_1x1_reduce/bn"] == "backbone.conv3_1.reduce_bn"
    assert info["mapping"]["dim_proj"] == "projection" and info["mapping"]["dense_2"] == "head.4"


def test_kernels_are_transposed_not_flipped(keras_files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model"
    assert runner.invoke(app, ["import-keras", str(keras_files["weights only"]), "--out", str(out)]).exit_code == 0
    state = load_file(str(out / "model.safetensors"))
    layers = {name: dict(v) for name, _, v in spec.random_weights(REFERENCE["weights_seed"])}
    kernel = layers["conv1/7x7_s2"]["kernel"]  # (h, w, in, out)
    conv = state["backbone.conv1.weight"]  # (out, in, h, w)
    assert conv.shape == (64, 3, 7, 7)
    assert conv[5, 2, 1, 6].item() == kernel[1, 6, 2, 5]
    dense = layers["dim_proj"]["kernel"]  # (in, out)
    assert state["projection.weight"][7, 1000].item() == dense[1000, 7]
    bn = layers["conv2_1_3x3/bn"]
    assert torch.equal(state["backbone.conv2_1.conv3x3_bn.running_var"], torch.from_numpy(bn["moving_variance"]))
    assert torch.equal(state["backbone.conv2_1.conv3x3_bn.weight"], torch.from_numpy(bn["gamma"]))


def test_model_folder_as_weights_keeps_backbone_and_drops_a_different_head(keras_files, tmp_path):
    out = tmp_path / "model"
    assert runner.invoke(app, ["import-keras", str(keras_files["full model"]), "--out", str(out)]).exit_code == 0
    cfg = validate_config(yaml.safe_load((out / "config.yaml").read_text()), "folder").model
    deep = cfg.model_copy(update={"weights": out, "head": [HeadBlock(units=64, dropout=0.1)]})
    model, info = build_model(deep)
    assert info["unexpected_keys"] == []
    assert info["missing_keys"] and all(k.startswith("head.") for k in info["missing_keys"])
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert torch.equal(
        model.state_dict()["backbone.conv5_3.increase.weight"], state["backbone.conv5_3.increase.weight"]
    )
    assert torch.equal(model.state_dict()["projection.bias"], state["projection.bias"])


def test_backbone_only_file_imports_without_a_head(zero_files, tmp_path):
    root, layers = zero_files
    path = root / "backbone.h5"
    spec.write_weights_only(path, [layer for layer in layers if not layer[0].startswith("dense")], "gzip")
    with h5py.File(path, "a") as f:  # the VGGFace2 identity classifier, as in the authors' file
        names = list(f.attrs["layer_names"]) + [b"classifier"]
        f.attrs["layer_names"] = np.array(names)
        group = f.create_group("classifier")
        group.attrs["weight_names"] = np.array([b"classifier/kernel:0", b"classifier/bias:0"])
        group.create_dataset("classifier/kernel:0", data=np.zeros((512, 8631), np.float32), compression="gzip")
        group.create_dataset("classifier/bias:0", data=np.zeros(8631, np.float32))
    result = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "skipped classifier: the 8631-way identity classifier" in result.output
    assert "no age head in the file" in result.output
    info = json.loads((tmp_path / "model" / "import.json").read_text())
    assert info["head"] is None and info["skipped"]


def _rewrite(path: Path, layers, kind: str = "full") -> Path:
    (spec.write_full_model if kind == "full" else spec.write_weights_only)(path, layers, "gzip")
    return path


def _bad(zero_files, name, change):
    root, layers = zero_files
    layers = [(n, c, list(ws)) for n, c, ws in layers]
    return _rewrite(root / f"{name}.h5", change(layers))


def _drop(layers, name):
    return [layer for layer in layers if layer[0] != name]


def _reshape(layers, name):
    out = []
    for n, c, ws in layers:
        if n == name:
            ws = [(v, np.zeros((1, 1, 32, 128), np.float32)) for v, _ in ws]
        out.append((n, c, ws))
    return out


def _extra_conv(layers):
    return layers + [("extra_conv", "Conv2D", [("kernel", np.zeros((3, 3, 8, 8), np.float32))])]


@pytest.mark.parametrize(
    "case, change, needle",
    [
        (
            "missing",
            lambda ls: _drop(ls, "conv4_2_3x3/bn"),
            "layer 'conv4_2_3x3/bn' of the VGGFace2 ResNet50 is missing",
        ),
        ("shape", lambda ls: _reshape(ls, "conv3_1_1x1_reduce"), "layer 'conv3_1_1x1_reduce': shape mismatch"),
        ("unknown", _extra_conv, "layer 'extra_conv' (kernel) is not part of the VGGFace2 ResNet50"),
    ],
)
def test_bad_layers_exit_2_naming_the_layer_and_write_nothing(zero_files, tmp_path, case, change, needle):
    path = _bad(zero_files, case, change)
    out = tmp_path / "model"
    result = runner.invoke(app, ["import-keras", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_not_hdf5_other_architecture_and_truncated_files_exit_2(zero_files, tmp_path):
    root, layers = zero_files
    cases = {}
    cases["text.h5"] = root / "text.h5"
    cases["text.h5"].write_text("not an hdf5 file")
    other = root / "keras_applications_resnet50.h5"
    spec.write_weights_only(
        other,
        [
            (
                "conv1_conv",
                "Conv2D",
                [("kernel", np.zeros((7, 7, 3, 64), np.float32)), ("bias", np.zeros(64, np.float32))],
            )
        ],
    )
    cases["other"] = other
    full = _rewrite(root / "full.h5", layers)
    truncated = root / "truncated.h5"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    cases["truncated"] = truncated
    messages = {"text.h5": "is not an HDF5 file", "other": "is not the VGGFace2 ResNet50", "truncated": str(truncated)}
    for case, path in cases.items():
        out = tmp_path / case
        result = runner.invoke(app, ["import-keras", str(path), "--out", str(out)])
        assert result.exit_code == 2, (case, result.output)
        text = " ".join(result.output.split())
        assert str(path) in text and messages[case] in text, (case, text)
        assert "Traceback" not in result.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_truncated_dataset_is_named(zero_files, tmp_path):
    root, layers = zero_files
    path = _rewrite(root / "short.h5", layers, kind="weights")
    with h5py.File(path, "a") as f:  # a weight listed in weight_names whose data is gone
        del f["conv5_3_1x1_increase"]["conv5_3_1x1_increase/kernel:0"]
    with pytest.raises(DataError, match="weight 'conv5_3_1x1_increase/kernel:0' of layer 'conv5_3_1x1_increase'"):
        from fairage.importers.keras import read_keras_h5

        read_keras_h5(path)


def test_existing_out_folder_is_refused(keras_files, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["import-keras", str(keras_files["weights only"]), "--out", str(out)])
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
