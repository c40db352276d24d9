"""Speed of the vectorised bootstrap: n_boot resamples of N faces, MAE + the four bias scores.

Pins numpy's BLAS to one thread (set before numpy loads) so the figure is for one core.
Usage: python benchmarks/bootstrap_speed.py [--n 2000] [--n-boot 1000] [--repeats 5]
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse
import time

import numpy as np
import pandas as pd

from fairage.fairness.metrics import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.n
    ages = rng.uniform(1, 90, n)
    df = pd.DataFrame(
        {
            "age": ages,
            "prediction": ages + rng.normal(0, 6, n),
            "gender": rng.choice(["male", "female", "unknown"], n, p=[0.48, 0.48, 0.04]),
            "ethnicity": rng.choice(["asian", "afroamerican", "caucasian"], n, p=[0.1, 0.05, 0.85]),
            "expression": rng.choice(["neutral", "slightlyhappy", "happy", "other"], n),
        }
    )
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        evaluate(df, n_boot=args.n_boot, seed=r)
        times.append(time.perf_counter() - start)
    print(
        f"evaluate: {args.n_boot} resamples of {n} faces (MAE + 4 biases + group intervals), one core: "
        f"best {min(times):.3f} s, median {float(np.median(times)):.3f} s over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
