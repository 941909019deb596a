"""Zoomed, cut, tilted and mirrored copies of annotated real films, as detector training images.

The composites teach the detector knees at the scale of bilateral AP films. Real films show
them from a sixth of the film's width (full-leg films) to all of it (a single knee filling
the frame), tilted, and on X-ray systems the compositor does not imitate. A handful of real
films with hand-drawn joint boxes goes a long way once each is shown many ways; so do lateral
views and foot films, as backgrounds at the same scales (a detector shown knee bones at every
zoom and never a zoomed foot learns to box feet):

* cut around one of its knees so that the knee's box spans 15-90% of the cut's width
  (log-uniform; a quarter of the copies keep the whole film instead), the cut 0.7-1.6 times
  as high as wide, the knee placed off centre, padded with the film's own border grey where
  the cut reaches past it (a lateral or foot film, with no knee to cut around, is cut anywhere,
  35-100% of its width);
* tilted by up to 20 degrees either way (a third of the copies); each box keeps its side and
  moves with its centre, as the detector boxes a tilted knee upright;
* mirrored (half of the copies), which makes a right knee a left one anatomically, so the side
  labels swap;
* a gamma of 0.7-1.4.

One affine warp does the cut, tilt and resize, so the boxes carry over exactly. A knee counts when
at least 60% of its box lies inside a copy; a window that cuts a knee by more is drawn again, so no
copy shows part of a knee the labels leave out.

>>> films = annotated_films(Path("annotations.csv"), Path("radiographs"))  # doctest: +SKIP
>>> image, knees = film_copy(films[0].pixels(), films[0].knees, np.random.default_rng(0))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kneepipe.detect.evaluate import read_annotations
from kneepipe.detect.quality import border_grey
from kneepipe.files import write_atomic
from kneepipe.imaging import read_radiograph
from kneepipe.training.compose import PlacedKnee, yolo_label_lines

Box = tuple[float, float, float, float]

POSITIVE_KINDS = ("bilateral", "single")
"""Annotated radiograph kinds whose joint boxes are training positives."""
NEGATIVE_KINDS = ("lateral", "foot")
"""Annotated radiograph kinds with no gradable knee: their copies are background (no-knee) images."""
BACKGROUND_SHARE = (0.35, 1.0)
"""A background copy's window: this share of the film's width."""
COPY_LONG_SIDE = 768
"""Longer side of each written copy (Ultralytics resizes it to the training size)."""
SHARE_RANGE = (0.15, 0.9)
WHOLE_FILM = 0.25
TILT_SHARE, MAX_TILT = 1 / 3, 20.0
ASPECT_RANGE = (0.7, 1.6)
GAMMA_RANGE = (0.7, 1.4)
VISIBLE = 0.6
"""A knee's box must lie at least this much inside a copy to be labelled (:func:`film_copy` redraws a window that
cuts one by more)."""


@dataclass(frozen=True)
class AnnotatedFilm:
    """A real radiograph and its hand-drawn joint boxes (patient side, box in source pixels)."""

    path: Path
    knees: tuple[tuple[str, Box], ...]

    def pixels(self) -> np.ndarray:
        return read_radiograph(self.path).pixels


def annotated_films(
    annotations: Path, radiographs: Path, exclude: tuple[str, ...] = (), kinds: tuple[str, ...] = POSITIVE_KINDS
) -> list[AnnotatedFilm]:
    """The films of an annotation CSV of these ``kinds``, with their joint boxes, less ``exclude``.

    The CSV is read by :func:`~kneepipe.detect.evaluate.read_annotations` (lateral and foot films
    come with no knees). A name in ``exclude`` that the CSV does not list among them is an error,
    so a typo cannot silently leave a film in a cross-validation fold it should be out of.
    """
    knees = {name: entry["joints"] for name, entry in read_annotations(annotations).items() if entry["kind"] in kinds}
    unknown = sorted(set(exclude) - set(knees))
    if unknown:
        raise ValueError(
            f"{annotations}: no annotated {'/'.join(kinds)} film named {', '.join(unknown)} (real_exclude)"
        )
    return [
        AnnotatedFilm(radiographs / name, tuple(boxes)) for name, boxes in sorted(knees.items()) if name not in exclude
    ]


def _window(knees: tuple[tuple[str, Box], ...], shape: tuple[int, int], rng: np.random.Generator):
    """The copy's window on the film: centre, width and height in source pixels."""
    height, width = shape
    if rng.random() < WHOLE_FILM:
        return width / 2, height / 2, float(width), float(height)
    if not knees:  # a background film: any part of it
        cut_w = width * rng.uniform(*BACKGROUND_SHARE)
        cut_h = min(float(height), cut_w * rng.uniform(*ASPECT_RANGE))
        return rng.uniform(cut_w / 2, width - cut_w / 2), rng.uniform(cut_h / 2, height - cut_h / 2), cut_w, cut_h
    _, box = knees[int(rng.integers(len(knees)))]
    side = box[2] - box[0]
    share = math.exp(rng.uniform(math.log(SHARE_RANGE[0]), math.log(SHARE_RANGE[1])))
    cut_w = side / share
    cut_h = cut_w * rng.uniform(*ASPECT_RANGE)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    slack_x, slack_y = max(0.0, (cut_w - side) / 2), max(0.0, (cut_h - side) / 2)
    return cx + rng.uniform(-0.8, 0.8) * slack_x, cy + rng.uniform(-0.8, 0.8) * slack_y, cut_w, cut_h


def _placed(
    knees: tuple[tuple[str, Box], ...], matrix: np.ndarray, zoom: float, size: tuple[int, int]
) -> tuple[list[tuple[str, Box]], list[Box]]:
    """The knees lying at least :data:`VISIBLE` inside a copy, and the boxes of those cut by its edge."""
    placed, cut = [], []
    for side, box in knees:
        cx, cy = matrix @ np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0])
        half = (box[2] - box[0]) * zoom / 2
        moved = (cx - half, cy - half, cx + half, cy + half)
        inside_w = max(0.0, min(moved[2], size[0]) - max(moved[0], 0.0))
        inside_h = max(0.0, min(moved[3], size[1]) - max(moved[1], 0.0))
        if inside_w * inside_h >= VISIBLE * (2 * half) ** 2:
            placed.append((side, moved))
        elif inside_w > 0 and inside_h > 0:
            cut.append(moved)
    return placed, cut


def film_copy(
    pixels: np.ndarray, knees: tuple[tuple[str, Box], ...], rng: np.random.Generator, tries: int = 20
) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """One varied copy of a film (module docstring) and its knees' sides and boxes in the copy's pixels.

    Windows that cut a knee by their edge are drawn again, up to ``tries`` times; a knee still cut
    in the last one is greyed out.
    """
    for _ in range(tries):
        centre_x, centre_y, cut_w, cut_h = _window(knees, pixels.shape, rng)
        zoom = COPY_LONG_SIDE / max(cut_w, cut_h)
        size = (max(32, round(cut_w * zoom)), max(32, round(cut_h * zoom)))
        tilt = rng.uniform(-MAX_TILT, MAX_TILT) if rng.random() < TILT_SHARE else 0.0
        # Source -> copy: move the window's centre to the copy's centre, scale, tilt about it.
        matrix = cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), tilt, 1.0) @ np.array(
            [[zoom, 0, size[0] / 2 - centre_x * zoom], [0, zoom, size[1] / 2 - centre_y * zoom], [0, 0, 1]]
        )
        placed, cut = _placed(knees, matrix, zoom, size)
        if not cut:
            break
    grey = border_grey(pixels)
    image = cv2.warpAffine(
        pixels,
        matrix,
        size,
        flags=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=grey,
    )
    for box in cut:
        x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
        image[y1 : int(math.ceil(box[3])), x1 : int(math.ceil(box[2]))] = grey
    if rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
        placed = [("L" if s == "R" else "R", (size[0] - b[2], b[1], size[0] - b[0], b[3])) for s, b in placed]
    gamma = rng.uniform(*GAMMA_RANGE)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut), placed


def write_film_copies(films: list[AnnotatedFilm], out_dir: Path, copies: int, rng: np.random.Generator) -> int:
    """Write ``copies`` varied copies of each film and their YOLO labels into ``out_dir/{images,labels}/train``."""
    images_dir, labels_dir = out_dir / "images" / "train", out_dir / "labels" / "train"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for film in films:
        pixels = film.pixels()
        for copy in range(copies):
            image, placed = film_copy(pixels, film.knees, rng)
            name = f"real_{film.path.stem}_{copy:03d}"
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise OSError(f"cannot encode {name} from {film.path}")
            write_atomic(images_dir / f"{name}.jpg", encoded.tobytes())
            knees = [PlacedKnee(side, box, -1, film.path) for side, box in placed]
            lines = yolo_label_lines(knees, (image.shape[1], image.shape[0]))
            write_atomic(labels_dir / f"{name}.txt", "".join(f"{line}\n" for line in lines).encode())
            written += 1
    return written
