"""Decode, detect and crop uploads in worker processes (``fairage serve --prepare-processes N``).

YuNet holds the GIL while it runs, so threads of one process cannot detect faces in two photos
at once; worker processes can. ``PreparePool(spec, processes)`` is a
``concurrent.futures.ProcessPoolExecutor`` ('spawn' context: no copy of the server's threads or
of its model) whose workers each make one detector in their initializer, with one OpenMP and
one OpenCV thread (``spec.detector_threads`` for YuNet). ``PreparePool.submit(data, faces_only)``
gives a Future of the upload's ``(width, height, found, crops)``: its size after the EXIF turn,
``[(box, score)]`` per face, best first, and the uint8 (N, S, S, 3) RGB crops at the model's
size, exactly what ``fairage.inference.predictor.AgePredictor.prepare_image`` returns for the same bytes.

A worker imports neither torch nor the web framework (this module, ``fairage.inference.detect``,
``fairage.data.decode`` and ``fairage.serve.uploads`` only), so it starts in about a second
and holds tens of MB. A bad upload raises the same ``UploadError`` (status and message) as in
the server's own threads; it travels back to the server through pickling.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..data.decode import crop_face


@dataclass(frozen=True)
class PrepareSpec:
    """What a worker needs: ``detector`` name (``fairage.inference.detect.make_detector``), its
    ``detector_threads`` (YuNet's OpenMP threads), the model's input side ``image_size`` (pixels)
    and the ``max_pixels`` limit of an upload (413 above, checked from the header); ``detect_side``:
    the longer side, pixels, a photo is downscaled to for detection (0: the detector's own
    ``max_side``, 960 for YuNet, as ``fairage predict``)."""

    detector: str
    detector_threads: int
    image_size: int
    max_pixels: int
    detect_side: int = 0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: this worker process's spec and detector (set by ``_start_worker``)
_WORKER: dict = {}


def _start_worker(spec: PrepareSpec) -> None:
    """Initializer of a worker process: one thread for OpenMP and OpenCV, one detector."""
    if spec.detector_threads > 0:  # read by the OpenMP runtimes when they load, below
        os.environ["OMP_NUM_THREADS"] = str(spec.detector_threads)
    import cv2

    from ..inference.detect import make_detector

    cv2.setNumThreads(1)
    _WORKER["spec"] = spec
    _WORKER["detector"] = make_detector(spec.detector, threads=spec.detector_threads)


def _ready() -> int:
    """A no-op task: the worker has started (its pid)."""
    return os.getpid()


def prepare_upload(data: bytes, faces_only: bool) -> tuple[int, int, list, np.ndarray]:
    """In a worker: an upload's ``(width, height, found, crops)`` (module doc); UploadError for bad bytes."""
    from ..data.decode import decode_face, read_image
    from ..errors import DataError
    from ..inference.detect import detect_faces
    from .uploads import UploadError, check_image

    spec: PrepareSpec = _WORKER["spec"]
    size = spec.image_size
    check_image(data, spec.max_pixels)
    try:
        if faces_only:
            face, (width, height) = decode_face(data, size)
            return width, height, [((0, 0, width, height), 1.0)], face[None]
        rgb = read_image(data)
    except DataError as err:  # passed the header check but the pixel data is bad
        raise UploadError(400, f"upload: {err}") from None
    boxes = detect_faces(_WORKER["detector"], rgb, spec.detect_side or None)
    found = [((x, y, w, h), s) for x, y, w, h, s in boxes]
    crops = (
        np.stack([crop_face(rgb, box, size) for box, _ in found]) if found else np.empty((0, size, size, 3), np.uint8)
    )
    return rgb.shape[1], rgb.shape[0], found, crops


class PreparePool:
    """``processes`` worker processes preparing uploads for ``spec`` (see the module doc).

    Processes start on the first ``submit`` or ``start``; ``close`` stops them. A worker that
    dies (its pool then fails every task with ``BrokenProcessPool``) is replaced, with the whole
    pool, by the next ``submit``.
    """

    def __init__(self, spec: PrepareSpec, processes: int):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec, self.processes = spec, int(processes)
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise RuntimeError("the prepare pool is closed")
        if self._executor is None or getattr(self._executor, "_broken", False):
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.spec,),
            )
        return self._executor

    def start(self) -> list[Future]:
        """Start every worker now (a no-op task each); the Futures give their pids."""
        pool = self._pool()
        return [pool.submit(_ready) for _ in range(self.processes)]

    def submit(self, data: bytes, faces_only: bool) -> Future:
        """Future of ``prepare_upload(data, faces_only)`` in a worker."""
        return self._pool().submit(prepare_upload, data, faces_only)

    def close(self) -> None:
        """Stop the workers (queued uploads are cancelled) and wait for them to exit."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
