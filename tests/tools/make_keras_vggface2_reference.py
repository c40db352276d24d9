"""Keras's ages for the parity test: tests/data/keras_vggface2_reference.json (run once; not part of the suite).

Needs TensorFlow with Keras 2 (``pip install tensorflow-cpu tf-keras``; never a fairage
dependency). Builds the VGGFace2 authors' Keras ResNet50 (their layer names, "same" stem, stride
on the 1x1 reduce/proj convolutions, 7x7 average pool, Flatten, ``dim_proj`` Dense(512, relu)) with
the kit's age head (Dense 128 relu -> Dense 32 relu -> Dense 1 sigmoid), sets the seeded weights of
``keras_vggface2_spec.random_weights``, saves both Keras 2 HDF5 kinds (``model.save`` and
``model.save_weights``) into ``--h5-dir``, reloads each file in Keras and records the ages
(sigmoid x 100) of the seeded PNG faces fed as the kit feeds them (BGR, 0-255, minus the
VGGFace2 mean)::

    TF_USE_LEGACY_KERAS=1 /path/to/tf-venv/bin/python tests/tools/make_keras_vggface2_reference.py \\
        --h5-dir /tmp/keras-h5 --png-dir /tmp/keras-png

Then ``fairage import-keras /tmp/keras-h5/full_model.h5 --out ...`` (and ``weights_only.h5``)
check fairage on the files Keras itself wrote; tests/test_keras_import.py checks the h5py-written
equivalents against the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_vggface2_spec as spec

WEIGHTS_SEED = 0
IMAGE_SEEDS = (11, 22, 33)
OUT = Path(__file__).resolve().parents[1] / "data" / "keras_vggface2_reference.json"


def build_model(keras):
    """The VGGFace2 authors' RESNET50 (keras_vggface layout) + the kit's age head, in Keras 2."""
    layers = keras.layers

    def block(x, width, out_channels, stage, index, stride, project):
        name = f"conv{stage}_{index}"
        y = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_1x1_reduce")(x)
        y = layers.BatchNormalization(axis=3, name=f"{name}_1x1_reduce/bn")(y)
        y = layers.Activation("relu")(y)
        y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_3x3")(y)
        y = layers.BatchNormalization(axis=3, name=f"{name}_3x3/bn")(y)
        y = layers.Activation("relu")(y)
        y = layers.Conv2D(out_channels, 1, use_bias=False, name=f"{name}_1x1_increase")(y)
        y = layers.BatchNormalization(axis=3, name=f"{name}_1x1_increase/bn")(y)
        shortcut = x
        if project:
            shortcut = layers.Conv2D(out_channels, 1, strides=stride, use_bias=False, name=f"{name}_1x1_proj")(x)
            shortcut = layers.BatchNormalization(axis=3, name=f"{name}_1x1_proj/bn")(shortcut)
        return layers.Activation("relu")(layers.add([y, shortcut]))

    inputs = layers.Input((spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3), name="base_input")
    x = layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name="conv1/7x7_s2")(inputs)
    x = layers.BatchNormalization(axis=3, name="conv1/7x7_s2/bn")(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(3, strides=2)(x)
    for stage, blocks, width, out_channels, stride in spec.STAGES:
        for index in range(1, blocks + 1):
            first = index == 1
            x = block(x, width, out_channels, stage, index, stride if first else 1, first)
    x = layers.AveragePooling2D(7, name="avg_pool")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu", name="dim_proj")(x)
    for name, units, activation in spec.KIT_HEAD:
        x = layers.Dense(units, activation=activation, name=name)(x)
    return keras.Model(inputs, x, name="vggface_age")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5-dir", type=Path, required=True, help="where to write full_model.h5 and weights_only.h5")
    parser.add_argument("--png-dir", type=Path, required=True, help="where to write the test faces as PNG")
    args = parser.parse_args()
    import tf_keras as keras

    args.h5_dir.mkdir(parents=True, exist_ok=True)
    args.png_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(keras)
    for name, _, variables in spec.random_weights(WEIGHTS_SEED):
        model.get_layer(name).set_weights([array for _, array in variables])

    pngs, digests = [], []
    for seed in IMAGE_SEEDS:
        path = args.png_dir / f"face_{seed}.png"
        Image.fromarray(spec.face_image(seed)).save(path)
        pngs.append(np.asarray(Image.open(path).convert("RGB")))
        digests.append(hashlib.sha256(pngs[-1].tobytes()).hexdigest())
    batch = spec.keras_input(np.stack(pngs))

    def ages(m) -> list[float]:
        return [float(a) for a in m.predict(batch, verbose=0)[:, 0] * 100.0]

    built = ages(model)
    full, weights_only = args.h5_dir / "full_model.h5", args.h5_dir / "weights_only.h5"
    model.save(full)
    model.save_weights(weights_only)
    reloaded = ages(keras.models.load_model(full, compile=False))
    fresh = build_model(keras)
    fresh.load_weights(weights_only)
    from_weights = ages(fresh)
    reference = {
        "generator": "tests/tools/make_keras_vggface2_reference.py",
        "keras_version": keras.__version__,
        "weights_seed": WEIGHTS_SEED,
        "image_seeds": list(IMAGE_SEEDS),
        "image_rgb_sha256": digests,
        "input": "PNG RGB -> BGR float 0-255 minus VGGFace2 mean (91.4953, 103.8827, 131.0912)",
        "ages_years": {"built": built, "full model": reloaded, "weights only": from_weights},
    }
    OUT.write_text(json.dumps(reference, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(reference["ages_years"], indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
