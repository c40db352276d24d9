"""Throughput of fairage's predictor next to a plain torch loop on the same model and crops.

Model: the M1 preset at ``--scale`` (default cpu: resnet18 at 64 px; full: resnet50 at
224 px), random weights, loaded through a model folder like any user model. Crops:
``--crops`` random uint8 faces at the model's size. The plain loop is the shortest correct
inference code: batches of ``--batch-size`` from one (N, S, S, 3) array -> float [0, 1]
NCHW -> model -> years, under ``torch.inference_mode``. fairage gets the same crops as a
list of arrays (what a caller holds) through ``AgePredictor.predict_crops``. Photos:
``--photos`` group pictures composed from matplotlib's ``grace_hopper.jpg`` (1-3 faces,
up to 1400 px wide), read from disk, detected (``--detector``), cropped and predicted by
``AgePredictor.predict_files`` (what ``fairage predict`` runs), beside a plain pipeline of the
same detector and model written without fairage (``plain_photos``: OpenCV decode, yuface on the
same downscaled copy, crops, one batched forward). Goals: fairage >= 0.9x the plain loop on
crops, and >= 0.9x the plain pipeline on photos; each figure is the best of ``--repeats``.

    python benchmarks/predict_throughput.py [--scale cpu|full] [--crops 512] [--photos 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fairage.config.files import dump_config
from fairage.config.presets import load_preset
from fairage.inference.predictor import AgePredictor, load_model, read_image
from fairage.models.regressor import AgeRegressor


def model_folder(root: Path, scale: str) -> Path:
    from safetensors.torch import save_file

    cfg = load_preset("M1", scale)
    cfg.model.weights = None
    torch.manual_seed(0)
    model = AgeRegressor(cfg.model)
    (root / "config.yaml").write_text(dump_config(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return root


@torch.inference_mode()
def plain_loop(model, crops: np.ndarray, batch_size: int, device) -> np.ndarray:
    out = []
    for a in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[a : a + batch_size]).to(device).permute(0, 3, 1, 2).float().div(255.0)
        out.append(model.years(model(x)).cpu())
    return torch.cat(out).numpy()


def photos(root: Path, n: int) -> list[Path]:
    from matplotlib import cbook

    grace = read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        canvas = np.full((640, 1400, 3), 90, np.uint8)
        for k in range(1 + i % 3):
            scale = rng.uniform(0.4, 0.85)
            small = np.asarray(Image.fromarray(grace).resize((round(512 * scale), round(600 * scale))))
            canvas[20 : 20 + small.shape[0], 20 + 460 * k : 20 + 460 * k + small.shape[1]] = small
        paths.append(root / f"photo{i:03d}.jpg")
        Image.fromarray(canvas).save(paths[-1], quality=90)
    return paths


@torch.inference_mode()
def plain_photos(
    model, paths: list[Path], size: int, batch_size: int, device, max_side: int = 960, margin: float = 0.4
) -> list[np.ndarray]:
    """The same detector and model without fairage: OpenCV decode, yuface on a copy downscaled to
    ``max_side``, square crops enlarged by ``margin`` (black outside), OpenCV bilinear resize, then
    one batched forward over every photo's crops. Returns each photo's ages (years)."""
    import cv2
    import yuface

    crops, counts = [], []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        h, w = bgr.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        small = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        rows = yuface.c_detect(small)
        rows = rows[rows[:, 0] >= 50]
        rgb = bgr[..., ::-1]
        for x, y, bw, bh in rows[:, 1:5].astype(float) / scale:
            side = round((1 + 2 * margin) * max(bw, bh))
            x0, y0 = round(x + bw / 2 - side / 2), round(y + bh / 2 - side / 2)
            crop = np.zeros((side, side, 3), np.uint8)
            sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
            crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
            crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR))
        counts.append(len(rows))
    ages = plain_loop(model, np.stack(crops), batch_size, device) if crops else np.empty(0)
    return np.split(ages, np.cumsum(counts)[:-1])


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=["cpu", "full", "tiny"])
    parser.add_argument("--crops", type=int, default=512)
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--detector", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fairage-bench-") as tmp:
        tmp = Path(tmp)
        loaded = load_model(model_folder(tmp, args.scale))
        predictor = AgePredictor(loaded, detector=args.detector, batch_size=args.batch_size)
        size = loaded.image_size
        crops = np.random.default_rng(0).integers(0, 256, size=(args.crops, size, size, 3), dtype=np.uint8)
        crop_list = list(crops)
        # warm-up, and the same answer from both
        reference = plain_loop(loaded.model, crops[: args.batch_size], args.batch_size, predictor.device)
        assert np.allclose(predictor.predict_crops(crop_list[: args.batch_size]), reference, atol=1e-4)
        plain = best_of(lambda: plain_loop(loaded.model, crops, args.batch_size, predictor.device), args.repeats)
        ours = best_of(lambda: predictor.predict_crops(crop_list), args.repeats)
        files = photos(tmp, args.photos)
        list(predictor.predict_files(files[:2]))  # warm-up
        plain_photos(loaded.model, files[:2], size, args.batch_size, predictor.device)
        results = []

        def ours_photos():
            results[:] = list(predictor.predict_files(files))

        photo_time = best_of(ours_photos, args.repeats)
        # fairage as it ran YuNet before: OpenMP's default threads (every core) per call
        default_threads = AgePredictor(loaded, detector=args.detector, batch_size=args.batch_size, detector_threads=0)
        old_photo_time = best_of(lambda: list(default_threads.predict_files(files)), args.repeats)

        def plain_run() -> None:
            plain_photos(loaded.model, files, size, args.batch_size, predictor.device)

        # the plain pipeline as written (yuface's OpenMP default), on this main thread ...
        plain_photo_time = best_of(plain_run, args.repeats)

        def one_thread() -> float:
            # ... and with one OpenMP thread, set the plain way (OpenMP keeps it per calling thread)
            import ctypes

            import yuface

            gomp = sorted(Path(yuface.__file__).parent.parent.glob("yuface.libs/libgomp*.so*"))
            ctypes.CDLL(str(gomp[0])).omp_set_num_threads(1)
            return best_of(plain_run, args.repeats)

        with ThreadPoolExecutor(1) as thread:
            plain_one_time = thread.submit(one_thread).result()
        n_faces = sum(len(r.faces) for _, r, _, _ in results if r is not None)
        plain_faces = sum(len(a) for a in plain_photos(loaded.model, files, size, args.batch_size, predictor.device))

    print(
        f"model: M1 scale {args.scale} ({loaded.config.model.backbone}, {size} px), device {predictor.device}, "
        f"batch {args.batch_size}, {torch.get_num_threads()} torch threads; {args.crops} crops; "
        f"{args.photos} photos with {n_faces} faces, detector {predictor.detector.name}"
    )
    print(f"fairage on crops: {args.crops / ours:.1f} faces/s")
    print(f"plain torch on crops: {args.crops / plain:.1f} faces/s")
    print(f"fairage on photos (AgePredictor.predict_files): {args.photos / photo_time:.2f} photos/s, {n_faces} faces")
    print(
        f"fairage on photos, YuNet with OpenMP's default threads (as before): {args.photos / old_photo_time:.2f} photos/s"
    )
    print(
        f"plain OpenCV + yuface + torch on photos: {args.photos / plain_photo_time:.2f} photos/s, {plain_faces} faces; "
        f"with 1 OpenMP thread: {args.photos / plain_one_time:.2f} photos/s"
    )
    print(f"fairage / plain torch on crops: {plain / ours:.2f}x (goal >= 0.9x)")
    best_plain = min(plain_photo_time, plain_one_time)
    print(f"fairage / plain pipeline on photos (its faster variant): {best_plain / photo_time:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
