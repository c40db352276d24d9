"""Load on `fairage serve`: N concurrent clients POST a group photo for T seconds against 127.0.0.1.

Starts `fairage serve MODEL --port 0` in its own process, then runs N client threads (each
with its own keep-alive connection) that post the same photo back to back until T seconds
have passed. Prints requests/s, p50/p99 latency and the error count (any answer but 200),
next to the baseline: the same photo through `AgePredictor.predict_image` in this process,
one call after another on one thread (no HTTP, no server).

Without --model it trains a tiny model first (preset M2 at the tiny scale on 112 synthetic
32 px faces, seconds), so the figure is mostly detection, cropping and HTTP. The photo:
three copies of matplotlib's grace_hopper.jpg side by side (1536 x 600 px, three faces).

Usage: python benchmarks/serve_load.py [--model RUN] [--clients 16] [--seconds 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

MAX_CLIENTS = 64
MAX_SECONDS = 120


def group_photo() -> bytes:
    import matplotlib
    from PIL import Image

    face = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    canvas = Image.new("RGB", (3 * face.width, face.height), (128, 128, 128))
    for k in range(3):
        canvas.paste(face, (k * face.width, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tiny_model(root: Path) -> Path:
    from fairage.config import load_preset
    from fairage.data import write_synthetic
    from fairage.training import train

    data = write_synthetic(root / "data", n_train=48, n_valid=16, n_test=48, size=32, seed=0, workers=1)
    train(load_preset("M2", "tiny", ["eval.n_boot=50"]), data, root / "run", progress=False)
    return root / "run"


def start_server(model: Path, workers: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "fairage.cli", "serve", str(model), "--host", "127.0.0.1",
                             "--port", "0", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # uvicorn names its address once it listens
        if "Uvicorn running on" in line:
            url = line.split("Uvicorn running on ")[1].split()[0]
            break
    else:
        raise SystemExit(f"the server exited before listening (code {proc.wait()})")
    if workers > 1:  # the address is printed before the workers have loaded the model
        ready = 0
        for line in proc.stdout:
            ready += "Application startup complete" in line
            if ready == workers:
                break
    # keep draining its output so the server never blocks on a full pipe
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, url


def load(url: str, photo: bytes, clients: int, seconds: float) -> tuple[list[float], int, float]:
    deadline = time.perf_counter() + seconds

    def client(_) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200 and len(r.json()["faces"]) == 3
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return [t for lat, _ in results for t in lat], sum(e for _, e in results), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="run or model folder (default: a tiny model)")
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients, 1..{MAX_CLIENTS}")
    parser.add_argument("--seconds", type=float, default=20.0, help=f"duration, at most {MAX_SECONDS} s")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")

    photo = group_photo()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        proc, url = start_server(model, args.workers)
        try:
            httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=120)  # warm-up
            latencies, errors, elapsed = load(url, photo, args.clients, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        from fairage.predict import AgePredictor

        predictor = AgePredictor(model)

        def serial(seconds: float) -> list[float]:
            times, deadline = [], time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                predictor.predict_image(photo)
                times.append(time.perf_counter() - start)
            return times

        # on a worker thread, as the server runs inference (the detector's OpenMP threads are
        # markedly slower from the main thread on a loaded machine); the first calls warm up
        with ThreadPoolExecutor(1) as thread:
            thread.submit(serial, 2.0).result()
            direct = thread.submit(serial, min(args.seconds, 10.0)).result()

    ms = np.array(latencies) * 1000
    print(f"serve: {args.clients} clients x {args.seconds:g} s, {args.workers} worker(s), 1536 x 600 JPEG with 3 faces")
    print(f"  {len(latencies)} requests, {len(latencies) / elapsed:.1f} requests/s, "
          f"latency p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms, errors {errors}")
    print(f"  baseline, AgePredictor.predict_image in-process, one call at a time: {1 / statistics.mean(direct):.1f} "
          f"photos/s, p50 {1000 * statistics.median(direct):.0f} ms")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
