"""Offline replication augmentation (the course kit's Task 1): extra transformed copies of older faces.

``replicate_faces`` is a pure function (arrays in, arrays out, OpenCV for the pixel work):
every face aged ``min_age`` or more gets four extra copies, one per transform of the kit:

1. horizontal flip;
2. brightness x 0.5 (the V channel of HSV halved);
3. 5x5 Gaussian blur, sigma 1 pixel;
4. a shift by a whole number of pixels drawn uniformly in [-m, m] on each axis, with
   m = round(25 / 224 x side) (25 px on the kit's 224 px faces); the uncovered border is black.

With the kit's 4065 training faces and ``min_age=60`` this gives 4657 faces. Random draws
(the shifts) come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import cv2
import numpy as np

#: copies added per replicated face (flip, darker, blurred, shifted)
COPIES = 4
#: the kit's shift at its 224 px faces, as a fraction of the side
MAX_SHIFT_FRACTION = 25 / 224


def _darker(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.round(hsv[..., 2] * 0.5).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    h, w = image.shape[:2]
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(
        image, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )


def replicate_faces(
    images: np.ndarray, ages: np.ndarray, min_age: float | None = 60.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Append 4 transformed copies of each face aged ``min_age`` or more (None: every face).

    Parameters
    ----------
    images : uint8 (N, S, S, 3) RGB faces (may be a read-only memmap).
    ages : (N,) ages in years.

    Returns
    -------
    (images_out, source): images_out is uint8 (N + 4 K, S, S, 3), the N originals first, then
    for each of the K chosen faces (in order) its flipped, darker, blurred and shifted copies;
    source (N + 4 K,) int64 gives each output row's input row (to repeat labels and attributes).
    """
    images = np.asarray(images)
    ages = np.asarray(ages, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    if len(ages) != len(images):
        raise ValueError(f"{len(images)} images but {len(ages)} ages")
    chosen = np.flatnonzero(ages >= min_age) if min_age is not None else np.arange(len(images))
    rng = np.random.default_rng(seed)
    side = images.shape[1]
    max_shift = int(round(MAX_SHIFT_FRACTION * side))
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(chosen), 2))
    out = np.empty((len(images) + COPIES * len(chosen), *images.shape[1:]), np.uint8)
    out[: len(images)] = images
    row = len(images)
    for i, (dx, dy) in zip(chosen, shifts):
        face = np.ascontiguousarray(images[i])
        out[row] = face[:, ::-1]
        out[row + 1] = _darker(face)
        out[row + 2] = cv2.GaussianBlur(face, (5, 5), sigmaX=1.0, sigmaY=1.0)
        out[row + 3] = _shifted(face, int(dx), int(dy))
        row += COPIES
    source = np.concatenate([np.arange(len(images)), np.repeat(chosen, COPIES)]).astype(np.int64)
    return out, source
