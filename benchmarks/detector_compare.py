"""Recall, false detections and speed of the installed face detectors on real photos available offline.

Photos: matplotlib's ``grace_hopper.jpg`` and, when scikit-image is installed, its
``astronaut`` and ``camera`` (one face each; boxes below marked by hand), plus variants of
them (grayscale, mirrored, downscaled to 1/2 and 1/4, rotated in-plane by +-15 and +-30
degrees), group pictures composed from them (six faces each, different sizes, on a
background photo) and scikit-image's LFW subset (100 real faces and 100 non-face patches,
25 px, upscaled and laid out 20 per sheet). A detection matches a face when its centre is
within half the face's side of the face's centre and its side is between 0.5 and 2 times
the face's (side = sqrt(w h)); each face matches at most one detection.

    python benchmarks/detector_compare.py            # every installed detector
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fairage.inference.detect import (
    DETECTORS,
    available_detectors,
    detect_faces,
    make_detector,
)

#: hand-marked face boxes (x, y, w, h) of the sample photos
PHOTOS = {"grace_hopper": (180, 121, 175, 211), "astronaut": (177, 63, 92, 112), "camera": (195, 113, 60, 80)}


def sample_photos() -> dict[str, np.ndarray]:
    from matplotlib import cbook

    photos = {"grace_hopper": np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))}
    try:
        import skimage.data as skdata
    except ImportError:
        print("scikit-image not installed: only grace_hopper.jpg", file=sys.stderr)
        return photos
    photos["astronaut"] = skdata.astronaut()
    photos["camera"] = np.repeat(skdata.camera()[..., None], 3, axis=2)
    return photos


def rotate(rgb: np.ndarray, box, degrees: float):
    """Rotate the photo (canvas grows) and carry the face centre with it."""
    im = Image.fromarray(rgb)
    out = im.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128, 128, 128))
    x, y, w, h = box
    cx, cy = x + w / 2 - im.width / 2, y + h / 2 - im.height / 2
    t = np.deg2rad(degrees)  # PIL rotates counter-clockwise on screen
    nx = cx * np.cos(t) + cy * np.sin(t) + out.width / 2
    ny = -cx * np.sin(t) + cy * np.cos(t) + out.height / 2
    return np.asarray(out), (nx - w / 2, ny - h / 2, w, h)


def scaled(rgb: np.ndarray, box, factor: float):
    im = Image.fromarray(rgb)
    size = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
    return np.asarray(im.resize(size, Image.Resampling.LANCZOS)), tuple(v * factor for v in box)


def variants(photos):
    for name, rgb in photos.items():
        box = PHOTOS[name]
        gray = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
        yield f"{name} gray", gray, [box]
        x, y, w, h = box
        yield f"{name} mirrored", rgb[:, ::-1].copy(), [(rgb.shape[1] - x - w, y, w, h)]
        for f in (0.5, 0.25):
            img, b = scaled(rgb, box, f)
            yield f"{name} x{f}", img, [b]
        for deg in (-30, -15, 15, 30):
            img, b = rotate(rgb, box, deg)
            yield f"{name} rot{deg}", img, [b]


def compositions(photos, n: int = 3, seed: int = 0):
    """Group pictures: every photo twice (different scales), pasted on a background, no overlap."""
    rng = np.random.default_rng(seed)
    try:
        import skimage.data as skdata

        background = Image.fromarray(skdata.coffee())
    except ImportError:
        background = Image.new("RGB", (600, 400), (90, 110, 130))
    for k in range(n):
        canvas = background.resize((1800, 1100))
        faces, x = [], 10
        items = [(name, s) for name in photos for s in rng.uniform(0.35, 0.9, size=2)]
        order = rng.permutation(len(items))
        rows = [[items[i] for i in order[: len(order) // 2]], [items[i] for i in order[len(order) // 2 :]]]
        for r, row in enumerate(rows):
            x = 10
            for name, s in row:
                img, box = scaled(photos[name], PHOTOS[name], s)
                y = 10 + r * 550
                if x + img.shape[1] > canvas.width or img.shape[0] > 540:
                    continue
                canvas.paste(Image.fromarray(img), (x, y))
                faces.append((box[0] + x, box[1] + y, box[2], box[3]))
                x += img.shape[1] + 10
        yield f"group {k}", np.asarray(canvas), faces


def lfw_sheets(cell: int = 150, face: int = 80):
    try:
        from skimage.data import lfw_subset
    except ImportError:
        return
    patches = lfw_subset()  # 100 faces then 100 non-faces, (25, 25) float in [0, 1]
    for start, kind in ((0, "faces"), (100, "non-faces")):
        for sheet in range(5):
            canvas = np.full((4 * cell, 5 * cell), 128, np.uint8)
            boxes = []
            for i in range(20):
                p = (patches[start + sheet * 20 + i] * 255).astype(np.uint8)
                big = np.asarray(Image.fromarray(p).resize((face, face), Image.Resampling.BICUBIC))
                y, x = (i // 5) * cell + (cell - face) // 2, (i % 5) * cell + (cell - face) // 2
                canvas[y : y + face, x : x + face] = big
                boxes.append((x, y, face, face))
            yield f"lfw {kind} {sheet}", np.repeat(canvas[..., None], 3, axis=2), boxes if kind == "faces" else []


def matches(found, truth) -> int:
    used, hits = set(), 0
    for tx, ty, tw, th in truth:
        tside, tcx, tcy = np.sqrt(tw * th), tx + tw / 2, ty + th / 2
        for j, (x, y, w, h, _) in enumerate(found):
            side = np.sqrt(w * h)
            if j in used or not 0.5 <= side / tside <= 2:
                continue
            if np.hypot(x + w / 2 - tcx, y + h / 2 - tcy) <= tside / 2:
                used.add(j)
                hits += 1
                break
    return hits


class MtcnnForComparison:
    """facenet-pytorch's MTCNN (weights inside its wheel). Compared here only: the package pins
    torch<2.3, numpy<2 and Pillow<10.3, so fairage cannot depend on it."""

    name = "mtcnn (comparison only)"
    max_side = 1280

    def __init__(self):
        from facenet_pytorch import MTCNN

        self._mtcnn = MTCNN(keep_all=True, device="cpu")

    def detect(self, rgb):
        boxes, probs = self._mtcnn.detect(Image.fromarray(rgb))
        if boxes is None:
            return []
        return [(x0, y0, x1 - x0, y1 - y0, float(p)) for (x0, y0, x1, y1), p in zip(boxes, probs)]


def main() -> None:
    photos = sample_photos()
    sets = {
        "photos": [(n, p, [PHOTOS[n]]) for n, p in photos.items()],
        "variants": list(variants(photos)),
        "groups": list(compositions(photos)),
        "lfw faces": [s for s in lfw_sheets() if "non-faces" not in s[0]],
        "lfw non-faces": [s for s in lfw_sheets() if "non-faces" in s[0]],
    }
    names = [n for n in DETECTORS if n in available_detectors()]
    print(
        f"detectors installed: {', '.join(names)} (not installed: "
        f"{', '.join(n for n in DETECTORS if n not in names) or 'none'})"
    )
    detectors = [make_detector(n) for n in names]
    try:
        detectors.append(MtcnnForComparison())
    except ImportError:
        pass
    for detector in detectors:
        name = detector.name
        parts, total_time, total_cpu, total_images = [], 0.0, 0.0, 0
        for set_name, items in sets.items():
            found = hit = false = 0
            for _, rgb, truth in items:
                start, cpu = time.perf_counter(), time.process_time()
                boxes = detect_faces(detector, rgb)
                total_time += time.perf_counter() - start
                total_cpu += time.process_time() - cpu
                total_images += 1
                h = matches(boxes, truth)
                hit, found = hit + h, found + len(truth)
                false += len(boxes) - h
            if found:
                parts.append(f"{set_name} {hit}/{found}")
            parts.append(f"{set_name} false {false}")
        # CPU time (all threads) is steadier than wall time on a shared machine: both are shown
        print(
            f"{name}: " + ", ".join(parts) + f"; {1000 * total_cpu / max(total_images, 1):.0f} ms CPU, "
            f"{1000 * total_time / max(total_images, 1):.0f} ms wall per photo "
            f"({total_images} photos, mean {np.mean([r.shape[0] * r.shape[1] for s in sets.values() for _, r, _ in s]) / 1e6:.2f} MP)"
        )


if __name__ == "__main__":
    main()
