"""Ages for the faces in any photo: model loading, image reading, face crops, batched inference.

::

    from fairage.predict import AgePredictor
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
only (``fairage.detect.detect_faces``) and cropped from the original.

Images are uint8 (H, W, 3) RGB arrays; ages are float years. Inference is batched, fp32,
on the GPU when there is one.

A model that carries a conformal calibration (``fairage.conformal``: ``conformal.json`` of a run
or model folder, the ``fairage_conformal`` metadata of an exported file) gives every face an
interval ``age_lo``-``age_hi`` (years) besides its age; photos carry no group labels, so a
Mondrian calibration over attributes gives each face the widest interval of the groups it
could belong to.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ExperimentConfig, read_yaml, validate_config
from .conformal import (
    CONFORMAL,
    EXPORT_KEY,
    Calibration,
    calibration_from_text,
    read_calibration,
)
from .errors import ConfigError, DataError
from .models import AgeRegressor, clamp_ages

#: the crop convention: the detector box enlarged by this fraction of its side on each side
CROP_MARGIN = 0.4
#: file name suffixes read from folders (a file named explicitly is tried whatever its suffix)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: metadata keys of an exported model (ONNX metadata_props / TorchScript extra file)
EXPORT_INPUT = "RGB float32 NCHW in [0, 1], shape (N, 3, S, S); the model normalises it itself"
EXPORT_OUTPUT = "apparent age in years, float32, shape (N,)"


# =========================================================================== model loading


@dataclass
class LoadedModel:
    """A model ready for inference.

    ``model`` maps RGB float images (N, 3, S, S) in [0, 1] to label units: an
    ``AgeRegressor`` in eval mode, fp32, on the CPU, for run and model folders; for an
    exported file a module that returns years directly (``years`` handles both).
    ``image_size`` is S; ``input_norm`` the normalisation inside the network; ``kind`` is
    ``"run"``, ``"folder"`` or ``"exported"``; ``run_dir`` the run folder (runs only);
    ``calibration`` its conformal calibration (``fairage.conformal.Calibration``) or None.
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
        out = self.model(x)
        if isinstance(self.model, AgeRegressor):
            return self.model.ages(out)
        return clamp_ages(out.float().reshape(-1))


def read_run_checkpoint(run_dir: Path) -> tuple[ExperimentConfig, dict[str, torch.Tensor]]:
    """A run folder's config and the model weights of its last completed stage's best checkpoint.

    Read through ``fairage.runs.RunFolder`` (``torch.load(weights_only=True)``); DataError
    naming the file when the folder, its run.json or the checkpoint is unusable.
    """
    from .runs import RunFolder, read_checkpoint

    folder = RunFolder.open(run_dir)
    state = read_checkpoint(folder.best_checkpoint()).get("state_dict")
    if not isinstance(state, dict):
        raise DataError(f"{folder.best_checkpoint()} holds no 'state_dict': not a fairage training checkpoint")
    return folder.config(), {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _model_from_state(cfg: ExperimentConfig, state: dict[str, torch.Tensor], source: Path) -> AgeRegressor:
    model = AgeRegressor(cfg.model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{source}: weights do not match the config's model (missing "
                          f"{', '.join(result.missing_keys[:5]) or 'none'}; unexpected "
                          f"{', '.join(result.unexpected_keys[:5]) or 'none'})")
    return model.eval().float()


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a run folder, a model folder or an exported ``.onnx`` file (see the module doc).

    ConfigError naming the path when it is none of these or its files do not fit.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        from .runs import RunFolder

        if RunFolder.exists(path):
            cfg, state = read_run_checkpoint(path)
            model = _model_from_state(cfg, state, path)
            return LoadedModel(model, cfg, cfg.data.image_size, cfg.model.input_norm, cfg.name or path.name,
                               path, "run", path, RunFolder.open(path).calibration())
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            cfg = validate_config(read_yaml(path / "config.yaml"), str(path / "config.yaml"))
            try:
                state = load_file(str(path / "model.safetensors"))
            except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
                raise ConfigError(f"{path / 'model.safetensors'}: cannot read ({type(err).__name__}: {err})") from None
            model = _model_from_state(cfg, state, path / "model.safetensors")
            return LoadedModel(model, cfg, cfg.data.image_size, cfg.model.input_norm, cfg.name or path.name,
                               path, "folder", calibration=read_calibration(path / CONFORMAL))
    if not path.exists():
        raise ConfigError(f"{path}: model not found")
    raise ConfigError(f"{path}: not a fairage model: expected a run folder (config.yaml + checkpoints/), a model "
                      "folder (config.yaml + model.safetensors) or an exported .onnx file")


class OnnxAgeModel(torch.nn.Module):
    """An exported ``.onnx`` model run by onnxruntime, as a module: (N, 3, S, S) [0, 1] -> (N,) years."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"{path}: running an .onnx model needs onnxruntime "
                              "(pip install 'fairage[export]')") from None
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
    module = OnnxAgeModel(path)
    meta = module.metadata
    if "fairage_image_size" not in meta:
        raise ConfigError(f"{path}: no fairage metadata (fairage_image_size); export it with `fairage export`")
    cfg = None
    if meta.get("fairage_config"):
        import yaml

        cfg = validate_config(yaml.safe_load(meta["fairage_config"]), f"{path} (metadata fairage_config)")
    calibration = calibration_from_text(meta.get(EXPORT_KEY), f"{path} (metadata {EXPORT_KEY})")
    return LoadedModel(module, cfg, int(meta["fairage_image_size"]), meta.get("fairage_input_norm", ""),
                       meta.get("fairage_name", path.stem), path, "exported", calibration=calibration)


# =========================================================================== images


def _open_checked(source):
    """Pillow image of a path or bytes; DataError for unreadable input and decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(source)) if name == "<bytes>" else source)
            im.size  # noqa: B018 - header parsed; the pixel count is checked on open
        return im
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name}: refused, too many pixels for a photo ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except OSError as err:
        raise DataError(f"{name}: cannot read ({err})") from None


def _to_rgb_array(im, name: str, draft_size: int | None = None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))  # JPEG: decode at the smallest scale >= size
            im = ImageOps.exif_transpose(im)
            rgb = _pil_to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name}: refused, too many pixels for a photo ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise DataError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"{name}: decoded to an unusable array of shape {rgb.shape}")
    return rgb


def _pil_to_rgb(im) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 3) RGB; transparency composited on white, 16/32-bit scaled to 8."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "RGBA", "RGBa"):
        # transparent pixels on white, as an image viewer shows them
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """A photo as a uint8 (H, W, 3) RGB array, in the orientation its EXIF tag asks for.

    ``source`` is a path or the file's bytes. Grayscale, palette, 16-bit, CMYK and
    transparent images are converted to RGB (transparency on white). DataError naming the
    file for a missing, unreadable or non-image file and for one over Pillow's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``: decompression bombs).
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    with _open_checked(source) as im:
        return _to_rgb_array(im, name)


def read_face(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """An already-cropped face file as uint8 (size, size, 3) RGB, decoded as the training cache does.

    The same JPEG draft scale and bilinear resize as ``fairage.data.cache.decode_image``
    (so a dataset's ``_face.jpg`` gives the pixels the model saw in training), after the
    EXIF orientation is applied.
    """
    return _read_face(source, size)[0]


def _read_face(source, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_face`` and the file's (width, height) in its EXIF-corrected orientation."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    with _open_checked(source) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap the axes
            width, height = height, width
        return resize_face(_to_rgb_array(im, name, draft_size=size), size), (width, height)


def resize_face(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), Pillow bilinear (antialiased when shrinking), as the training cache."""
    if rgb.shape[:2] == (size, size):
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def crop_box(box: Sequence[float], margin: float = CROP_MARGIN) -> tuple[int, int, int]:
    """The square crop ``(x, y, side)`` of a detector box ``(x, y, w, h)``, original pixels.

    The box's longer side grows by ``margin`` of itself on each side (side = (1 + 2 margin)
    max(w, h)), centred on the box's centre.
    """
    x, y, w, h = (float(v) for v in box[:4])
    side = (1.0 + 2.0 * margin) * max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), max(1, int(round(side)))


def crop_face(rgb: np.ndarray, box: Sequence[float], size: int, margin: float = CROP_MARGIN) -> np.ndarray:
    """The face crop of ``box`` in ``rgb`` (see ``crop_box``; outside the photo: black), uint8 (size, size, 3)."""
    x0, y0, side = crop_box(box, margin)
    height, width = rgb.shape[:2]
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return resize_face(crop, size)


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
    the detector's ``score``, the predicted ``age`` in years and its conformal interval
    ``age_lo``-``age_hi`` (years; None when the model carries no calibration)."""

    box: tuple[int, int, int, int]
    score: float
    age: float
    age_lo: float | None = None
    age_hi: float | None = None


@dataclass
class ImageResult:
    """One photo: its size (after EXIF orientation) and its faces, best detector score first."""

    width: int
    height: int
    faces: list[FaceResult] = field(default_factory=list)


# =========================================================================== predictor


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class AgePredictor:
    """Ages of faces: detection, crop, batched fp32 inference.

    Parameters
    ----------
    model : LoadedModel, or a path for ``load_model``.
    detector : ``auto`` (the best installed), ``yunet``, ``haar`` or ``dlib``
        (``fairage.detect``); made on first use, so face-crop-only use needs none.
    device : torch device (default: CUDA when present, else CPU). Exported models run
        on onnxruntime's own device.
    batch_size : faces per forward pass.
    """

    def __init__(self, model: LoadedModel | str | os.PathLike, detector: str = "auto", device=None,
                 batch_size: int = 64):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = torch.device(device) if device is not None else default_device()
        if self.loaded.kind == "exported":
            self.device = torch.device("cpu")  # onnxruntime takes host arrays
        else:
            self.loaded.model.to(self.device).eval()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.detector_name = detector
        self._local = threading.local()  # one detector per thread: OpenCV and dlib detectors are not shared safely
        if detector != "auto":
            self.detector  # noqa: B018 - an unknown or missing detector fails now, not at the first photo

    @property
    def image_size(self) -> int:
        return self.loaded.image_size

    @property
    def detector(self):
        """This thread's face detector (made on first use)."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            from .detect import make_detector

            detector = self._local.detector = make_detector(self.detector_name)
        return detector

    # ----------------------------------------------------------------- inference

    @torch.inference_mode()
    def predict_batch(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB faces at the model's size -> float64 (N,) years, one forward pass."""
        faces = np.ascontiguousarray(faces)
        if not faces.flags.writeable:  # a read-only memmap: torch wants writable memory
            faces = faces.copy()
        batch = torch.from_numpy(faces).to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return self.loaded.years(x).double().cpu().numpy()

    def predict_crops(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Ages (float64 (N,), years) of already-cropped faces.

        ``crops``: uint8 (H, W, 3) RGB arrays (any size; resized to the model's size like
        the training cache does) or one uint8 (N, S, S, 3) array at the model's size.
        """
        size = self.image_size
        if isinstance(crops, np.ndarray) and crops.ndim == 4:
            if crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
                raise DataError(f"face array must be uint8 (N, {size}, {size}, 3), got {crops.dtype} {crops.shape}")
            batches = (crops[a:a + self.batch_size] for a in range(0, len(crops), self.batch_size))
        else:
            faces = [resize_face(_as_rgb(c), size) for c in crops]
            batches = (np.stack(faces[a:a + self.batch_size]) for a in range(0, len(faces), self.batch_size))
        out = [self.predict_batch(b) for b in batches]
        return np.concatenate(out) if out else np.empty(0)

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

    def _faces(self, found, ages) -> list[FaceResult]:
        """FaceResults of ``(box, score, ...)`` detections and their ages, with intervals when calibrated."""
        ages = np.asarray(ages, dtype=float)
        bounds = self.intervals(ages) if len(ages) else None
        return [FaceResult(box, float(score), float(age),
                           None if bounds is None else float(bounds[0][i]), None if bounds is None else float(bounds[1][i]))
                for i, ((box, score, *_), age) in enumerate(zip(found, ages))]

    def find_faces(self, rgb: np.ndarray) -> list[tuple[tuple[int, int, int, int], float, np.ndarray]]:
        """Detected faces of a photo: ``(box, score, crop)`` per face, crop at the model's size."""
        from .detect import detect_faces

        return [((x, y, w, h), s, crop_face(rgb, (x, y, w, h), self.image_size))
                for x, y, w, h, s in detect_faces(self.detector, rgb)]

    def predict_image(self, image, faces_only: bool = False) -> ImageResult:
        """Every face of one photo with its box and age.

        ``image``: uint8 (H, W, 3) RGB array, PIL image, path or file bytes (EXIF
        orientation applied). ``faces_only=True``: the image is already a face crop; no
        detection, one face whose box is the whole image and score 1.
        """
        if faces_only and isinstance(image, (str, os.PathLike, bytes, bytearray)):
            return self._face_result(*_read_face(image, self.image_size))
        rgb = _as_rgb(image)
        if faces_only:
            return self._face_result(resize_face(rgb, self.image_size), (rgb.shape[1], rgb.shape[0]))
        found = self.find_faces(rgb)
        result = ImageResult(rgb.shape[1], rgb.shape[0])
        if found:
            result.faces = self._faces(found, self.predict_crops(np.stack([crop for _, _, crop in found])))
        return result

    def _face_result(self, face: np.ndarray, size: tuple[int, int]) -> ImageResult:
        width, height = size
        return ImageResult(width, height, self._faces([((0, 0, width, height), 1.0)], self.predict_crops(face[None])))

    def predict_files(self, paths: Iterable[str | os.PathLike], faces_only: bool = False, workers: int = 2,
                      keep_images: bool = False
                      ) -> Iterator[tuple[str, ImageResult | None, str | None, np.ndarray | None]]:
        """Predict many image files, in order: yields ``(path, result, error, rgb)`` per file.

        Files are read (and faces detected) in ``workers`` threads while the model runs
        batches of up to ``batch_size`` faces gathered across photos. ``error`` is the
        message of an unreadable file (its ``result`` is None); ``rgb`` is the decoded
        photo when ``keep_images`` (for drawing; None with ``faces_only``), else None.
        """
        from concurrent.futures import ThreadPoolExecutor

        paths = [str(p) for p in paths]

        def prepare(path: str):
            """(error, rgb, found, (width, height)) of one file; found = [(box, score, crop)]."""
            try:
                if faces_only:
                    face, (width, height) = _read_face(path, self.image_size)
                    return None, None, [((0, 0, width, height), 1.0, face)], (width, height)
                rgb = read_image(path)
                return None, rgb if keep_images else None, self.find_faces(rgb), (rgb.shape[1], rgb.shape[0])
            except DataError as err:
                return str(err), None, None, None

        pending: list[tuple] = []
        queued = 0

        def flush():
            crops = [crop for *_, found, _ in pending if found for _, _, crop in found]
            ages = self.predict_crops(np.stack(crops)) if crops else np.empty(0)
            start = 0
            for path, error, rgb, found, size in pending:
                if error is not None:
                    yield path, None, error, None
                    continue
                faces = self._faces(found, ages[start:start + len(found)])
                start += len(found)
                yield path, ImageResult(size[0], size[1], faces), None, rgb

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
                    yield from flush()
                    pending, queued = [], 0
            yield from flush()


def predict_faces(model: LoadedModel | str | os.PathLike, faces, device=None, batch_size: int = 64,
                  progress: bool = False) -> np.ndarray:
    """Ages (float64 (N,), years) of a face table's images (``fairage.data`` face table, any layout).

    The images are decoded exactly as for training (``fairage.data.load_images`` at the
    model's size, cached in the dataset's cache folder), so a run's model gives its own
    test predictions again.
    """
    from .data import load_images

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
            raise DataError(f"{path} and {labels[label]} would both be labelled {label!r} in the output; "
                            "rename one or give them in separate runs")
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
#: the conformal interval's columns, after ``age``, when the model carries a calibration
INTERVAL_COLUMNS = ("age_lo", "age_hi")


def _face_values(face: FaceResult) -> dict:
    out = {"age": round(face.age, 6)}
    if face.age_lo is not None:
        out.update(age_lo=round(face.age_lo, 6), age_hi=round(face.age_hi, 6))
    return out


def prediction_rows(label: str, result: ImageResult, faces_only: bool) -> list[dict]:
    """CSV rows of one image: ``image,age`` with ``faces_only``, else one row per face
    (``image,face,x,y,w,h,score,age``; a photo without a face: one row, face columns empty);
    ``age_lo,age_hi`` follow ``age`` for a calibrated model."""
    if faces_only:
        return [{"image": label, **_face_values(result.faces[0])}]
    if not result.faces:
        return [{"image": label}]
    return [{"image": label, "face": i, "x": f.box[0], "y": f.box[1], "w": f.box[2], "h": f.box[3],
             "score": round(f.score, 6), **_face_values(f)} for i, f in enumerate(result.faces)]


def write_prediction_csv(path: str | os.PathLike, rows: list[dict], faces_only: bool,
                         intervals: bool = False) -> None:
    """Atomically write prediction rows (``prediction_rows``) as CSV (``intervals``: with
    ``age_lo,age_hi`` columns)."""
    import pandas as pd

    from .atomic import atomic_path

    columns = list(FACES_COLUMNS if faces_only else DETECT_COLUMNS) + (list(INTERVAL_COLUMNS) if intervals else [])
    table = pd.DataFrame(rows, columns=columns)
    if not faces_only:
        for c in ("face", "x", "y", "w", "h"):
            table[c] = table[c].astype("Int64")  # empty for photos without a face, ints otherwise
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def draw_faces(rgb: np.ndarray, result: ImageResult, out: str | os.PathLike) -> None:
    """Save ``rgb`` with each face's box and age (and its interval, ``31 (24-39)``) drawn on it to ``out`` (atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    from .atomic import atomic_path

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
        im.save(tmp, format=None if suffix in (".jpg", ".jpeg", ".png", ".webp", ".bmp") else "PNG",
                **({"quality": 90} if suffix in (".jpg", ".jpeg") else {}))


def annotated_path(annotate_dir: str | os.PathLike, label: str) -> Path:
    """Where the drawn copy of the image labelled ``label`` goes (its label's path under the folder)."""
    rel = Path(label)
    parts = [p for p in rel.parts if p not in ("..", ".", "/", rel.anchor)]
    return Path(annotate_dir).joinpath(*parts) if parts else Path(annotate_dir) / "image.png"
