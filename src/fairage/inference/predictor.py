"""Ages for the faces in any photo: model loading, image reading, face crops, batched inference.

::

    from fairage.inference.predictor import AgePredictor
    predictor = AgePredictor("runs/M1")                  # a run folder, a model folder or a .onnx file
    result = predictor.predict_image("family.jpg")       # every face: box (x, y, w, h), score, age
    ages = predictor.predict_crops([crop1, crop2])       # already-cropped faces -> years
    lo, hi = predictor.intervals(ages)                   # conformal intervals (years), when calibrated

Models (``load_model``):

* a **run folder** (``fairage train``): ``config.yaml`` and the best checkpoint of the
  last completed stage;
* a **model folder** (``fairage import-keras``): ``config.yaml`` + ``model.safetensors``;
* an **exported file** (``fairage export --format onnx``): run with onnxruntime; its image
  size and input convention come from the file's metadata.

Face crops follow the training data's convention (APPA-REAL's ``_face.jpg``): the
detector's box enlarged by 40% of its side on each side, made square around the box's
centre (parts outside the photo are black), then resized to the model's image size with
Pillow's bilinear filter (the training cache's resize). Boxes are in the pixels of the
photo after its EXIF orientation is applied; large photos are downscaled for detection
only (``fairage.inference.detect.detect_faces``) and cropped from the original.

Images are uint8 (H, W, 3) RGB arrays; ages are float years. Inference is batched, fp32,
on the GPU when there is one.

A model that carries a conformal calibration (``fairage.fairness.conformal``: ``conformal.json`` of a run
or model folder, the ``fairage_conformal`` metadata of an exported file) gives every face an
interval ``age_lo``-``age_hi`` (years) besides its age; photos carry no group labels, so a
Mondrian calibration over attributes gives each face the widest interval of the groups it
could belong to.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.schema import ExperimentConfig

# the crop convention (CROP_MARGIN, crop_box, crop_face) lives beside the decoder, which the service's
# torch-free prepare processes import too
from ..data.decode import (  # noqa: F401 (re-exported)
    CROP_MARGIN,
    crop_box,
    crop_face,
    decode_face,
    open_image,
    pil_to_rgb,
    resize_square,
    to_rgb,
)
from ..data.decode import read_image as _decode_read_image
from ..errors import ConfigError, DataError
from ..fairness.conformal import (
    CONFORMAL,
    Calibration,
    read_calibration,
)
from ..models.heads import clamp_ages
from ..models.regressor import AgeRegressor

#: file name suffixes read from folders (a file named explicitly is tried whatever its suffix)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# =========================================================================== model loading


@dataclass
class LoadedModel:
    """A model ready for inference.

    ``model`` maps RGB float images (N, 3, S, S) in [0, 1] to label units: an
    ``AgeRegressor`` in eval mode, fp32, on the CPU, for run and model folders; for an
    exported file a module that returns years directly (``years`` handles both).
    ``image_size`` is S; ``input_norm`` the normalisation inside the network; ``kind`` is
    ``"run"``, ``"folder"`` or ``"exported"``; ``run_dir`` the run folder (runs only);
    ``calibration`` its conformal calibration (``fairage.fairness.conformal.Calibration``) or None.
    """

    model: torch.nn.Module
    config: ExperimentConfig | None
    image_size: int
    input_norm: str
    name: str
    source: Path
    kind: str
    run_dir: Path | None = None
    calibration: Calibration | None = None

    def years(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float [0, 1] on the model's device -> (N,) float32 years, clamped into 0-150."""
        return self.years_and_spread(x)[0]

    @property
    def has_spread(self) -> bool:
        """Whether the model gives each face a spread (a distribution head: dex, coral, corn)."""
        return isinstance(self.model, AgeRegressor) and self.model.has_spread

    def years_and_spread(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``years`` and the (N,) float32 spread in years (the standard deviation of each face's
        predicted age distribution), or None when the model gives none (regression heads, exports)."""
        return self.outputs_to_years(self.model(x))

    def outputs_to_years(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``years_and_spread`` of the network's raw output ``out`` (however it was computed)."""
        if isinstance(self.model, AgeRegressor):
            spread = self.model.spread(out)
            return self.model.ages(out), None if spread is None else spread.float()
        return clamp_ages(out.float().reshape(-1)), None


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a run folder, a model folder or an exported ``.onnx`` file (see the module doc).

    DataError naming the path when it is none of these or its files do not fit (``store.model_folder.model_kind``,
    ``store.checkpoint``); ConfigError for a file other than ``.onnx``.
    """
    from ..store.checkpoint import model_from_checkpoint
    from ..store.model_folder import load_model_folder, model_kind
    from ..store.run_folder import RunFolder

    path = Path(path)
    kind = model_kind(path)
    if kind == "exported":
        if path.suffix.lower() != ".onnx":
            raise ConfigError(
                f"{path}: not a fairage model: expected a run folder (config.yaml + checkpoints/), a "
                "model folder (config.yaml + model.safetensors) or an exported .onnx file"
            )
        return _load_onnx(path)
    if kind == "run":
        folder = RunFolder.open(path)
        cfg = folder.config()
        model = model_from_checkpoint(folder.best_checkpoint(), cfg)[0].float()
        return LoadedModel(
            model,
            cfg,
            cfg.data.image_size,
            cfg.model.input_norm,
            cfg.name or path.name,
            path,
            "run",
            path,
            folder.calibration(),
        )
    model, cfg = load_model_folder(path)
    return LoadedModel(
        model,
        cfg,
        cfg.data.image_size,
        cfg.model.input_norm,
        cfg.name or path.name,
        path,
        "folder",
        calibration=read_calibration(path / CONFORMAL),
    )


class OnnxAgeModel(torch.nn.Module):
    """An exported ``.onnx`` model run by onnxruntime, as a module: (N, 3, S, S) [0, 1] -> (N,) years."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                f"{path}: running an .onnx model needs onnxruntime (pip install 'fairage[export]')"
            ) from None
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime's load errors share no public base class
            raise ConfigError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1))


def _load_onnx(path: Path) -> LoadedModel:
    from ..store.exported import read_export_metadata

    module = OnnxAgeModel(path)
    info = read_export_metadata(module.metadata, path)
    size = info.image_size
    dims = list(module.session.get_inputs()[0].shape)
    if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in zip(dims[1:], (3, size, size))):
        raise ConfigError(f"{path}: its input has shape {dims}, but its metadata says (N, 3, {size}, {size})")
    return LoadedModel(
        module, info.config, size, info.input_norm, info.name, path, "exported", calibration=info.calibration
    )


# =========================================================================== images


# one decoder for the cache, predict and serve (``fairage.data.decode``)
_open_checked = open_image
_to_rgb_array = to_rgb
_pil_to_rgb = pil_to_rgb
resize_face = resize_square


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """A photo as a uint8 (H, W, 3) RGB array, in the orientation its EXIF tag asks for.

    ``source`` is a path or the file's bytes. Grayscale, palette, 16-bit, CMYK and
    transparent images are converted to RGB (transparency on white). DataError naming the
    file for a missing, unreadable or non-image file and for one over Pillow's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``: decompression bombs).
    """
    return _decode_read_image(source)


def read_face(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """An already-cropped face file as uint8 (size, size, 3) RGB, decoded as the training cache does.

    The same decoder as ``fairage.data.cache.decode_image`` (``fairage.data.decode``: EXIF
    orientation, bit depth, alpha, JPEG draft scale, bilinear resize), so a dataset's
    ``_face.jpg`` gives the pixels the model saw in training.
    """
    return _read_face(source, size)[0]


def _read_face(source, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_face`` and the file's (width, height) in its EXIF-corrected orientation."""
    return decode_face(source, size)


def _as_rgb(image) -> np.ndarray:
    """An image argument (RGB uint8 array, PIL image, path or bytes) as a uint8 (H, W, 3) RGB array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"image array must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        return image
    from PIL import Image

    if isinstance(image, Image.Image):
        return _to_rgb_array(image, "<PIL image>")
    return read_image(image)


# =========================================================================== results


@dataclass
class FaceResult:
    """One face: ``box`` (x, y, w, h) in original-photo pixels (after EXIF orientation),
    the detector's ``score``, the predicted ``age`` in years, its ``spread`` in years (the
    standard deviation of the predicted age distribution; None for a model that gives none) and
    its conformal interval ``age_lo``-``age_hi`` (years; None when the model carries no calibration)."""

    box: tuple[int, int, int, int]
    score: float
    age: float
    spread: float | None = None
    age_lo: float | None = None
    age_hi: float | None = None


@dataclass
class PreparedImage:
    """A photo ready for the model (``AgePredictor.prepare_image``): its size (after EXIF
    orientation), ``found`` = ``[(box, score)]`` per face, best first, and ``crops`` their uint8
    (N, S, S, 3) RGB crops at the model's size."""

    width: int
    height: int
    found: list[tuple[tuple[int, int, int, int], float]]
    crops: np.ndarray


@dataclass
class ImageResult:
    """One photo: its size (after EXIF orientation) and its faces, best detector score first."""

    width: int
    height: int
    faces: list[FaceResult] = field(default_factory=list)


# =========================================================================== predictor


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(text: str | torch.device) -> torch.device:
    """A ``--device`` value (``cpu``, ``cuda``, ``cuda:1``, ``mps``) as a torch device present here.

    ConfigError naming the value for an unknown device type or one this machine lacks.
    """
    if isinstance(text, torch.device):
        device = text
    else:
        try:
            device = torch.device(str(text).strip())
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"--device {str(text)[:60]!r} is not a torch device; use cpu, cuda, cuda:N or mps"
            ) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine; use cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: no Apple MPS device is available on this machine; use cpu")
        return device
    raise ConfigError(f"--device {device}: fairage predicts on cpu, cuda, cuda:N or mps")


class AgePredictor:
    """Ages of faces: detection, crop, batched fp32 inference.

    Parameters
    ----------
    model : LoadedModel, or a path for ``load_model``.
    detector : ``auto`` (the best installed), ``yunet``, ``haar`` or ``dlib``
        (``fairage.inference.detect``); made on first use, so face-crop-only use needs none.
    device : torch device (default: CUDA when present, else CPU). Exported models run
        on onnxruntime's own device.
    batch_size : faces per forward pass.
    detector_threads : OpenMP threads per YuNet call (``fairage.inference.detect.YuNetDetector``; default 1,
        robust on busy machines; 0: OpenMP's default).
    """

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike,
        detector: str = "auto",
        device=None,
        batch_size: int = 64,
        detector_threads: int = 1,
    ):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = parse_device(device) if device is not None else default_device()
        if self.loaded.kind == "exported":
            self.device = torch.device("cpu")  # onnxruntime takes host arrays
        else:
            self.loaded.model.to(self.device).eval()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if isinstance(detector_threads, bool) or not isinstance(detector_threads, int) or detector_threads < 0:
            raise ConfigError(
                f"detector_threads must be an integer >= 0 (0: OpenMP's default), got {detector_threads!r}"
            )
        self.detector_threads = detector_threads
        self.detector_name = detector
        self._local = threading.local()  # one detector per thread: OpenCV and dlib detectors are not shared safely
        self.runtime = "onnxruntime" if self.loaded.kind == "exported" else "torch"
        self._forward = None  # the network's forward pass when not torch's (use_runtime)
        if detector != "auto":
            self.detector  # noqa: B018 - an unknown or missing detector fails now, not at the first photo

    #: the runtimes ``use_runtime`` takes
    RUNTIMES = ("torch", "onnxruntime")

    def use_runtime(self, runtime: str, threads: int = 1) -> str:
        """Run the network on ``runtime``: ``torch`` or ``onnxruntime`` (CPU, ``threads`` intra-op
        threads; the network exported in memory, ``fairage.inference.export.OnnxRuntimeForward``), or
        ``auto``: whichever of the two runs a batch of ``batch_size`` faces faster here
        (``time_runtimes``; torch on a GPU). Ages and spreads are the same to float32 rounding.
        Returns the runtime chosen. An exported model runs on onnxruntime whatever is asked."""
        if runtime not in (*self.RUNTIMES, "auto"):
            raise ConfigError(f"unknown runtime '{str(runtime)[:40]}'; choose auto, torch or onnxruntime")
        if self.loaded.kind == "exported":
            return self.runtime
        if runtime == "auto":
            if self.device.type != "cpu":
                runtime = "torch"
            else:
                try:
                    times = self.time_runtimes(threads)
                except ConfigError:  # no onnxruntime, or the network does not export
                    times = {"torch": 0.0}
                runtime = min(times, key=times.get)
                return self.use_runtime(runtime, threads)
        if runtime == "onnxruntime":
            if self.device.type != "cpu":
                raise ConfigError(f"--runtime onnxruntime runs on the CPU; this predictor is on {self.device}")
            from .export import OnnxRuntimeForward

            self._forward = OnnxRuntimeForward(self.loaded, threads)
        else:
            self._forward = None
        self.runtime = runtime
        return runtime

    def time_runtimes(self, threads: int = 1, repeats: int = 3) -> dict[str, float]:
        """Seconds per forward pass of ``batch_size`` random faces on each runtime (best of
        ``repeats``, after one warm-up), torch with its current threads."""
        import time

        from .export import OnnxRuntimeForward

        size = self.image_size
        x = torch.from_numpy(np.random.default_rng(0).random((self.batch_size, 3, size, size), dtype=np.float32))
        forwards = {"torch": self.loaded.model, "onnxruntime": OnnxRuntimeForward(self.loaded, threads)}
        times = {}
        with torch.inference_mode():
            for name, forward in forwards.items():
                forward(x)
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    forward(x)
                    best = min(best, time.perf_counter() - start)
                times[name] = best
        return times

    @property
    def image_size(self) -> int:
        return self.loaded.image_size

    @property
    def detector(self):
        """This thread's face detector (made on first use)."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            from .detect import make_detector

            detector = self._local.detector = make_detector(self.detector_name, threads=self.detector_threads)
        return detector

    # ----------------------------------------------------------------- inference

    def predict_batch(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB faces at the model's size -> float64 (N,) years, one forward pass."""
        return self.predict_batch_spread(faces)[0]

    @torch.inference_mode()
    def predict_batch_spread(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict_batch``'s years and the float64 (N,) spreads in years (None: the model gives none)."""
        faces = np.ascontiguousarray(faces)
        if not faces.flags.writeable:  # a read-only memmap: torch wants writable memory
            faces = faces.copy()
        batch = torch.from_numpy(faces).to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if self._forward is not None:
            years, spread = self.loaded.outputs_to_years(self._forward(x))
        else:
            years, spread = self.loaded.years_and_spread(x)
        return years.double().cpu().numpy(), None if spread is None else spread.double().cpu().numpy()

    def predict_crops(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Ages (float64 (N,), years) of already-cropped faces.

        ``crops``: uint8 (H, W, 3) RGB arrays (any size; resized to the model's size like
        the training cache does) or one uint8 (N, S, S, 3) array at the model's size.
        """
        return self.predict_crops_spread(crops)[0]

    def predict_crops_spread(self, crops: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict_crops``'s ages and float64 (N,) spreads in years (None when the model gives none)."""
        size = self.image_size
        if isinstance(crops, np.ndarray) and crops.ndim == 4:
            if crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
                raise DataError(f"face array must be uint8 (N, {size}, {size}, 3), got {crops.dtype} {crops.shape}")
            batches = (crops[a : a + self.batch_size] for a in range(0, len(crops), self.batch_size))
        else:
            faces = [resize_face(_as_rgb(c), size) for c in crops]
            batches = (np.stack(faces[a : a + self.batch_size]) for a in range(0, len(faces), self.batch_size))
        out = [self.predict_batch_spread(b) for b in batches]
        ages = np.concatenate([a for a, _ in out]) if out else np.empty(0)
        if not self.loaded.has_spread:
            return ages, None
        return ages, np.concatenate([s for _, s in out]) if out else np.empty(0)

    @property
    def calibration(self) -> Calibration | None:
        """The model's conformal calibration, None when it has none."""
        return self.loaded.calibration

    def intervals(self, ages) -> tuple[np.ndarray, np.ndarray] | None:
        """Conformal intervals ``(age_lo, age_hi)`` (float64 (N,), years) of predicted ages (N,)
        for faces with no known group labels; None when the model carries no calibration."""
        if self.loaded.calibration is None:
            return None
        return self.loaded.calibration.intervals(np.asarray(ages, dtype=float))

    def _faces(self, found, ages, spreads=None) -> list[FaceResult]:
        """FaceResults of ``(box, score, ...)`` detections, their ages and spreads (years, or None),
        with intervals when calibrated."""
        ages = np.asarray(ages, dtype=float)
        bounds = self.intervals(ages) if len(ages) else None
        return [
            FaceResult(
                box,
                float(score),
                float(age),
                spread=_float(spreads, i),
                age_lo=None if bounds is None else float(bounds[0][i]),
                age_hi=None if bounds is None else float(bounds[1][i]),
            )
            for i, ((box, score, *_), age) in enumerate(zip(found, ages))
        ]

    def find_faces(self, rgb: np.ndarray) -> list[tuple[tuple[int, int, int, int], float, np.ndarray]]:
        """Detected faces of a photo: ``(box, score, crop)`` per face, crop at the model's size."""
        from .detect import detect_faces

        return [
            ((x, y, w, h), s, crop_face(rgb, (x, y, w, h), self.image_size))
            for x, y, w, h, s in detect_faces(self.detector, rgb)
        ]

    def predict_image(self, image, faces_only: bool = False) -> ImageResult:
        """Every face of one photo with its box and age.

        ``image``: uint8 (H, W, 3) RGB array, PIL image, path or file bytes (EXIF
        orientation applied). ``faces_only=True``: the image is already a face crop; no
        detection, one face whose box is the whole image and score 1.
        """
        prepared = self.prepare_image(image, faces_only=faces_only)
        if not len(prepared.crops):
            return self.finish_image(prepared, np.empty(0), None)
        return self.finish_image(prepared, *self.predict_crops_spread(prepared.crops))

    def prepare_image(self, image, faces_only: bool = False) -> PreparedImage:
        """``predict_image`` up to the model: decode, detect and crop (``image`` and
        ``faces_only`` as there). The crops' ages, from any forward pass (``predict_crops_spread``,
        alone or batched with other photos' crops), go to ``finish_image``."""
        if faces_only and isinstance(image, (str, os.PathLike, bytes, bytearray)):
            face, (width, height) = _read_face(image, self.image_size)
            return PreparedImage(width, height, [((0, 0, width, height), 1.0)], face[None])
        rgb = _as_rgb(image)
        if faces_only:
            width, height = rgb.shape[1], rgb.shape[0]
            return PreparedImage(width, height, [((0, 0, width, height), 1.0)], resize_face(rgb, self.image_size)[None])
        found = self.find_faces(rgb)
        size = self.image_size
        crops = np.stack([crop for _, _, crop in found]) if found else np.empty((0, size, size, 3), np.uint8)
        return PreparedImage(rgb.shape[1], rgb.shape[0], [(box, score) for box, score, _ in found], crops)

    def finish_image(self, prepared: PreparedImage, ages, spreads=None) -> ImageResult:
        """The ``ImageResult`` of a ``prepare_image`` photo from its crops' ages and spreads
        (float (N,) years, N = len(prepared.crops); spreads None for a model that gives none),
        with the conformal intervals when the model is calibrated."""
        result = ImageResult(prepared.width, prepared.height)
        if prepared.found:
            result.faces = self._faces(prepared.found, ages, spreads)
        return result

    def predict_files(
        self, paths: Iterable[str | os.PathLike], faces_only: bool = False, workers: int = 1, keep_images: bool = False
    ) -> Iterator[tuple[str, ImageResult | None, str | None, np.ndarray | None]]:
        """Predict many image files, in order: yields ``(path, result, error, rgb)`` per file.

        Files are read (and faces detected) in ``workers`` threads while the model runs
        batches of up to ``batch_size`` faces gathered across photos. One worker by default:
        YuNet holds the GIL, so a second thread overlaps only decoding, and on 2 busy cores it
        cost more than it gave (6.3 against 9.6 photos/s, ``benchmarks/predict_throughput.py``). ``error`` is the
        message of an unreadable file (its ``result`` is None); ``rgb`` is the decoded
        photo when ``keep_images`` (for drawing; None with ``faces_only``), else None.
        """
        from concurrent.futures import ThreadPoolExecutor

        paths = [str(p) for p in paths]
        pending: list[tuple] = []
        queued = 0

        def prepare(path: str):
            return self._prepare_file(path, faces_only, keep_images)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # a bounded window of files in flight keeps memory flat on large folders
            window = max(4 * workers, 8)
            futures = [pool.submit(prepare, p) for p in paths[:window]]
            for i, path in enumerate(paths):
                error, rgb, found, size = futures[i].result()
                futures[i] = None
                if i + window < len(paths):
                    futures.append(pool.submit(prepare, paths[i + window]))
                pending.append((path, error, rgb, found, size))
                queued += len(found) if found else 0
                # photos without faces add no crops: bound the photos held too
                if queued >= self.batch_size or len(pending) >= (window if keep_images else 4 * self.batch_size):
                    yield from self._file_results(pending)
                    pending, queued = [], 0
            yield from self._file_results(pending)

    def _prepare_file(self, path: str, faces_only: bool, keep_images: bool):
        """(error, rgb, found, (width, height)) of one file; found = [(box, score, crop)]."""
        try:
            if faces_only:
                face, (width, height) = _read_face(path, self.image_size)
                return None, None, [((0, 0, width, height), 1.0, face)], (width, height)
            rgb = read_image(path)
            return None, rgb if keep_images else None, self.find_faces(rgb), (rgb.shape[1], rgb.shape[0])
        except DataError as err:
            return str(err), None, None, None

    def _file_results(self, pending: list[tuple]):
        """The ages of the faces of the ``pending`` files in one batch; ``predict_files``' tuple per file."""
        crops = [crop for *_, found, _ in pending if found for _, _, crop in found]
        ages, spreads = self.predict_crops_spread(np.stack(crops)) if crops else (np.empty(0), None)
        start = 0
        for path, error, rgb, found, size in pending:
            if error is not None:
                yield path, None, error, None
                continue
            faces = self._faces(
                found,
                ages[start : start + len(found)],
                None if spreads is None else spreads[start : start + len(found)],
            )
            start += len(found)
            yield path, ImageResult(size[0], size[1], faces), None, rgb


def _float(values: np.ndarray | None, i: int) -> float | None:
    return None if values is None else float(values[i])


def predict_faces(
    model: LoadedModel | str | os.PathLike, faces, device=None, batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Ages (float64 (N,), years) of a face table's images (``fairage.data`` face table, any layout).

    The images are decoded exactly as for training (``fairage.data.load_images`` at the
    model's size, cached in the dataset's cache folder), so a run's model gives its own
    test predictions again.
    """
    from ..data import load_images

    predictor = AgePredictor(model, device=device, batch_size=batch_size)
    images = load_images(faces, predictor.image_size, progress=progress)
    return predictor.predict_crops(images)


# =========================================================================== inputs and CSV


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """Image files named by ``inputs`` as ``(path, label)``, in order, without repeats.

    A file is taken whatever its suffix (an unreadable one is reported later); a folder
    gives its files with an image suffix (``IMAGE_SUFFIXES``), recursively, sorted, each
    labelled by its path relative to the folder; a pattern with ``*``, ``?`` or ``[``
    that names no existing file is expanded as a glob (``**`` recursive), labels as
    matched. DataError for an input that names nothing.

    Labels name the rows of the predictions CSV and the ``--annotate`` copies, so they are
    unique: a folder's file whose label another file already has (two folders holding
    ``IMG_0001.jpg``) is labelled with the folder as given, ``folder/IMG_0001.jpg``; DataError
    naming both files if even that is taken.
    """
    import glob

    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    labels: dict[str, Path] = {}

    def add(path: Path, label: str, qualified: str | None = None) -> None:
        key = str(path.resolve())
        if key in seen:
            return
        if label in labels and qualified is not None:
            label = qualified
        if label in labels:
            raise DataError(
                f"{path} and {labels[label]} would both be labelled {label!r} in the output; "
                "rename one or give them in separate runs"
            )
        seen.add(key)
        labels[label] = path
        out.append((str(path), label))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            for p in files:
                rel = p.relative_to(path).as_posix()
                add(p, rel, (Path(item) / rel).as_posix())
        elif path.exists():
            add(path, str(item))
        elif any(c in str(item) for c in "*?["):
            matches = sorted(glob.glob(str(item), recursive=True))
            files = [m for m in matches if Path(m).is_file()]
            if not files:
                raise DataError(f"{item}: no files match")
            for m in files:
                add(Path(m), m)
        else:
            raise DataError(f"{item}: no such file or folder")
    return out


DETECT_COLUMNS = ("image", "face", "x", "y", "w", "h", "score", "age")
FACES_COLUMNS = ("image", "age")
#: the column a distribution head's models add after ``age``: the spread in years
SPREAD_COLUMN = "spread"
#: the conformal interval's columns, after ``age`` (and ``spread``), when the model carries a calibration
INTERVAL_COLUMNS = ("age_lo", "age_hi")


def _face_values(face: FaceResult) -> dict:
    out = {"age": round(face.age, 6)}
    if face.spread is not None:
        out[SPREAD_COLUMN] = round(face.spread, 6)
    if face.age_lo is not None:
        out.update(age_lo=round(face.age_lo, 6), age_hi=round(face.age_hi, 6))
    return out


def prediction_rows(label: str, result: ImageResult, faces_only: bool) -> list[dict]:
    """CSV rows of one image: ``image,age`` with ``faces_only``, else one row per face
    (``image,face,x,y,w,h,score,age``; a photo without a face: one row, face columns empty);
    ``spread`` follows ``age`` for a model that gives one, then ``age_lo,age_hi`` for a calibrated model."""
    if faces_only:
        return [{"image": label, **_face_values(result.faces[0])}]
    if not result.faces:
        return [{"image": label}]
    return [
        {
            "image": label,
            "face": i,
            "x": f.box[0],
            "y": f.box[1],
            "w": f.box[2],
            "h": f.box[3],
            "score": round(f.score, 6),
            **_face_values(f),
        }
        for i, f in enumerate(result.faces)
    ]


def write_prediction_csv(path: str | os.PathLike, rows: list[dict], faces_only: bool, intervals: bool = False) -> None:
    """Atomically write prediction rows (``prediction_rows``) as CSV (with ``spread`` when a row has
    one; ``intervals``: with ``age_lo,age_hi`` columns)."""
    import pandas as pd

    from ..atomic import atomic_path
    from ..csvcells import safe_table

    columns = list(FACES_COLUMNS if faces_only else DETECT_COLUMNS)
    if any(SPREAD_COLUMN in row for row in rows):
        columns.append(SPREAD_COLUMN)
    columns += list(INTERVAL_COLUMNS) if intervals else []
    table = pd.DataFrame(rows, columns=columns)
    if not faces_only:
        for c in ("face", "x", "y", "w", "h"):
            table[c] = table[c].astype("Int64")  # empty for photos without a face, ints otherwise
    with atomic_path(path) as tmp:
        safe_table(table).to_csv(tmp, index=False)  # a photo named "=HYPERLINK(...)" stays text


def draw_faces(rgb: np.ndarray, result: ImageResult, out: str | os.PathLike) -> None:
    """Save ``rgb`` with each face's box and age (and its interval, ``31 (24-39)``) drawn on it to ``out`` (atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    from ..atomic import atomic_path

    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    line = max(2, round(max(im.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(im.size) / 40)))
    for face in result.faces:
        x, y, w, h = face.box
        draw.rectangle((x, y, x + w, y + h), outline=(255, 64, 0), width=line)
        text = f"{face.age:.0f}" if face.age_lo is None else f"{face.age:.0f} ({face.age_lo:.0f}-{face.age_hi:.0f})"
        tx, ty = x, max(0, y - font.size - 2 * line)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(bbox, fill=(255, 64, 0))
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    out = Path(out)
    suffix = out.suffix.lower()
    with atomic_path(out) as tmp:
        im.save(
            tmp,
            format=None if suffix in (".jpg", ".jpeg", ".png", ".webp", ".bmp") else "PNG",
            **({"quality": 90} if suffix in (".jpg", ".jpeg") else {}),
        )


def annotated_paths(annotate_dir: str | os.PathLike, files: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """Label -> where its drawn copy goes, for every ``(path, label)`` of ``expand_inputs``.

    Each copy goes to its label's path under the folder (``annotated_path``), unless that
    would write over one of the input files (``--annotate`` naming the input folder) or a
    copy of another label (``a/x.jpg`` and ``../a/x.jpg``): then ``x.annotated.jpg``,
    ``x.annotated-2.jpg``, ... Every path is distinct and none is an input.
    """
    inputs = {Path(path).resolve() for path, _ in files}
    taken: set[Path] = set()
    out: dict[str, Path] = {}
    for _, label in files:
        target = annotated_path(annotate_dir, label)
        k = 1
        while target.resolve() in inputs or target.resolve() in taken:
            base = annotated_path(annotate_dir, label)
            tail = "annotated" if k == 1 else f"annotated-{k}"
            target = base.with_name(f"{base.stem}.{tail}{base.suffix}")
            k += 1
        taken.add(target.resolve())
        out[label] = target
    return out


def annotated_path(annotate_dir: str | os.PathLike, label: str) -> Path:
    """Where the drawn copy of the image labelled ``label`` goes (its label's path under the folder)."""
    rel = Path(label)
    parts = [p for p in rel.parts if p not in ("..", ".", "/", rel.anchor)]
    return Path(annotate_dir).joinpath(*parts) if parts else Path(annotate_dir) / "image.png"


@dataclass
class PhotoPredictions:
    """What ``predict_to_csv`` did: files read, faces found, photos without a face, unreadable files' messages."""

    n_photos: int = 0
    n_faces: int = 0
    n_empty: int = 0
    unreadable: list[str] = field(default_factory=list)


def predict_to_csv(
    predictor: AgePredictor,
    files: Sequence[tuple[str, str]],
    out: str | os.PathLike,
    faces_only: bool = False,
    annotate: str | os.PathLike | None = None,
    on_file=None,
) -> PhotoPredictions:
    """``fairage predict``: the ages of every face in ``files`` (``expand_inputs``' ``(path, label)``), or of
    each crop with ``faces_only``, written to the CSV ``out``; with ``annotate``, copies of the photos with
    boxes and ages drawn into that folder. ``on_file()`` is called after each file (a progress bar).
    No readable image at all: DataError (nothing is written)."""
    drawn = annotated_paths(annotate, files) if annotate is not None else {}
    labels = dict(files)
    done = PhotoPredictions()
    rows: list[dict] = []
    for path, result, error, rgb in predictor.predict_files(
        labels, faces_only=faces_only, keep_images=annotate is not None
    ):
        if on_file is not None:
            on_file()
        if result is None:
            done.unreadable.append(error)
            continue
        done.n_photos += 1
        done.n_faces += len(result.faces)
        done.n_empty += not result.faces
        rows += prediction_rows(labels[path], result, faces_only)
        if annotate is not None and rgb is not None:
            draw_faces(rgb, result, drawn[labels[path]])
    if done.n_photos:
        write_prediction_csv(out, rows, faces_only, intervals=predictor.calibration is not None)
    return done
