"""Pseudo-radiographs with exact joint boxes, built from real OAI knee crops.

No full radiograph of the project comes with joint boxes, so the detector learns from
composites: each OAI crop (224x224, centred on the joint space) is scaled to a square
of the composite, its femur and tibia are continued past the crop as narrowing shafts,
the leg gets a soft-tissue silhouette, and the film gets a background, exposure,
noise, markers, sometimes the OAI positioning frame's beads, padding and a small
rotation. The square a crop occupies is its joint box, which is exactly the region
:func:`kneepipe.detect.framing.crop_joint` cuts back out, so a detector trained on
these boxes reproduces the grader's crop framing.

Geometry follows real standing AP/PA films: the patient's right knee lies on the
image's left. A crop may be mirrored, which turns a left knee into a right one
(anatomically), so mirroring swaps its side label; single knees are placed anywhere
so the side is learned from anatomy (the fibula is lateral), not only from position.

>>> from pathlib import Path
>>> crops = Path("../shared/data/oai-kl224/val")
>>> compose_dataset(crops, Path("composites"), count=4, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kneepipe.detect.framing import CROP_SIZE
from kneepipe.files import write_atomic
from kneepipe.joints import SIDES

_CROP_NAME = re.compile(r"^(?P<patient_id>\d+)(?P<side>[LR])$")


@dataclass(frozen=True)
class KneeCrop:
    """One OAI crop on disk with what its path says about it."""

    path: Path
    patient_id: str
    side: str
    kl_grade: int


@dataclass(frozen=True)
class PlacedKnee:
    """A knee as placed on a composite: its patient side, square box and source crop."""

    side: str
    box: tuple[float, float, float, float]
    kl_grade: int
    source: Path


def find_crops(crops_root: Path) -> list[KneeCrop]:
    """List the crops of an OAI-KL224 split folder (``<kl_grade>/<patient><side>.png``).

    Raises:
        FileNotFoundError: when the folder holds no crop named that way.
    """
    crops = []
    for path in sorted(Path(crops_root).glob("[0-4]/*.png")):
        match = _CROP_NAME.match(path.stem)
        if match:
            crops.append(KneeCrop(path, match["patient_id"], match["side"], int(path.parent.name)))
    if not crops:
        raise FileNotFoundError(f"{crops_root}: no crops named <kl_grade>/<patient><L|R>.png")
    return crops


def _read_crop(crop: KneeCrop) -> np.ndarray:
    pixels = cv2.imread(str(crop.path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise OSError(f"{crop.path}: cannot be read as an image")
    return pixels


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _bone_profile(u: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Projected thickness of a long bone across its shaft, 0-1: a cortical shell."""
    outer = np.sqrt(np.clip(1.0 - (u / radius) ** 2, 0, 1))
    inner = np.sqrt(np.clip(0.45 - (u / radius) ** 2, 0, 1))
    return np.clip((outer - 0.75 * inner) / 0.55, 0, 1)


def _render_leg(
    rng: np.random.Generator,
    crop: np.ndarray,
    side: str,
    canvas_shape: tuple[int, int],
    center: tuple[float, float],
    box_side: float,
    max_tilt: float = 7.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one leg around a crop: returns (intensity, coverage) maps of the canvas.

    The crop fills the square ``box_side`` around ``center``. Above and below it the
    femur and the tibia (with the fibula on the lateral side) continue as tapering
    shafts whose brightness is taken from the crop's outer rows; sideways the soft
    tissue falls off like the path length through a cylinder. The leg is tilted by up
    to ``max_tilt`` degrees.
    """
    height, width = canvas_shape
    cx, cy = center
    s = box_side
    scale = CROP_SIZE / s
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    tilt = math.radians(rng.uniform(-max_tilt, max_tilt))
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    dx, dy = xs - cx, ys - cy
    # Leg coordinates in canvas pixels: u across the leg, v along it.
    u = cos_t * dx + sin_t * dy
    v = -sin_t * dx + cos_t * dy
    half = CROP_SIZE / 2.0
    src_x = half + u * scale
    src_y = np.clip(half + v * scale, 0, CROP_SIZE - 1)
    knee = cv2.remap(
        crop.astype(np.float32), src_x, src_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )

    edge_cols = np.concatenate([crop[:, :6].ravel(), crop[:, -6:].ravel()])
    tissue_level = float(np.percentile(edge_cols, rng.uniform(10, 40)))
    femur_level = float(np.percentile(crop[:12, 56:168], 60))
    tibia_level = float(np.percentile(crop[-12:, 56:168], 60))
    above = np.clip((-v - s / 2) / s, 0, None)  # box heights above the box
    below = np.clip((v - s / 2) / s, 0, None)
    radius = s * rng.uniform(0.56, 0.8) * (1.0 + rng.uniform(0.1, 0.5) * _smoothstep(above / 1.5))
    radius = radius * (1.0 - rng.uniform(0.0, 0.15) * _smoothstep(below / 1.5))
    path_length = np.sqrt(np.clip(1.0 - (u / radius) ** 2, 0, 1))
    tissue = tissue_level * (0.55 + 0.45 * path_length)

    femur_start, femur_shaft = s * rng.uniform(0.38, 0.46), s * rng.uniform(0.15, 0.22)
    femur_radius = femur_start - (femur_start - femur_shaft) * _smoothstep(above / rng.uniform(0.3, 0.6))
    tibia_start, tibia_shaft = s * rng.uniform(0.36, 0.44), s * rng.uniform(0.13, 0.19)
    tibia_radius = tibia_start - (tibia_start - tibia_shaft) * _smoothstep(below / rng.uniform(0.25, 0.5))
    lateral = -1.0 if side == "R" else 1.0  # fibula: image left on a right knee (AP view)
    fibula_u = lateral * s * rng.uniform(0.26, 0.34) * (1 - 0.25 * _smoothstep(below / 1.5))
    fibula = _bone_profile(u - fibula_u, np.full_like(u, s * rng.uniform(0.04, 0.07)))
    femur = _bone_profile(u, femur_radius)
    tibia = np.maximum(_bone_profile(u, tibia_radius), 0.8 * fibula)
    shaft_gain = rng.uniform(0.7, 1.0)
    shafts = shaft_gain * np.where(v < 0, femur * (femur_level - tissue_level), tibia * (tibia_level - tissue_level))
    synthetic = tissue + np.clip(shafts, 0, None)

    # Wide blends from the crop's repeated edge pixels into the synthetic leg, so the
    # crop's square outline never shows (it would be a cue that real films lack).
    outside_x = np.clip((np.abs(src_x - half) - half) / (CROP_SIZE * rng.uniform(0.15, 0.35)), 0, 1)
    outside_y = np.clip((np.abs(v) - s / 2) / (s * rng.uniform(0.12, 0.3)), 0, 1)
    in_crop = (1.0 - _smoothstep(outside_x)) * (1.0 - _smoothstep(outside_y))
    intensity = in_crop * knee + (1.0 - in_crop) * synthetic
    edge_softness = rng.uniform(0.02, 0.08)
    coverage = _smoothstep((1.0 - np.abs(u) / radius) / edge_softness)
    coverage = np.maximum(coverage, in_crop)
    return intensity, coverage


def _draw_positioning_frame(rng: np.random.Generator, film: np.ndarray, x: float, s: float):
    """The OAI positioning frame between the knees: a vertical strip with metal beads."""
    height, _ = film.shape
    half_width = s * rng.uniform(0.06, 0.14)
    x0, x1 = int(x - half_width), int(x + half_width)
    strip_value = rng.uniform(10, 90)
    film[:, max(0, x0) : max(0, x1)] = film[:, max(0, x0) : max(0, x1)] * 0.3 + strip_value * 0.7
    spacing = s * rng.uniform(0.12, 0.25)
    radius = max(1, int(s * rng.uniform(0.01, 0.025)))
    columns = [x] if rng.random() < 0.5 else [x - half_width * 0.5, x + half_width * 0.5]
    offset = rng.uniform(0, spacing)
    beads = np.zeros(film.shape, np.uint8)
    for column in columns:
        y = offset
        while y < height:
            if rng.random() < 0.85:
                cv2.circle(beads, (int(column), int(y)), radius, int(rng.uniform(200, 255)), -1)
            y += spacing * rng.uniform(0.8, 1.2)
    np.maximum(film, beads.astype(np.float32), out=film)


def _draw_markers(rng: np.random.Generator, film: np.ndarray, s: float):
    """Burnt-in side markers, labels and arrows as found on clinical films."""
    height, width = film.shape
    ink = np.zeros((height, width), np.uint8)  # OpenCV draws text on 8-bit images only
    for _ in range(rng.integers(1, 4)):
        text = str(rng.choice(["R", "L", "RIGHT", "LEFT", "AP", "PA", "WB", "STANDING", "12"]))
        font_scale = s / 224 * rng.uniform(0.4, 1.2)
        thickness = max(1, int(font_scale * 2))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        x = int(rng.uniform(0, max(1, width - tw)))
        y = int(rng.uniform(th, height))
        if rng.random() < 0.5:
            film[max(0, y - th - 3) : y + 3, max(0, x - 3) : x + tw + 3] = rng.uniform(0, 40)
        cv2.putText(ink, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255, thickness)
    if rng.random() < 0.4:
        size = s * rng.uniform(0.08, 0.18)
        x, y = rng.uniform(size, width - size), rng.uniform(size, height - size)
        points = np.array([[x - size / 2, y + size / 2], [x, y - size / 2], [x + size / 2, y + size / 2]])
        cv2.polylines(ink, [points.astype(np.int32)], False, 250, max(2, int(size / 6)))
    np.maximum(film, ink.astype(np.float32), out=film)


def compose_radiograph(
    rng: np.random.Generator,
    knees: Sequence[tuple[np.ndarray, str, int, Path]],
    long_side: int,
    faithful: bool = False,
    scale_variety: float = 0.0,
    exposure_variety: float = 0.0,
) -> tuple[np.ndarray, list[PlacedKnee]]:
    """Build one pseudo-radiograph from one or two crops.

    The detector's training films vary everything a real film varies: leg tilt, film
    rotation, exposure (contrast, brightness, gamma), blur, noise, markers, the
    positioning frame and a collimator band. A ``faithful`` film keeps the crops'
    pixels inside their boxes as they are (only resampled to the box size): no tilt,
    rotation, exposure change, blur, noise or overlays, and the leg is blended in
    without brightening the crop. It is for measuring what detection and re-cropping
    cost the grader, apart from what film variation costs it.

    Args:
        rng: the random generator (all variety comes from it).
        knees: ``(crop, side, kl_grade, source)`` for each knee; with two knees the
            right knee goes on the image's left, as on a standing AP film. Crops are
            used as given (mirror them beforehand to swap a side).
        long_side: the composite's longer side in pixels.
        faithful: keep the crops' pixels inside their boxes (see above).
        scale_variety: share of films framed beyond the usual bilateral and single-knee
            films (see :func:`_framing_beyond_usual`): knees small on a wide or full-leg
            film, or a single knee filling the frame. At 0 no random number is drawn for
            it, so a seed gives the same films as before the option existed.
        exposure_variety: share of films washed out (gamma 0.3-0.6 instead of 0.6-1.6):
            soft tissue lifted almost to the bone's grey, bones faint, as some systems
            render them. At 0 no random number is drawn for it either.

    Returns:
        The ``uint8`` grayscale composite and its knees with square boxes.
    """
    bilateral = len(knees) == 2
    if bilateral:
        width_factor, height_factor = rng.uniform(2.5, 4.6), rng.uniform(1.7, 4.0)
    else:
        width_factor, height_factor = rng.uniform(1.3, 2.8), rng.uniform(1.7, 4.0)
    if scale_variety > 0 and rng.random() < scale_variety:
        width_factor, height_factor = _framing_beyond_usual(rng, bilateral)
    s = long_side / max(width_factor, height_factor)
    width, height = int(round(s * width_factor)), int(round(s * height_factor))

    if bilateral:
        gap = s * rng.uniform(1.05, 1.7)
        gap = min(gap, width - s * 0.9)
        mid = width / 2 + rng.uniform(-0.5, 0.5) * max(0.0, width - gap - s)
        xs = [mid - gap / 2, mid + gap / 2]
        knees = sorted(knees, key=lambda k: SIDES.index(k[1]))  # R first = image left
    else:
        xs = [rng.uniform(s * 0.55, width - s * 0.55) if width > 1.1 * s else width / 2]
    cy = rng.uniform(0.3, 0.7) * height
    cy = float(np.clip(cy, s * 0.55, height - s * 0.55)) if height > 1.1 * s else height / 2

    background = rng.uniform(0, 90) if rng.random() < 0.85 else rng.uniform(90, 160)
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = rng.uniform(-25, 25) * gx / width + rng.uniform(-25, 25) * gy / height
    film = np.full((height, width), background, np.float32) + gradient

    placed: list[PlacedKnee] = []
    knee_pixels: list[np.ndarray] = []
    for (crop, side, kl_grade, source), x in zip(knees, xs, strict=True):
        y = cy + (rng.uniform(-0.1, 0.1) * s if bilateral else 0.0)
        knee_side = s * rng.uniform(0.93, 1.07) if bilateral else s
        intensity, coverage = _render_leg(
            rng, crop, side, (height, width), (x, y), knee_side, max_tilt=0.0 if faithful else 7.0
        )
        blended = film * (1 - coverage) + intensity * coverage
        film = blended if faithful else np.maximum(film, blended)
        half = knee_side / 2
        placed.append(PlacedKnee(side, (x - half, y - half, x + half, y + half), kl_grade, source))
        if faithful:
            knee_pixels.append(intensity)
    if faithful:  # each crop wins inside its own box, over the other leg's soft tissue
        for knee, intensity in zip(placed, knee_pixels, strict=True):
            x1, y1, x2, y2 = (int(round(v)) for v in knee.box)
            film[max(0, y1) : y2, max(0, x1) : x2] = intensity[max(0, y1) : y2, max(0, x1) : x2]

    if faithful:
        image = np.clip(np.rint(film), 0, 255).astype(np.uint8)
        return _pad(rng, image, placed) if rng.random() < 0.3 else (image, placed)
    if bilateral and rng.random() < 0.35:
        _draw_positioning_frame(rng, film, (xs[0] + xs[1]) / 2, s)
    if rng.random() < 0.25:  # an over-exposed collimator band along one border
        band = int(rng.uniform(0.03, 0.15) * height)
        film[:band] = np.maximum(film[:band], rng.uniform(200, 255))
    if rng.random() < 0.6:
        _draw_markers(rng, film, s)

    # Exposure: contrast, brightness and gamma of the film; then noise and blur.
    film = np.clip(film * rng.uniform(0.8, 1.25) + rng.uniform(-25, 25), 0, 255) / 255.0
    gamma = rng.uniform(0.6, 1.6)
    if exposure_variety > 0 and rng.random() < exposure_variety:  # soft tissue lifted almost to bone
        gamma = rng.uniform(0.3, 0.6)
    film = np.power(film, gamma) * 255.0
    film = cv2.GaussianBlur(film, (0, 0), rng.uniform(0.4, 1.4)) if rng.random() < 0.4 else film
    film = film + rng.normal(0, rng.uniform(0, 7), film.shape)
    image = np.clip(film, 0, 255).astype(np.uint8)

    if rng.random() < 0.4:
        image, placed = _rotate(rng, image, placed)
    if rng.random() < 0.3:
        image, placed = _pad(rng, image, placed)
    return image, placed


def _framing_beyond_usual(rng: np.random.Generator, bilateral: bool) -> tuple[float, float]:
    """Film width and height in knee-box sides for a film framed unlike the usual ones.

    Real films show knees from about a sixth of the film's width (a full-leg film, a
    wide bilateral cassette) to almost all of it (a single knee filling the frame). Half
    of these films are small-knee films: bilateral 4.6-7 box sides wide, single 2.8-6,
    and 3-8 high (hip to ankle). The other half of the single-knee ones fill the frame:
    1.05-1.3 box sides wide and 1.1-1.7 high; a bilateral film cannot fill it and is
    framed small instead.
    """
    if bilateral or rng.random() < 0.5:
        wide = rng.uniform(4.6, 7.0) if bilateral else rng.uniform(2.8, 6.0)
        return wide, rng.uniform(3.0, 8.0)
    return rng.uniform(1.05, 1.3), rng.uniform(1.1, 1.7)


def _rotate(rng, image, placed):
    """Rotate the whole film a few degrees; boxes keep their size, centres move with it."""
    height, width = image.shape
    angle = rng.uniform(-8, 8)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    border = cv2.BORDER_REPLICATE if rng.random() < 0.5 else cv2.BORDER_CONSTANT
    rotated = cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=border,
        borderValue=int(rng.uniform(0, 255)),
    )
    moved = []
    for knee in placed:
        x1, y1, x2, y2 = knee.box
        cx, cy = matrix @ np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1.0])
        half = (x2 - x1) / 2
        moved.append(PlacedKnee(knee.side, (cx - half, cy - half, cx + half, cy + half), knee.kl_grade, knee.source))
    return rotated, moved


def _pad(rng, image, placed):
    """Uniform padding on some borders, as scanners and exports add."""
    height, width = image.shape
    top, bottom, left, right = (
        int(rng.uniform(0, 0.15) * (height if i < 2 else width)) if rng.random() < 0.5 else 0 for i in range(4)
    )
    value = int(rng.choice([0, 255, int(rng.uniform(0, 255))]))
    padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    moved = [
        PlacedKnee(k.side, (k.box[0] + left, k.box[1] + top, k.box[2] + left, k.box[3] + top), k.kl_grade, k.source)
        for k in placed
    ]
    return padded, moved


def _pairs(crops: Sequence[KneeCrop]) -> tuple[list[tuple[KneeCrop, KneeCrop]], list[KneeCrop]]:
    by_patient: dict[str, dict[str, KneeCrop]] = {}
    for crop in crops:
        by_patient.setdefault(crop.patient_id, {})[crop.side] = crop
    pairs = [(knees["R"], knees["L"]) for knees in by_patient.values() if len(knees) == 2]
    return pairs, list(crops)


def yolo_label_lines(placed: Sequence[PlacedKnee], image_size: tuple[int, int]) -> list[str]:
    """YOLO label lines (``class cx cy w h``, normalised) for the knees of one image.

    Boxes are clipped to the image, as the detector will see them.
    """
    width, height = image_size
    lines = []
    for knee in placed:
        x1, y1, x2, y2 = knee.box
        x1, x2 = max(0.0, x1), min(float(width), x2)
        y1, y2 = max(0.0, y1), min(float(height), y2)
        if x2 - x1 < 4 or y2 - y1 < 4:
            continue
        lines.append(
            f"{SIDES.index(knee.side)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}"
        )
    return lines


def compose_dataset(
    crops_root: Path,
    out_dir: Path,
    count: int,
    seed: int = 0,
    bilateral_fraction: float = 0.65,
    long_side: tuple[int, int] = (512, 768),
    scale_variety: float = 0.0,
    exposure_variety: float = 0.0,
    images_subdir: str = "images",
    labels_subdir: str = "labels",
) -> Path:
    """Write ``count`` labelled composites of the crops under ``crops_root``.

    Writes ``out_dir/images/composite_XXXXX.jpg``, a YOLO label file per image in
    ``out_dir/labels/`` and ``out_dir/labels.csv`` with one row per knee
    (``image,side,kl_grade`` then the box ``x1,y1,x2,y2`` in image pixels and the
    source crop), so the composites can test the detector and the whole pipeline.

    Args:
        crops_root: an OAI-KL224 split folder (``<kl_grade>/<patient><side>.png``).
        out_dir: where to write (created).
        count: number of composites.
        seed: seed of the random generator; the same seed gives the same composites.
        bilateral_fraction: share of composites showing a patient's two knees (where
            both crops exist); the rest show one knee.
        long_side: range of the composites' longer side in pixels.
        scale_variety: share of composites framed beyond the usual (small knees on wide
            or full-leg films, single knees filling the frame); see
            :func:`compose_radiograph`.
        exposure_variety: share of washed-out composites (see :func:`compose_radiograph`).

    Returns:
        The path of ``labels.csv``.
    """
    rng = np.random.default_rng(seed)
    crops = find_crops(crops_root)
    pairs, singles = _pairs(crops)
    images_dir, labels_dir = Path(out_dir) / images_subdir, Path(out_dir) / labels_subdir
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        mirror = rng.random() < 0.5
        chosen: tuple[KneeCrop, ...]
        if pairs and rng.random() < bilateral_fraction:
            chosen = pairs[rng.integers(len(pairs))]
        else:
            chosen = (singles[rng.integers(len(singles))],)
        knees = []
        for crop in chosen:
            pixels = _read_crop(crop)
            side = crop.side
            if mirror:  # a mirrored left knee is anatomically a right knee
                pixels, side = pixels[:, ::-1].copy(), "L" if side == "R" else "R"
            knees.append((pixels, side, crop.kl_grade, crop.path))
        size = int(rng.integers(long_side[0], long_side[1] + 1))
        image, placed = compose_radiograph(
            rng, knees, size, scale_variety=scale_variety, exposure_variety=exposure_variety
        )
        name = f"composite_{index:05d}.jpg"
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 97))])
        if not ok:
            raise OSError(f"cannot encode composite {name}")
        write_atomic(images_dir / name, encoded.tobytes())
        lines = yolo_label_lines(placed, (image.shape[1], image.shape[0]))
        write_atomic(labels_dir / f"{Path(name).stem}.txt", ("\n".join(lines) + "\n").encode())
        for knee in placed:
            rows.append([name, knee.side, knee.kl_grade, *(f"{v:.1f}" for v in knee.box), knee.source.name])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["image", "side", "kl_grade", "x1", "y1", "x2", "y2", "source_crop"])
    writer.writerows(rows)
    return write_atomic(Path(out_dir) / "labels.csv", buffer.getvalue())
