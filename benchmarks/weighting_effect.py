"""Does sample weighting lower the bias scores on the synthetic benchmark, and at what MAE cost?

Runs the demo pipeline (synthetic data, stand-in pretrained backbone, presets at ``cpu``
scale) at a chosen training-set size, then prints every preset's paired difference from
the baseline M1 on the test split (B - M1, paired bootstrap 95% interval): MAE and the
four bias scores. A difference is only called real when its interval excludes zero.

Usage: python benchmarks/weighting_effect.py [--n-train 1200] [--presets M1,M3,M5]
       [--out runs/bench-weighting]
The default size is the demo's; --n-train 4000 gives the rare groups about 3x more faces
(about 20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fairage.data import load_faces
from fairage.fairness.metrics import compare
from fairage.store.predictions import join_predictions, read_predictions
from fairage.workflows.suite import DEMO_SIZES, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=DEMO_SIZES["n_train"])
    parser.add_argument("--n-test", type=int, default=DEMO_SIZES["n_test"])
    parser.add_argument("--presets", default="M1,M3,M5", help="comma-separated; the first is the baseline")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    out = args.out or Path(f"runs/bench-weighting-{args.n_train}")

    started = time.perf_counter()
    run_demo(out, presets=presets, n_train=args.n_train, n_test=args.n_test, progress=False)
    wall = time.perf_counter() - started
    [data_dir] = sorted(out.glob(f"synthetic-*-{args.n_train}-*-seed0"))
    test = load_faces(data_dir).query("split == 'test'").reset_index(drop=True)
    print(f"{args.n_train} training faces ({test['ethnicity'].value_counts().to_dict()} in test), wall {wall:.0f} s")
    base = join_predictions(test, read_predictions(out / presets[0] / "predictions_test.csv"), presets[0])
    for preset in presets[1:]:
        other = join_predictions(test, read_predictions(out / preset / "predictions_test.csv"), preset)
        result = compare(base, other)
        cells = []
        for name, _, _, d in result.rows():
            if d is None or d.ci is None:
                cells.append(f"{name} n/a")
                continue
            mark = "*" if d.excludes_zero else ""
            cells.append(f"{name} {d.estimate:+.2f}{mark} [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]")
        print(f"{preset} - {presets[0]}: " + "; ".join(cells))
    print("(* = the paired 95% interval excludes zero)")


if __name__ == "__main__":
    main()
