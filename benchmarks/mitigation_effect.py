"""Do the field's mitigation methods lower the bias scores on the synthetic benchmark, and at what MAE cost?

Trains the ``methods`` preset group (M1, M5, M5-dro, M5-bmc, M5-std, M5-dex, M5-coral,
M5-corn: the heads DEX, CORAL and CORN beside the losses) at ``cpu``
scale from the demo's stand-in pretrained backbone, once per training seed (0..K-1), on
the demo's synthetic benchmark (optionally with fewer training faces), then prints:

1. each method's MAE and four bias scores, mean +- standard deviation over the seeds;
2. each method's paired difference from M1 (method - M1, years) with a paired bootstrap
   95% interval from ``fairage.fairness.metrics.compare``. Seeds are pooled per face: a face's
   error is its absolute error averaged over the K seeds, so the MAE difference is the
   mean over seeds of the per-seed MAE differences, a group's MAE is its seed-averaged MAE,
   and the bootstrap resamples faces (each with all its seeds), the unit the test split
   was drawn in. ``[lo, hi]`` after each estimate is that interval; ``*`` marks an
   interval that excludes zero. ``(a..b)`` is the range of the per-seed estimates.

Usage: python benchmarks/mitigation_effect.py [--n-train 1200] [--n-valid 300] [--n-test 1000]
       [--image-size 64] [--pretrain-n-train 1500] [--seeds 3] [--presets methods] [--out runs/bench-methods-<n>]
(defaults: the demo's sizes)
Runs already finished in ``--out`` are reused, so an interrupted benchmark continues.
Seeds run one after the other (all methods of seed 0 first), so a partial run still
compares every method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fairage.data import load_faces
from fairage.fairness.metrics import DEFAULT_ATTRIBUTES, compare, evaluate
from fairage.store.predictions import join_predictions, read_predictions
from fairage.workflows.suite import (
    DEMO_SIZES,
    PRETRAIN_SIZES,
    PRETRAINED_STAGE2_LR,
    _synthetic_once,
    expand_presets,
    pretrain_backbone,
    run_suite,
)

ATTRIBUTES = ("age", "gender", "ethnicity", "expression")


def seed_averaged(test: pd.DataFrame, tables: list[pd.DataFrame]) -> pd.DataFrame:
    """``test`` with ``prediction = age + mean over seeds of |error|``: its absolute errors are the seed-averaged ones."""
    errors = np.mean([np.abs(t["prediction"].to_numpy(float) - t["age"].to_numpy(float)) for t in tables], axis=0)
    out = test.copy()
    out["prediction"] = out["age"].to_numpy(float) + errors
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=DEMO_SIZES["n_train"])
    parser.add_argument("--n-valid", type=int, default=DEMO_SIZES["n_valid"])
    parser.add_argument("--n-test", type=int, default=DEMO_SIZES["n_test"])
    parser.add_argument(
        "--pretrain-n-train",
        type=int,
        default=PRETRAIN_SIZES["n_train"],
        help="training faces of the stand-in pretrained backbone",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEMO_SIZES["size"],
        help="the methods' input side in px (cpu scale: 64; the data and the pretraining stay at 64)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--presets", default="methods", help="comma-separated names or groups; the first is the baseline"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="train this seed's runs and exit (to train seeds in parallel processes; "
        "run once without it first, or after, to pretrain and to print the tables)",
    )
    parser.add_argument(
        "--no-train", action="store_true", help="only print the tables, from the seeds whose runs have all finished"
    )
    args = parser.parse_args()
    presets = expand_presets([p.strip() for p in args.presets.split(",") if p.strip()])
    out = args.out or Path(f"runs/bench-methods-{args.n_train}")

    started = time.perf_counter()
    data_dir = _synthetic_once(
        out,
        args.n_train,
        args.n_valid,
        args.n_test,
        DEMO_SIZES["size"],
        0,
        lambda event: print(event.message, flush=True),
    )
    weights = pretrain_backbone(
        out, "cpu", DEMO_SIZES["size"], sizes={"n_train": args.pretrain_n_train}, progress=False
    )
    overrides = [f"model.weights={weights.resolve()}", f"stage2.lr={PRETRAINED_STAGE2_LR}"]
    # the model's input size follows the data's (64 px by default), not --scale cpu's 80 px for real faces
    overrides.append(f"data.image_size={args.image_size}")
    todo = [] if args.no_train else range(args.seeds) if args.only_seed is None else [args.only_seed]
    for k in todo:
        run_suite(
            data_dir,
            out / f"seed{k}",
            presets=presets,
            scale="cpu",
            seeds=1,
            overrides=overrides + [f"seed={k}"],
            progress=False,
        )
        print(f"seed {k} done at {time.perf_counter() - started:.0f} s", flush=True)
    wall = time.perf_counter() - started
    if args.only_seed is not None:
        return

    seeds = [
        k for k in range(args.seeds) if all((out / f"seed{k}" / p / "metrics_test.json").is_file() for p in presets)
    ]
    if not seeds:
        print("no seed has finished every method yet")
        return
    if len(seeds) < args.seeds:
        print(f"only seeds {seeds} have finished every method; the tables use those")
    print(
        f"\n{args.n_train} training, {args.n_valid} validation, {args.n_test} test faces, model input {args.image_size} px; backbone pretrained on "
        f"{args.pretrain_n_train} other faces; seeds {seeds}; wall of this call {wall:.0f} s"
    )
    print_tables(data_dir, out, presets, seeds)


def print_tables(data_dir: Path, out: Path, presets: list[str], seeds: list[int]) -> None:
    """The two tables of the module docstring, from ``out/seed<k>/<preset>/predictions_test.csv``."""
    test = load_faces(data_dir).query("split == 'test'").reset_index(drop=True)
    preds = {
        p: [join_predictions(test, read_predictions(out / f"seed{k}" / p / "predictions_test.csv"), p) for k in seeds]
        for p in presets
    }

    print("\nMAE and bias scores (years), mean +- sd over seeds")
    print("| Method | MAE | Age bias | Gender bias | Ethnicity bias | Expression bias |")
    print("|---|---|---|---|---|---|")
    for p in presets:
        ms = [evaluate(t, n_boot=0) for t in preds[p]]
        cells = [np.array([m.mae for m in ms])] + [np.array([m.bias[a] for m in ms]) for a in ATTRIBUTES]
        print(
            f"| {p} | "
            + " | ".join(f"{c.mean():.2f} +- {c.std(ddof=1) if len(c) > 1 else 0:.2f}" for c in cells)
            + " |"
        )

    base = presets[0]
    pooled_base = seed_averaged(test, preds[base])
    print(
        f"\nPaired difference from {base} (method - {base}, years), seeds pooled per face; "
        "95% bootstrap interval; * = excludes zero; (per-seed range)"
    )
    print("| Method | MAE | Age bias | Gender bias | Ethnicity bias | Expression bias |")
    print("|---|---|---|---|---|---|")
    for p in presets[1:]:
        pooled = compare(pooled_base, seed_averaged(test, preds[p]), attributes=list(DEFAULT_ATTRIBUTES))
        per_seed = [compare(a, b, n_boot=0) for a, b in zip(preds[base], preds[p])]
        cells = []
        for key in ("mae", *ATTRIBUTES):
            d = pooled.mae_diff if key == "mae" else pooled.bias_diff[key]
            seed_diffs = [s.mae_diff if key == "mae" else s.bias_diff[key] for s in per_seed]
            estimates = [e.estimate for e in seed_diffs if e is not None]
            if d is None or d.ci is None:
                cells.append("n/a")
                continue
            mark = "*" if d.excludes_zero else ""
            cells.append(
                f"{d.estimate:+.2f}{mark} [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}] "
                f"({min(estimates):+.1f}..{max(estimates):+.1f})"
            )
        print(f"| {p} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
