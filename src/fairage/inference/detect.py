"""Face detectors whose weights ship inside a pip wheel (nothing is downloaded at run time).

Every detector has one method, ``detect(rgb) -> list[(x, y, w, h, score)]``: ``rgb`` is a
uint8 (H, W, 3) RGB image, boxes are ints in its pixels (clipped to the image), ``score``
is the detector's own confidence (its scale differs between detectors: yunet 0-1,
haar and dlib an unbounded margin). Boxes come sorted by score, best first.

* ``yunet``: libfacedetection's CNN (the YuNet family), weights compiled into the
  ``yuface`` wheel. The most accurate of the three on rotated, small and non-frontal faces.
* ``haar``: OpenCV's frontal Haar cascade from ``opencv-python-headless`` (always available).
* ``dlib``: dlib's HOG + linear SVM frontal detector (``dlib-bin`` wheel; built into dlib).

``make_detector("auto")`` takes the first of ``AUTO_ORDER`` that is installed.
``detect_faces(detector, rgb, max_side)`` runs a detector on a downscaled copy of a large
photo and maps the boxes back to the original's pixels.

Threads: yuface runs YuNet with OpenMP (its own bundled libgomp) and holds the GIL while it
runs. By default each YuNet call uses **one** OpenMP thread (``YuNetDetector(threads=1)``): with
two threads a 960 x 375 photo took 51 ms instead of 58 ms on two idle cores, but 365-435 ms
instead of 52-64 ms when other processes kept the cores busy (OpenMP's threads wait for each
other at every layer), so one thread is the robust choice; ``threads=0`` keeps OpenMP's default.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from functools import lru_cache
from typing import Protocol

import numpy as np

from ..errors import ConfigError

Box = tuple[int, int, int, int, float]

#: detectors tried by ``auto``, best first (see the README's detector comparison)
AUTO_ORDER = ("yunet", "haar")


class FaceDetector(Protocol):
    name: str
    max_side: int  # photos are downscaled to this longer side for detection

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """uint8 (H, W, 3) RGB -> boxes ``(x, y, w, h, score)`` in its pixels, best first."""


def _clip_boxes(boxes, scores, width: int, height: int, min_side: int = 1) -> list[Box]:
    out = []
    for (x, y, w, h), s in zip(boxes, scores):
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
        if x1 - x0 >= min_side and y1 - y0 >= min_side:
            out.append((x0, y0, x1 - x0, y1 - y0, float(s)))
    return sorted(out, key=lambda b: -b[4])


class HaarDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml`` (Viola-Jones), score = cascade level weight.

    ``min_neighbors`` trades recall for false positives (OpenCV's usual 5);
    ``min_size`` is the smallest face side in pixels.
    """

    name = "haar"
    max_side = 1280

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24):
        import cv2

        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ConfigError(f"OpenCV's Haar cascade {path} could not be loaded")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        boxes, _, weights = self._cascade.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        if len(boxes) == 0:
            return []
        return _clip_boxes(np.asarray(boxes), np.asarray(weights).reshape(-1), rgb.shape[1], rgb.shape[0])


@lru_cache(maxsize=1)
def _yuface_openmp():
    """ctypes handle of the OpenMP runtime yuface's extension is linked with, or None if not found."""
    import ctypes
    from pathlib import Path

    import yuface

    package = Path(yuface.__file__).parent
    # the wheel bundles its own libgomp (auditwheel renames it libgomp-<hash>.so.1...) beside the package
    candidates = sorted(package.parent.glob(f"{package.name}.libs/libgomp*.so*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by yuface: the same handle
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def set_yunet_threads(threads: int) -> bool:
    """Set the OpenMP threads of YuNet calls made from the calling thread (OpenMP keeps the
    setting per thread); ``threads <= 0`` leaves it alone. False when yuface's OpenMP runtime
    cannot be reached (then OpenMP's default applies)."""
    if threads <= 0:
        return True
    lib = _yuface_openmp()
    if lib is None:
        return False
    lib.omp_set_num_threads(int(threads))
    return True


class YuNetDetector:
    """libfacedetection's CNN through the ``yuface`` wheel; score in [0, 1].

    ``threshold``: the smallest confidence kept (the library's default 0.5). ``threads``: OpenMP
    threads per call (default 1, see the module doc; 0: OpenMP's default, every core).
    """

    name = "yunet"
    max_side = 960  # the library's documented working size

    def __init__(self, threshold: float = 0.5, threads: int = 1):
        import yuface

        if int(threads) != threads or threads < 0:
            raise ConfigError(f"detector threads must be an integer >= 0 (0: OpenMP's default), got {threads!r}")
        self._detect = yuface.c_detect  # the wrapper's detect() only adds a size warning
        self.threshold = threshold
        self.threads = int(threads)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        # per call (a microsecond): OpenMP keeps the setting per calling thread
        set_yunet_threads(self.threads)
        # one row per face: confidence in percent, x, y, w, h (int16), then 5 landmarks
        rows = np.asarray(self._detect(np.ascontiguousarray(rgb[..., ::-1])), dtype=np.int64).reshape(-1, 16)
        rows = rows[rows[:, 0] >= 100 * self.threshold]
        return _clip_boxes(rows[:, 1:5], rows[:, 0] / 100.0, rgb.shape[1], rgb.shape[0])


class DlibDetector:
    """dlib's HOG frontal face detector; ``upsample`` doubles the image that many times (finds smaller faces)."""

    name = "dlib"
    max_side = 1280

    def __init__(self, upsample: int = 1, threshold: float = 0.0):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample, self.threshold = upsample, threshold

    def detect(self, rgb: np.ndarray) -> list[Box]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(rgb), self.upsample, self.threshold)
        boxes = [(r.left(), r.top(), r.width(), r.height()) for r in rects]
        return _clip_boxes(boxes, scores, rgb.shape[1], rgb.shape[0])


DETECTORS = {"yunet": (YuNetDetector, "yuface"), "haar": (HaarDetector, "cv2"), "dlib": (DlibDetector, "dlib")}


#: detectors are made by several threads at once (one per thread): imports and checks one at a time
_MAKE_LOCK = threading.RLock()


def _installed(module: str) -> bool:
    # a module another thread is importing has __spec__ None for a moment, and find_spec then raises
    with _MAKE_LOCK:
        return module in sys.modules or importlib.util.find_spec(module) is not None


def available_detectors() -> list[str]:
    """Names of the detectors whose package is installed."""
    return [name for name, (_, module) in DETECTORS.items() if _installed(module)]


def make_detector(name: str = "auto", threads: int = 1) -> FaceDetector:
    """A detector by name: ``auto`` (the best installed, ``AUTO_ORDER``), ``yunet``, ``haar`` or ``dlib``.

    ``threads``: YuNet's OpenMP threads per call (``YuNetDetector``); the others ignore it.
    """
    if name == "auto":
        installed = available_detectors()
        name = next(n for n in AUTO_ORDER if n in installed)
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector '{name}'; choose auto, {', '.join(DETECTORS)}")
    cls, module = DETECTORS[name]
    if not _installed(module):
        package = {"yuface": "yuface", "dlib": "dlib-bin"}.get(module, module)
        raise ConfigError(f"detector '{name}' needs the package {package} (pip install {package})")
    with _MAKE_LOCK:
        return cls(threads=threads) if cls is YuNetDetector else cls()


def detect_faces(detector: FaceDetector, rgb: np.ndarray, max_side: int | None = None) -> list[Box]:
    """Boxes of ``detector`` on ``rgb``, in ``rgb``'s pixels.

    A photo whose longer side exceeds ``max_side`` pixels (default: the detector's
    ``max_side``) is downscaled (area interpolation) to that side for detection, and the
    boxes are scaled back.
    """
    import cv2

    max_side = max_side or getattr(detector, "max_side", 1280)
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return detector.detect(rgb)
    small = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    found = detector.detect(small)
    boxes = [(x / scale, y / scale, w / scale, h / scale) for x, y, w, h, _ in found]
    return _clip_boxes(boxes, [b[4] for b in found], width, height)
