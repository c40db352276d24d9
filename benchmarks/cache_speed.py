"""Decode throughput of the image cache: cold build (decode + write) and warm hit (memmap).

Writes a synthetic dataset to a temporary folder, then times ``load_images`` on its
train split with 1 and 2 workers.

    .venv/bin/python benchmarks/cache_speed.py [--n 1000] [--source-size 224] [--size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fairage.data import load_faces, load_images, write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="faces in the train split")
    parser.add_argument("--source-size", type=int, default=224, help="side of the JPEGs on disk")
    parser.add_argument("--size", type=int, default=64, help="side of the cached array")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic(
            Path(tmp) / "data", n_train=args.n, n_valid=0, n_test=0, size=args.source_size, seed=0, workers=2
        )
        faces = load_faces(root)
        for workers in (1, 2):
            cache_dir = Path(tmp) / f"cache{workers}"
            start = time.perf_counter()
            load_images(faces, args.size, cache_dir=cache_dir, workers=workers, progress=False)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            images = load_images(faces, args.size, cache_dir=cache_dir, workers=workers, progress=False)
            float(images[:, ::8, ::8].mean())  # touch the pages
            warm = time.perf_counter() - start
            print(
                f"{args.source_size} px JPEG -> {args.size} px, workers={workers}: "
                f"cold {args.n / cold:.0f} faces/s, warm hit {args.n / warm:.0f} faces/s"
            )


if __name__ == "__main__":
    main()
