"""Does each head learn a simple image-to-age task at ``--scale cpu``? Test MAE over the mean predictor's.

Writes a small task in the npy layout (64 px, ages read off the image), trains one preset
(default M1: one all-layers stage, resnet18 from random init, up to 20 epochs at Adam 1e-3) once
per head with ``--set model.output=<head>`` and nothing else (the loss follows the head),
and prints each head's test MAE divided by the MAE of always predicting the training mean.

Tasks: ``brightness`` (grey level 30 + 2.2 x age, per-pixel noise sd 6; ages 1-90),
``squares`` (a white square at the top left whose side is 4 + age / 80 x 58 px; ages 5-80) and
``spots``, the harder one (a faint square, 30-70 grey levels above a background of per-pixel noise
sd 40, whose side is 6 + age / 80 x 26 px, at a random place; ages 5-80; run it with
``--n-train 300``).

The stage II recipe is pinned (``PINNED``: the plateau schedule, and mse for the sigmoid head) so
that the figures do not move when the ``--scale cpu`` defaults do; ``--unpinned`` drops the pins.

Usage: python benchmarks/head_learnability.py [--task brightness|squares|spots] [--heads sigmoid,dex,coral,corn]
       [--preset M1] [--n-train 600] [--set KEY=VALUE ...] [--unpinned] [--out runs/bench-heads]
Runs already finished in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fairage.config.presets import load_preset
from fairage.store.run_folder import RunFolder
from fairage.training import train

SIZE = 64
#: overrides every head's run gets (before ``--set``), so that the figures measure this recipe
PINNED = ["stage2.lr_schedule=plateau", "data.image_size=64"]
#: and the regression head's loss (the other heads' loss follows the head)
PINNED_HEAD = {"sigmoid": ["stage2.loss=mse"], "linear": ["stage2.loss=mse"]}


def write_task(out: Path, task: str, n_train: int, seed: int = 0) -> Path:
    """The task's npy-layout folder (train n_train, valid n_train / 3, test n_train / 2 faces)."""
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((("train", n_train), ("valid", n_train // 3), ("test", n_train // 2))):
        rng = np.random.default_rng(seed + k)
        if task == "brightness":
            ages = rng.uniform(1, 90, n).astype(np.float32)
            level = 30 + 2.2 * ages[:, None, None, None] + rng.normal(0, 6, (n, SIZE, SIZE, 1))
            images = np.repeat(np.clip(level, 0, 255), 3, axis=3).astype(np.uint8)
        elif task == "spots":
            ages = rng.uniform(5, 80, n).astype(np.float32)
            images = rng.normal(70, 40, (n, SIZE, SIZE, 1))
            for i, age in enumerate(ages):
                side = int(6 + age / 80 * 26)
                top, left = rng.integers(0, SIZE - side + 1, 2)
                images[i, top : top + side, left : left + side] += rng.uniform(30, 70)
            images = np.repeat(np.clip(images, 0, 255), 3, axis=3).astype(np.uint8)
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
    parser.add_argument("--task", choices=("brightness", "squares", "spots"), default="brightness")
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
    parser.add_argument("--unpinned", action="store_true", help="drop PINNED: the current --scale cpu recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-heads"))
    args = parser.parse_args()
    data = write_task(args.out / f"data-{args.task}-{args.n_train}", args.task, args.n_train)
    train_ages, test_ages = (
        np.load(data / "labels_train.npy"),
        np.load(data / "labels_test.npy"),
    )
    baseline = float(np.abs(test_ages - train_ages.mean()).mean())
    print(
        f"task {args.task}, {args.n_train} training faces, preset {args.preset} at scale cpu; "
        f"mean predictor's test MAE {baseline:.2f} years"
    )
    pins = [] if args.unpinned else PINNED
    print(f"pinned: {' '.join(pins) or 'nothing'}; --set: {' '.join(args.overrides) or 'nothing'}")
    print("| head | test MAE (years) | / mean predictor | / regression head's |\n|---|---|---|---|")
    regression = None
    for head in [h.strip() for h in args.heads.split(",") if h.strip()]:
        run = args.out / f"{args.task}-{args.n_train}-{args.preset}-{head}"
        overrides = [
            f"model.output={head}",
            "eval.n_boot=0",
            "eval.n_perm=0",
            *pins,
            *([] if args.unpinned else PINNED_HEAD.get(head, [])),
            *args.overrides,
        ]
        if not (run / RunFolder.METRICS).is_file():
            train(load_preset(args.preset, "cpu", overrides), data, run, progress=False)
        ratio = RunFolder.open(run).metrics().mae / baseline
        if head == "sigmoid":
            regression = ratio
        relative = f"{ratio / regression:.2f}" if regression else "-"
        print(f"| {head} | {ratio * baseline:.2f} | {ratio:.3f} | {relative} |", flush=True)


if __name__ == "__main__":
    main()
