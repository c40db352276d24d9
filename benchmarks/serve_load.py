"""Load on `fairage serve`: N concurrent clients POST a group photo for T seconds against 127.0.0.1.

Runs server configurations one after another, each in its own process, and prints them side by
side:

* ``before``: every request whole on one inference thread (decode, detect, crop, its own forward
  pass), YuNet with OpenMP's default threads, torch with its default threads: the service as it
  was before shared passes (the app's path for a predictor without ``prepare_image``);
* ``alone``: `fairage serve --max-batch 1 --prepare-processes 0` (every request's crops in a pass
  of their own, prepared on 2 threads of the server; one YuNet thread, the age model on the
  faster runtime with one thread; not run unless asked with --only);
* ``threads``: `fairage serve --prepare-processes 0` (shared passes; uploads decoded, searched
  and cropped on 2 threads of the server process, which YuNet's hold on the GIL serialises);
* ``batched``: `fairage serve` with its defaults (shared passes; uploads prepared in one worker
  process per usable CPU);
* ``side640``: `fairage serve --detect-side 640` (the defaults, detection at 640 px instead of
  960: the photo's three faces are still found).

N client threads (each with its own keep-alive connection) post the same photo back to back
until T seconds have passed. Printed: requests/s, p50/p99 latency, the error count (any answer
but 200 with three faces), the server's CPU time per request (its worker processes included)
and each server's ratio to ``before``; then the baseline: the
same photo through `AgePredictor.predict_image` in this process, one call at a time (no HTTP).

Without --model it trains a tiny model first (preset M2 at the tiny scale on 112 synthetic
32 px faces, seconds), so the figure is mostly detection, cropping and HTTP. The photo:
three copies of matplotlib's grace_hopper.jpg side by side (1536 x 600 px, three faces).

Usage: python benchmarks/serve_load.py [--model RUN] [--clients 16] [--seconds 15] [--workers 1]
       [--only batched] [-- extra `fairage serve` options for the batched server]
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
    from fairage.config.presets import load_preset
    from fairage.data import write_synthetic
    from fairage.training import train

    data = write_synthetic(root / "data", n_train=48, n_valid=16, n_test=48, size=32, seed=0, workers=1)
    train(load_preset("M2", "tiny", ["eval.n_boot=50"]), data, root / "run", progress=False)
    return root / "run"


def start_server(model: Path, workers: int, options: list[str], before: bool = False) -> tuple[subprocess.Popen, str]:
    if before:  # this script serves the model the old way (see serve_before)
        command = [sys.executable, __file__, "--serve-before", str(model)]
    else:
        command = [
            sys.executable,
            "-m",
            "fairage.cli",
            "serve",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            *options,
        ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # uvicorn names its address once it listens
        if "Uvicorn running on" in line:
            url = line.split("Uvicorn running on ")[1].split()[0]
            break
    else:
        raise SystemExit(f"the server exited before listening (code {proc.wait()})")
    if workers > 1 and not before:  # the address is printed before the workers have loaded the model
        ready = 0
        for line in proc.stdout:
            ready += "Application startup complete" in line
            if ready == workers:
                break
    # keep draining its output so the server never blocks on a full pipe
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, url


class WholeRequests:
    """An AgePredictor seen through ``predict_image`` alone: the app runs each request whole on its one thread."""

    def __init__(self, predictor):
        self.loaded = predictor.loaded
        self.predict_image = predictor.predict_image


def serve_before(model: Path) -> None:
    """The service as before shared passes: one inference thread, YuNet with OpenMP's default threads."""
    import uvicorn

    from fairage.inference.predictor import AgePredictor
    from fairage.serve import create_app, serve_protocol

    app = create_app(WholeRequests(AgePredictor(model, detector_threads=0)))
    uvicorn.run(app, host="127.0.0.1", port=0, log_level="info", http=serve_protocol())


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


CONFIGS = {
    "before": "each request whole on one thread, OpenMP/torch default threads",
    "alone": "fairage serve --max-batch 1 --prepare-processes 0",
    "threads": "fairage serve --prepare-processes 0",
    "batched": "fairage serve (defaults: --max-batch 32 --batch-wait-ms 5, a prepare process per CPU)",
    "side640": "fairage serve --detect-side 640",
}
#: run when --only is not given
DEFAULT_CONFIGS = ("before", "threads", "batched", "side640")


def run_config(name: str, model: Path, photo: bytes, args, options: list[str]) -> dict:
    opts = {
        "alone": ["--max-batch", "1", "--prepare-processes", "0"],
        "threads": ["--prepare-processes", "0"],
        "batched": options,
        "side640": ["--detect-side", "640"],
    }.get(name, [])
    proc, url = start_server(model, args.workers, opts, before=name == "before")
    try:
        for _ in range(2):  # warm-up
            httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=120)
        cpu0 = cpu_seconds(proc.pid)
        latencies, errors, elapsed = load(url, photo, args.clients, args.seconds)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {
        "n": len(latencies),
        "rate": len(latencies) / elapsed,
        "p50": np.percentile(ms, 50),
        "p99": np.percentile(ms, 99),
        "errors": errors,
        "cpu_ms": 1000 * cpu / max(1, len(latencies)),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) so far of a process, its live descendants (the prepare
    worker processes) and the children they waited for; NaN off Linux."""
    import os

    def tree(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that has just ended
            return 0.0
        total = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                total += sum(tree(int(child)) for child in task.read_text().split())
            except OSError:  # a thread that has just ended
                continue
        return total

    return tree(pid) if Path(f"/proc/{pid}/stat").exists() else float("nan")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-before":
        serve_before(Path(sys.argv[2]))
        return
    argv, options = (
        (sys.argv[1:], [])
        if "--" not in sys.argv
        else (sys.argv[1 : sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :])
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="run or model folder (default: a tiny model)")
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients, 1..{MAX_CLIENTS}")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help=f"duration of each configuration, at most {MAX_SECONDS} s"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes (alone and batched)")
    parser.add_argument("--only", choices=list(CONFIGS), action="append", help="run only these configurations")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")

    photo = group_photo()
    names = args.only or list(DEFAULT_CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        results = {name: run_config(name, model, photo, args, options) for name in names}

        from fairage.inference.predictor import AgePredictor

        predictor = AgePredictor(model)

        def serial(seconds: float) -> list[float]:
            times, deadline = [], time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                predictor.predict_image(photo)
                times.append(time.perf_counter() - start)
            return times

        # on a worker thread, as the server runs inference; the first calls warm up
        with ThreadPoolExecutor(1) as thread:
            thread.submit(serial, 1.0).result()
            direct = thread.submit(serial, min(args.seconds, 5.0)).result()

    print(
        f"serve: {args.clients} clients x {args.seconds:g} s per configuration, {args.workers} worker(s), "
        f"1536 x 600 JPEG with 3 faces"
    )
    for name in names:
        r = results[name]
        print(
            f"  {name:8s} {r['n']:5d} requests, {r['rate']:5.1f} requests/s, latency p50 {r['p50']:5.0f} ms, "
            f"p99 {r['p99']:5.0f} ms, errors {r['errors']}, server CPU {r['cpu_ms']:.0f} ms/request  ({CONFIGS[name]})"
        )
    if "before" in results:
        for name in names:
            if name != "before":
                print(f"  {name} / before: {results[name]['rate'] / results['before']['rate']:.2f}x requests/s")
    print(
        f"  baseline, AgePredictor.predict_image in-process, one call at a time: {1 / statistics.mean(direct):.1f} "
        f"photos/s, p50 {1000 * statistics.median(direct):.0f} ms"
    )
    if any(r["errors"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
