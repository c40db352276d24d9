"""Datasets: loaders for every layout, the decoded-image cache and the synthetic benchmark.

``load_faces(root)`` reads a dataset folder into the face table (``schema``),
``load_images(faces, size)`` serves its pixels as a cached uint8 RGB memmap and
``write_synthetic(out)`` writes the built-in synthetic benchmark (APPA-REAL layout).
"""

from .cache import load_images
from .loaders import LAYOUTS, detect_layout, load_faces, stratified_split
from .synthetic import render_face, sample_face_params, write_synthetic

__all__ = [
    "LAYOUTS",
    "detect_layout",
    "load_faces",
    "load_images",
    "render_face",
    "sample_face_params",
    "stratified_split",
    "write_synthetic",
]
