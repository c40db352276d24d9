"""The VGGFace2 Keras ResNet50 + kit age head as plain data: layer list, seeded weights, test faces, h5py writers.

numpy, h5py and Pillow only (no torch, no TensorFlow), so the same code serves both sides of the
Keras parity check:

* ``make_keras_vggface2_reference.py`` (run once, in a TensorFlow venv) builds the network in
  Keras, sets these weights, saves both Keras 2 HDF5 file kinds and records Keras's ages on
  these faces in ``tests/data/keras_vggface2_reference.json``;
* ``tests/test_keras_import.py`` regenerates the same weights, writes both HDF5 layouts with
  h5py (``write_full_model`` / ``write_weights_only``, as Keras 2 lays them out) and checks
  fairage's ages against the stored Keras ages.

Weights are random but scaled so activations stay O(1) through the 50 layers and the sigmoid
output does not saturate: distinct faces get distinct ages.
"""

from __future__ import annotations

import json

import numpy as np

#: (stage, blocks, width, out channels, stride of the first block), as in the VGGFace2 authors' code
STAGES = ((2, 3, 64, 256, 1), (3, 4, 128, 512, 2), (4, 6, 256, 1024, 2), (5, 3, 512, 2048, 2))
#: the kit head after dim_proj: Dense 128 relu -> Dense 32 relu -> Dense 1 sigmoid
KIT_HEAD = (("dense", 128, "relu"), ("dense_1", 32, "relu"), ("dense_2", 1, "sigmoid"))
#: VGGFace2 training mean, BGR, 0-255
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)
IMAGE_SIZE = 224


def conv_layers() -> list[tuple[str, int, int, int, int]]:
    """(name, kernel, in channels, out channels, stride) of every convolution, in the network's order."""
    out = [("conv1/7x7_s2", 7, 3, 64, 2)]
    channels = 64
    for stage, blocks, width, out_channels, stride in STAGES:
        for block in range(1, blocks + 1):
            s = stride if block == 1 else 1
            prefix = f"conv{stage}_{block}"
            out += [
                (f"{prefix}_1x1_reduce", 1, channels, width, s),
                (f"{prefix}_3x3", 3, width, width, 1),
                (f"{prefix}_1x1_increase", 1, width, out_channels, 1),
            ]
            if block == 1:
                out.append((f"{prefix}_1x1_proj", 1, channels, out_channels, s))
            channels = out_channels
    return out


def random_weights(seed: int) -> list[tuple[str, str, list[tuple[str, np.ndarray]]]]:
    """Seeded weights as (layer name, Keras class, [(variable, float32 array)]) in the network's order.

    Conv kernels (h, w, in, out), He-normal; each BatchNorm gets random statistics; the
    ``_1x1_increase`` BatchNorms a small gamma so the residual sums stay
    near unit scale; the stem kernel is divided by 128 (the input is 0-255 minus a mean).
    """
    rng = np.random.default_rng(seed)
    layers = []
    for name, k, cin, cout, _ in conv_layers():
        kernel = rng.normal(0.0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout))
        if name == "conv1/7x7_s2":
            kernel /= 128.0
        layers.append((name, "Conv2D", [("kernel", kernel)]))
        small = name.endswith("_increase")
        gamma = rng.uniform(0.1, 0.3, cout) if small else rng.uniform(0.8, 1.2, cout)
        layers.append(
            (
                name + "/bn",
                "BatchNormalization",
                [
                    ("gamma", gamma),
                    ("beta", rng.normal(0.0, 0.05, cout)),
                    ("moving_mean", rng.normal(0.0, 0.1, cout)),
                    ("moving_variance", rng.uniform(0.5, 1.5, cout)),
                ],
            )
        )
    width = 2048
    for name, units, _ in (("dim_proj", 512, "relu"),) + KIT_HEAD:
        kernel = rng.normal(0.0, np.sqrt(2.0 / width), (width, units))
        layers.append((name, "Dense", [("kernel", kernel), ("bias", rng.normal(0.0, 0.05, units))]))
        width = units
    return [(n, c, [(v, a.astype(np.float32)) for v, a in ws]) for n, c, ws in layers]


def face_image(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A seeded cartoon face, RGB uint8 (size, size, 3): background, skin ellipse, eyes, mouth, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.empty((size, size, 3))
    image[:] = rng.uniform(40, 220, 3) * (0.7 + 0.3 * yy[..., None])
    cx, cy, rx, ry = 0.5 + rng.uniform(-0.05, 0.05), 0.5, rng.uniform(0.28, 0.36), rng.uniform(0.36, 0.44)
    image[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = rng.uniform([120, 70, 40], [255, 210, 180])
    for ex in (cx - rx / 2.2, cx + rx / 2.2):
        image[((xx - ex) / 0.05) ** 2 + ((yy - cy + 0.08) / 0.025) ** 2 <= 1] = rng.uniform(0, 80, 3)
    image[((xx - cx) / (rx / 2)) ** 2 + ((yy - cy - 0.2) / 0.03) ** 2 <= 1] = rng.uniform([120, 20, 20], [220, 90, 90])
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def keras_input(rgb: np.ndarray) -> np.ndarray:
    """What the VGGFace2 network was trained on: BGR float 0-255 minus the VGGFace2 mean, (N, S, S, 3)."""
    return rgb[..., ::-1].astype(np.float32) - np.array(VGGFACE2_MEAN_BGR, np.float32)


# --------------------------------------------------------------------------- Keras 2 HDF5 layouts


def zero_weights() -> list[tuple[str, str, list[tuple[str, np.ndarray]]]]:
    """``random_weights``'s layers and shapes filled with zeros (small files when compressed)."""
    return [(n, c, [(v, np.zeros_like(a)) for v, a in ws]) for n, c, ws in random_weights(0)]


def model_config() -> dict:
    """A Keras functional ``model_config`` naming the layers with weights (class, activation)."""
    entries = [{"class_name": "InputLayer", "name": "base_input", "config": {"name": "base_input"}}]
    for name, cls, _ in random_weights_layout():
        config: dict = {"name": name}
        if cls == "Dense":
            config["activation"] = dict([("dim_proj", "relu")] + [(n, a) for n, _, a in KIT_HEAD])[name]
        entries.append({"class_name": cls, "name": name, "config": config, "inbound_nodes": []})
    return {"class_name": "Functional", "config": {"name": "vggface_age", "layers": entries}}


def random_weights_layout() -> list[tuple[str, str, None]]:
    """Layer names and classes of ``random_weights`` without drawing any array."""
    names = []
    for name, *_ in conv_layers():
        names += [(name, "Conv2D", None), (name + "/bn", "BatchNormalization", None)]
    return names + [(n, "Dense", None) for n in ("dim_proj",) + tuple(n for n, _, _ in KIT_HEAD)]


def _write_layers(group, layers, compression: str | None = None) -> None:
    names = ["base_input"] + [name for name, _, _ in layers]
    group.attrs["layer_names"] = np.array([n.encode() for n in names])
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.21.0"
    group.create_group("base_input").attrs["weight_names"] = np.array([], dtype="S1")
    for name, _, variables in layers:
        layer = group.create_group(name)
        weight_names = [f"{name}/{variable}:0" for variable, _ in variables]
        layer.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
        for weight_name, (_, array) in zip(weight_names, variables):
            layer.create_dataset(weight_name, data=array, compression=compression)


def write_weights_only(path, layers, compression: str | None = None) -> None:
    """``model.save_weights(path)`` (Keras 2 HDF5): the layer groups at the root."""
    import h5py

    with h5py.File(path, "w") as f:
        _write_layers(f, layers, compression)


def write_full_model(path, layers, compression: str | None = None) -> None:
    """``model.save(path)`` (Keras 2 HDF5): ``model_weights`` group and ``model_config`` attribute."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(model_config()).encode()
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.21.0"
        _write_layers(f.create_group("model_weights"), layers, compression)


def write_nested_weights_only(path, layers, compression: str | None = None) -> None:
    """``save_weights`` of an age model that wraps the VGGFace2 network as one sub-model layer.

    Keras 2 then stores one layer group (``vggface_resnet50``) whose ``weight_names`` list
    every backbone and ``dim_proj`` weight under its own layer name, then the head's groups.
    """
    import h5py

    head = {name for name, _, _ in KIT_HEAD}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"input_1", b"vggface_resnet50"] + [n.encode() for n, _, _ in KIT_HEAD])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.21.0"
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        base = f.create_group("vggface_resnet50")
        names = []
        for name, _, variables in layers:
            group = base if name not in head else f.create_group(name)
            weight_names = [f"{name}/{variable}:0" for variable, _ in variables]
            for weight_name, (_, array) in zip(weight_names, variables):
                group.create_dataset(weight_name, data=array, compression=compression)
            if name in head:
                group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            else:
                names += weight_names
        base.attrs["weight_names"] = np.array([w.encode() for w in names])
