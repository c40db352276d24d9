"""Synthetic faces per second on one core (target: >= 500 faces/s at 64 px).

Times the full per-face work of ``write_synthetic`` (labels, drawing, JPEG encoding) in
this process, without disk writes, then writing a small dataset to a temporary folder.

    .venv/bin/python benchmarks/synth_speed.py [--n 1000] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fairage.data import write_synthetic
from fairage.data.synthetic import make_face


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="faces to draw")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    args = parser.parse_args()

    make_face(0, "train", 0, args.size)  # warm-up (imports, first JPEG encoder call)
    start = time.perf_counter()
    for i in range(args.n):
        make_face(0, "train", i, args.size)
    in_memory = args.n / (time.perf_counter() - start)
    print(f"draw + JPEG encode, {args.size} px, 1 core: {in_memory:.0f} faces/s ({args.n} faces)")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_synthetic(tmp, n_train=args.n, n_valid=0, n_test=0, size=args.size, seed=0, workers=1)
        on_disk = args.n / (time.perf_counter() - start)
    print(f"write_synthetic, {args.size} px, workers=1: {on_disk:.0f} faces/s (crop + full photo + CSVs)")
    if args.size == 64:
        print("target >= 500 faces/s at 64 px:", "met" if in_memory >= 500 else "NOT met")


if __name__ == "__main__":
    main()
