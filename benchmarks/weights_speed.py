"""Speed of per-face weights and of the weighted loss on a large random face table.

Times ``compute_weights`` for each built-in scheme (inverse formula, with and without
LDS) and ``weighted_loss`` on one batch; nothing is read from disk.

    .venv/bin/python benchmarks/weights_speed.py [--n 100000] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from fairage.config.schema import WeightingConfig
from fairage.data.schema import VOCABULARIES
from fairage.fairness.weighting import compute_weights
from fairage.models.losses import weighted_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="faces in the table")
    parser.add_argument("--batch", type=int, default=256, help="batch size for the loss")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    faces = pd.DataFrame(
        {
            "age": rng.uniform(1, 95, args.n),
            "ethnicity": rng.choice(list(VOCABULARIES["ethnicity"]), args.n),
            "expression": rng.choice(list(VOCABULARIES["expression"]), args.n),
        }
    )
    for scheme in ("age", "age_ethnicity", "age_ethnicity_expression"):
        for lds in (False, True):
            cfg = WeightingConfig(scheme=scheme, lds=lds)
            start = time.perf_counter()
            compute_weights(faces, cfg)
            ms = 1000 * (time.perf_counter() - start)
            print(f"compute_weights {scheme:26s} lds={lds!s:5s} {args.n} faces: {ms:8.1f} ms")
    pred, target, weight = torch.rand(args.batch), torch.rand(args.batch), torch.rand(args.batch)
    for kind in ("mse", "mae", "huber"):
        start = time.perf_counter()
        for _ in range(1000):
            weighted_loss(pred, target, weight, kind)
        us = 1e6 * (time.perf_counter() - start) / 1000
        print(f"weighted_loss {kind:5s} batch {args.batch}: {us:6.1f} us per call (CPU)")


if __name__ == "__main__":
    main()
