"""fairage's stage II next to the course kit's Keras ``model.fit`` on the same shapes (not a test).

    python benchmarks/keras_peer.py --tf-python /path/to/tfvenv/bin/python [--n-images 256] [--rounds 3]

Trains all layers of the kit's ResNet50 at 224 px, batch 16 (the kit's stage II) on random images:

* fairage: ``fit_stage("stage2")`` of the same network (backbone ``vggface2_resnet50``, the
  VGGFace2 authors' layout that ``import-keras`` loads) with ``trainer.precision`` 32-true
  and auto (bf16-mixed on a CPU with AVX512-BF16 or AMX), as ``benchmarks/train_throughput.py``
  times it; ``--backbone resnet50`` times torchvision's layout instead (stride on the 3x3
  convolutions: about 5% more arithmetic);
* Keras: the kit's network, built here layer by layer as the VGGFace2 authors' Keras code
  builds it (``conv1/7x7_s2``, bottlenecks with the stride on the 1x1 convolutions, 7x7
  average pool, ``dim_proj`` Dense 512 ReLU) with the kit's head (Dense 128 ReLU, Dense 32
  ReLU, Dense 1 sigmoid), Adam 1e-5 and MSE, trained with ``model.fit`` in float32 (the
  kit's setting) on float arrays preprocessed beforehand, as the kit does. This part runs
  in the Python given by ``--tf-python``, which must have TensorFlow (see the README:
  fairage itself does not depend on it). ``TF_USE_LEGACY_KERAS=1`` with ``tf-keras``
  installed there runs Keras 2, as the kit did; otherwise Keras 3 (without XLA, like Keras 2).

Both sides report steady-state training images/s: wall time from the end of the first
training batch (which builds kernels, traces the graph) to the end of the last, input
pipeline included, validation excluded. ``--rounds N`` repeats the three
runs N times, interleaved (Keras, fairage fp32, fairage auto, Keras, ...), and compares the
medians, so that a passing load spike does not decide the ratios. Then the goals: fairage
auto >= 1.8x Keras, and >= 1.5x fairage float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: fairage's stage II under ``auto`` must reach this multiple of the Keras pipeline's speed
GOAL_OVER_KERAS = 1.8

RESULT_PREFIX = "keras images/s: "


# --------------------------------------------------------------------------- the Keras side (TensorFlow's Python)


def keras_child(size: int, batch: int, n: int, jit: bool, threads: int | None) -> None:
    """Build the kit's model, fit one epoch of ``n`` random images, print ``RESULT_PREFIX`` + images/s."""
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)

    keras = tf.keras
    layers = keras.layers
    keras.utils.set_random_seed(0)
    keras_version = getattr(keras, "__version__", None)
    if keras_version is None:  # tf-keras (Keras 2, TF_USE_LEGACY_KERAS=1) keeps its version on its own package
        import tf_keras

        keras_version = tf_keras.__version__

    def safe(name: str) -> str:  # Keras 3 forbids "/" in layer names; Keras 2 (the kit's) allows it
        return name.replace("/", "_") if keras_version.startswith("3") else name

    def conv_bn(x, filters, kernel, name, strides=1, relu=True):
        x = layers.Conv2D(
            filters, kernel, strides=strides, padding="same" if kernel > 1 else "valid", use_bias=False, name=safe(name)
        )(x)
        x = layers.BatchNormalization(axis=3, name=safe(name + "/bn"))(x)
        return layers.Activation("relu")(x) if relu else x

    def bottleneck(x, widths, stage, block, strides=1, project=False):
        f1, f2, f3 = widths
        name = f"conv{stage}_{block}"
        y = conv_bn(x, f1, 1, name + "_1x1_reduce", strides)
        y = conv_bn(y, f2, 3, name + "_3x3")
        y = conv_bn(y, f3, 1, name + "_1x1_increase", relu=False)
        shortcut = conv_bn(x, f3, 1, name + "_1x1_proj", strides, relu=False) if project else x
        return layers.Activation("relu")(layers.add([y, shortcut]))

    inputs = keras.Input((size, size, 3), name="base_input")
    x = conv_bn(inputs, 64, 7, "conv1/7x7_s2", strides=2)
    x = layers.MaxPooling2D((3, 3), strides=(2, 2))(x)
    for stage, (widths, blocks) in enumerate(
        [((64, 64, 256), 3), ((128, 128, 512), 4), ((256, 256, 1024), 6), ((512, 512, 2048), 3)], start=2
    ):
        for block in range(1, blocks + 1):
            x = bottleneck(
                x, widths, stage, block, strides=(1 if stage == 2 else 2) if block == 1 else 1, project=block == 1
            )
    pool = x.shape[1]  # 7 at 224 px: the authors' AveragePooling2D((7, 7))
    x = layers.Flatten()(layers.AveragePooling2D((pool, pool), name="avg_pool")(x))
    x = layers.Dense(512, activation="relu", name="dim_proj")(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse", jit_compile=jit)

    rng = np.random.default_rng(0)
    # the kit preprocesses its numpy arrays before fit: float32 BGR minus the channel means
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32) - np.float32([91.5, 103.9, 131.1])
    labels = rng.uniform(0.01, 0.9, (n, 1)).astype(np.float32)
    n_val = max(batch, n // 32)

    class StepTimer(keras.callbacks.Callback):
        """Wall time from the end of one training batch to the end of the next (input pipeline
        included), from the first batch's end on: the first batch traces and builds the graph."""

        def __init__(self):
            super().__init__()
            self.images, self.seconds, self.last = 0, 0.0, None

        def on_train_batch_end(self, step, logs=None):
            now = time.perf_counter()
            if self.last is not None:
                self.seconds += now - self.last
                self.images += batch
            self.last = now

    timer = StepTimer()
    model.fit(
        images,
        labels,
        batch_size=batch,
        epochs=1,
        shuffle=True,
        verbose=0,
        callbacks=[timer],
        validation_data=(images[:n_val], labels[:n_val]),
    )
    steps = n // batch  # full batches only in the count: drop a ragged last one from the timing
    if n % batch:
        timer.images -= batch - n % batch
    print(
        f"TensorFlow {tf.__version__}, Keras {keras_version}, jit_compile={jit}, "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()} threads, {steps} steps"
    )
    print(f"{RESULT_PREFIX}{timer.images / timer.seconds:.3f}")


# --------------------------------------------------------------------------- the fairage side


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tf-python", type=Path, help="a Python interpreter that has TensorFlow")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-images", type=int, default=256, help="training images per run (one epoch)")
    ap.add_argument(
        "--backbone",
        default="vggface2_resnet50",
        choices=["vggface2_resnet50", "resnet50"],
        help="fairage's network (the Keras side always builds the kit's)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians are compared")
    ap.add_argument("--jit", action="store_true", help="Keras with XLA (jit_compile=True); the kit did not use it")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of both sides (default: each library's choice, all cores)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        keras_child(args.size, args.batch, args.n_images, args.jit, args.threads)
        return
    if args.tf_python is None:
        ap.error("--tf-python is required: the Python of a venv with TensorFlow (see the README)")
    if not args.tf_python.is_file():
        ap.error(f"--tf-python {args.tf_python}: no such file")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import (
        GOAL_BF16_OVER_FP32,
        arms,
        device_line,
        run_stage,
        synthetic_set,
    )

    print(
        f"device: {device_line(False)}; {args.backbone} at {args.size} px, batch {args.batch}, "
        f"{args.n_images} training images, all layers, {args.rounds} round(s)",
        flush=True,
    )
    cmd = [
        str(args.tf_python),
        str(Path(__file__).resolve()),
        "--child",
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--n-images",
        str(args.n_images),
    ] + (["--jit"] if args.jit else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    data = synthetic_set(args.n_images, args.size, args.batch)
    rates: dict[str, list[float]] = {}
    keras_about = ""
    for round_ in range(1, args.rounds + 1):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        found = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if done.returncode != 0 or not found:
            sys.exit(f"the Keras run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rates.setdefault("keras", []).append(float(found[0][len(RESULT_PREFIX) :]))
        keras_about = done.stdout.splitlines()[0]
        print(f"round {round_}: Keras model.fit {rates['keras'][-1]:.2f} images/s", flush=True)
        for label, trainer_cfg in arms(False).items():
            rate, _ = run_stage("stage2", args.backbone, data, args.batch, 1, trainer_cfg)
            rates.setdefault(label, []).append(rate)
            print(f"round {round_}: fairage stage II ({label}) {rate:.2f} images/s", flush=True)
    med = {label: statistics.median(values) for label, values in rates.items()}

    def spread(label: str) -> str:
        values = rates[label]
        return f" (median of {len(values)}: {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""

    auto_label = next(k for k in rates if k not in ("keras", "fp32"))
    for label in ("fp32", auto_label):
        print(f"stage II (all layers, {label}): {med[label]:.2f} images/s{spread(label)}")
    print(f"Keras model.fit (kit model, all layers; {keras_about}): {med['keras']:.2f} images/s{spread('keras')}")
    over_keras = med[auto_label] / med["keras"]
    over_fp32 = med[auto_label] / med["fp32"]
    print(
        f"fairage stage II {auto_label} / Keras: {over_keras:.2f}x "
        f"(goal >= {GOAL_OVER_KERAS}x: {'met' if over_keras >= GOAL_OVER_KERAS else 'NOT met'})"
    )
    print(
        f"fairage stage II {auto_label} / fairage fp32: {over_fp32:.2f}x "
        f"(goal >= {GOAL_BF16_OVER_FP32}x: {'met' if over_fp32 >= GOAL_BF16_OVER_FP32 else 'NOT met'})"
    )
    print(f"fairage stage II fp32 / Keras: {med['fp32'] / med['keras']:.2f}x")


if __name__ == "__main__":
    main()
