"""Does each head learn a simple image-to-age task at ``--scale cpu``? Test MAE over the mean predictor's.

Writes a small task in the npy layout (64 px, ages read off the image), trains one preset
(default M1: one all-layers stage, resnet18 from random init, 8 epochs at Adam 1e-3) once
per head with ``--set model.output=<head>`` and nothing else (the loss follows the head),
and prints each head's test MAE divided by the MAE of always predicting the training mean.

Tasks: ``brightness`` (grey level 30 + 2.2 x age, per-pixel noise sd 6; ages 1-90) and
``squares`` (a white square at the top left whose side is 4 + age / 80 x 58 px; ages 5-80).

Usage: python benchmarks/head_learnability.py [--task brightness|squares] [--heads sigmoid,dex,coral,corn]
       [--preset M1] [--n-train 600] [--set KEY=VALUE ...] [--out runs/bench-heads]
Runs already finished in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fairage.config import load_preset
from fairage.runs import RunFolder
from fairage.training import train

SIZE = 64


def write_task(out: Path, task: str, n_train: int, seed: int = 0) -> Path:
    """The task's npy-layout folder (train n_train, valid n_train / 3, test n_train / 2 faces)."""
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(
        (("train", n_train), ("valid", n_train // 3), ("test", n_train // 2))
    ):
        rng = np.random.default_rng(seed + k)
        if task == "brightness":
            ages = rng.uniform(1, 90, n).astype(np.float32)
            level = (
                30
                + 2.2 * ages[:, None, None, None]
                + rng.normal(0, 6, (n, SIZE, SIZE, 1))
            )
            images = np.repeat(np.clip(level, 0, 255), 3, axis=3).astype(np.uint8)
        else:
            ages = rng.uniform(5, 80, n).astype(np.float32)
            images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
            for i, age in enumerate(ages):
                side = int(4 + age / 80 * (SIZE - 6))
                images[i, :side, :side] = 255
        meta = np.stack(
            [
                rng.choice(["male", "female"], n),
                rng.choice(["asian", "afroamerican", "caucasian"], n),
                np.full(n, "neutral"),
            ],
            axis=1,
        )
        np.save(out / f"data_{split}.npy", images)
        np.save(out / f"labels_{split}.npy", ages)
        np.save(out / f"meta_data_{split}.npy", meta)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=("brightness", "squares"), default="brightness"
    )
    parser.add_argument("--heads", default="sigmoid,dex,coral,corn")
    parser.add_argument("--preset", default="M1")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config override",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-heads"))
    args = parser.parse_args()
    data = write_task(
        args.out / f"data-{args.task}-{args.n_train}", args.task, args.n_train
    )
    train_ages, test_ages = (
        np.load(data / "labels_train.npy"),
        np.load(data / "labels_test.npy"),
    )
    baseline = float(np.abs(test_ages - train_ages.mean()).mean())
    print(
        f"task {args.task}, {args.n_train} training faces, preset {args.preset} at scale cpu; "
        f"mean predictor's test MAE {baseline:.2f} years"
    )
    print("| head | test MAE (years) | / mean predictor |\n|---|---|---|")
    for head in [h.strip() for h in args.heads.split(",") if h.strip()]:
        run = args.out / f"{args.task}-{args.n_train}-{args.preset}-{head}"
        overrides = [
            f"model.output={head}",
            "eval.n_boot=0",
            "eval.n_perm=0",
            *args.overrides,
        ]
        if not (run / RunFolder.METRICS).is_file():
            train(load_preset(args.preset, "cpu", overrides), data, run, progress=False)
        mae = RunFolder.open(run).metrics().mae
        print(f"| {head} | {mae:.2f} | {mae / baseline:.3f} |", flush=True)


if __name__ == "__main__":
    main()
