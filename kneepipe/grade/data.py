"""KL-graded crops in memory: discovery, decoding and resizing.

A labelled crop folder has the layout ``<root>/<kl_grade>/<crop file>`` (the layout of
OAI-KL224's ``train`` and ``val``). The crops are decoded once and kept as ``uint8``;
each training phase resizes them once to its input size.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kneepipe import KL_GRADES
from kneepipe.imaging import find_images, read_radiograph


@dataclass(frozen=True)
class CropSet:
    """Decoded crops with their true grades (``-1`` where unknown)."""

    paths: tuple[Path, ...]
    crops: np.ndarray  # (n, size, size) uint8
    kl_grades: np.ndarray  # (n,) int


def labelled_files(root: str | Path) -> tuple[list[Path], list[int]]:
    """Crop files under ``root/<grade>/`` with their grade; empty when the layout is absent."""
    root = Path(root)
    paths: list[Path] = []
    grades: list[int] = []
    for grade in KL_GRADES:
        folder = root / str(grade)
        if folder.is_dir():
            found = find_images(folder)
            paths += found
            grades += [grade] * len(found)
    return paths, grades


def grade_from_path(path: Path, root: Path) -> int:
    """The true grade of a crop when its first folder below ``root`` is named 0-4, else -1."""
    try:
        first = path.relative_to(root).parts[0]
    except (ValueError, IndexError):
        return -1
    return int(first) if first in {str(g) for g in KL_GRADES} and path.parent != root else -1


def split_files(split_csv: str | Path, part: str) -> tuple[list[Path], list[int]]:
    """Files of one part of a ``kneepipe split`` CSV (columns ``file,part,kl_grade``)."""
    with open(split_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["part"] == part]
    return [Path(row["file"]) for row in rows], [int(row["kl_grade"]) for row in rows]


def load_crops(paths: Sequence[Path], grades: Sequence[int], size: int = 224) -> CropSet:
    """Decode crops to ``(n, size, size)`` uint8 (resized by the ``area`` rule when needed)."""
    crops = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        crops[i] = fit_crop(read_radiograph(path).pixels, size)
    return CropSet(tuple(Path(p) for p in paths), crops, np.asarray(grades, dtype=int))


def fit_crop(pixels: np.ndarray, size: int, rule: str = "area") -> np.ndarray:
    """A 2-D crop resized to ``size`` x ``size`` by a grader's ``resize_interpolation`` rule.

    ``area`` is OpenCV's advice and what the OAI crops were fitted with: area averaging to
    shrink, linear interpolation to enlarge (area averaging cannot enlarge). ``linear`` and
    ``cubic`` use that interpolation both ways.

    >>> fit_crop(np.zeros((300, 162), np.uint8), 224).shape
    (224, 224)
    """
    if pixels.shape == (size, size):
        return pixels
    if rule == "area":
        shrinking = pixels.shape[0] >= size and pixels.shape[1] >= size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    elif rule in _INTERPOLATIONS:
        interpolation = _INTERPOLATIONS[rule]
    else:
        raise ValueError(f"unknown resize rule {rule!r} (area, linear or cubic)")
    return cv2.resize(pixels, (size, size), interpolation=interpolation)


_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def resize_all(crops: np.ndarray, size: int, rule: str = "area") -> np.ndarray:
    """Resize a stack of 2-D crops to ``size`` with :func:`fit_crop`."""
    if crops.shape[1:] == (size, size):
        return crops
    if not len(crops):
        return np.empty((0, size, size), np.uint8)
    return np.stack([fit_crop(c, size, rule) for c in crops])


def network_input(crops: np.ndarray, channels: int = 3) -> np.ndarray:
    """``(n, h, w)`` uint8 -> ``(n, h, w, channels)`` float32 in 0-255 (the network rescales)."""
    x = crops.astype(np.float32)[..., None]
    return np.repeat(x, channels, axis=-1) if channels > 1 else x


def class_weights(grades: np.ndarray, scheme: str) -> np.ndarray:
    """Per-grade loss weights (mean weight over the training crops = 1)."""
    counts = np.bincount(grades, minlength=len(KL_GRADES)).astype(float)
    freq = counts / counts.sum()
    if scheme == "none":
        weights = np.ones(len(KL_GRADES))
    elif scheme == "sqrt_inverse":
        weights = 1.0 / np.sqrt(np.maximum(freq, 1e-6))
    else:
        weights = 1.0 / np.maximum(freq, 1e-6)
    return weights / (weights[grades].mean())
