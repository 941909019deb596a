"""Does the detector find knees at any scale and placement? Recall on transformed real films.

Takes the real AP films of ``../shared/data/radiographs`` (nine bilateral, two single
knees) as given (each knee found, and on its side) and builds, in memory only, films the
detector never saw:

* ``scale 20%`` ... ``scale 90%``: a single-knee film cut around each reference knee so
  that the knee's box spans that share of the film's width (portrait, 1.3 times as high
  as wide, the knee placed off centre by a seeded random shift; where the cut reaches
  past the film, it is padded with the film's own border grey), resized to 1200 px wide;
* ``tilt -20`` ... ``tilt +20``: each whole film rotated about its centre on an enlarged
  canvas;
* ``rotated 90`` / ``rotated 270``: each whole film turned by a quarter turn;
* ``full leg 2x`` ... ``full leg 4x``: each whole film made that many times as tall, as a
  full-leg film (hip to ankle) shows the knees: the rows above the highest knee box and
  below the lowest are stretched along the legs (femur and tibia run on), the knees' rows
  are kept as they are.

The reference boxes (``benchmarks/data/detect_reference_boxes.csv``: the shipped
detector's boxes on the original films, checked by eye against the hand annotations
of ``tests/data/radiograph_annotations.csv``), or with ``--truth annotations`` those hand
annotations themselves, are carried over exactly through each transform. A quarter turn
and a cut-and-resize keep a box axis-aligned; under a tilt the reference is the square
of the same side centred on the rotated centre (the detector boxes the tilted knee
upright); a full-leg film moves each box down by the stretch above it. A knee counts as
found when a box of the film has IoU >= 0.5 with it. Every reference knee inside a
transformed film counts (a cut from a bilateral film can hold the other knee too).

    python benchmarks/detect_scales.py              # recall per transform
    python benchmarks/detect_scales.py --truth annotations --films stage_2_2.jpg,bilateral_0.png  # held-out films
    python benchmarks/detect_scales.py --reference  # rewrite the reference CSV from the detector
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RADIOGRAPHS = ROOT / ".." / "shared" / "data" / "radiographs"
REFERENCE = ROOT / "benchmarks" / "data" / "detect_reference_boxes.csv"
ANNOTATIONS = ROOT / "tests" / "data" / "radiograph_annotations.csv"
AP_FILMS = (
    "arthritis_2.jpg",
    "arthritis_5.jpg",
    "arthritis_7.jpg",
    "bilateral_0.png",
    "stage_1_0.jpg",
    "stage_1_1.jpg",
    "stage_1_3.jpg",
    "stage_1_4.jpg",
    "stage_2_0.jpg",
    "stage_2_2.jpg",
    "stage_2_7.jpg",
)
AS_GIVEN = "as given"
SCALES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TILTS = (-20, -10, 10, 20)
LEG_LENGTHS = (2, 3, 4)  # full-leg films: this many times as tall as the film
FILM_WIDTH = 1200  # the width a cut film is resized to (a typical single-knee film)
ASPECT = 1.3  # height / width of a cut film (single-knee AP films are portrait)

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``x1, y1, x2, y2`` boxes.

    >>> iou((0, 0, 10, 10), (5, 0, 15, 10))
    0.3333333333333333
    """
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def read_reference(path: Path = REFERENCE) -> dict[str, list[tuple[str, Box]]]:
    """The reference knees per film: ``{image: [(side, box), ...]}``.

    ``path`` is the reference CSV or the hand annotations (:data:`ANNOTATIONS`), whose rows without
    a box (lateral, foot and badly exposed films) are left out.
    """
    knees: dict[str, list[tuple[str, Box]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            if not row["x1"]:
                continue
            box = (float(row["x1"]), float(row["y1"]), float(row["x2"]), float(row["y2"]))
            knees[row["image"]].append((row["side"], box))
    return knees


def border_grey(pixels: np.ndarray) -> int:
    """The median grey of a film's outer frame (5% of each side): what lies beyond its edge."""
    height, width = pixels.shape
    band_y, band_x = max(1, height // 20), max(1, width // 20)
    frame = np.concatenate(
        [
            pixels[:band_y].ravel(),
            pixels[-band_y:].ravel(),
            pixels[:, :band_x].ravel(),
            pixels[:, -band_x:].ravel(),
        ]
    )
    return int(np.median(frame))


def cut_film(pixels: np.ndarray, knees: list[Box], target: Box, share: float, rng: np.random.Generator):
    """A single-knee film in which ``target`` spans ``share`` of the width, and its knees' boxes.

    Returns the film and the carried-over boxes of every knee lying wholly inside it.
    """
    box_width = target[2] - target[0]
    width = box_width / share
    height = width * ASPECT
    cx, cy = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    # Place the knee off centre, keeping its whole box inside the cut.
    slack_x = max(0.0, (width - box_width) / 2)
    slack_y = max(0.0, (height - (target[3] - target[1])) / 2)
    x0 = cx - width / 2 + rng.uniform(-0.8, 0.8) * slack_x
    y0 = cy - height / 2 + rng.uniform(-0.5, 0.5) * slack_y
    zoom = FILM_WIDTH / width
    # One affine warp cuts, pads with the border grey and resizes, so boxes map exactly.
    matrix = np.array([[zoom, 0, -x0 * zoom], [0, zoom, -y0 * zoom]], np.float64)
    size = (FILM_WIDTH, round(height * zoom))
    film = cv2.warpAffine(
        pixels,
        matrix,
        size,
        flags=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border_grey(pixels),
    )
    boxes = []
    for knee in knees:
        mapped = ((knee[0] - x0) * zoom, (knee[1] - y0) * zoom, (knee[2] - x0) * zoom, (knee[3] - y0) * zoom)
        if mapped[0] >= 0 and mapped[1] >= 0 and mapped[2] <= size[0] and mapped[3] <= size[1]:
            boxes.append(mapped)
    return film, boxes


def tilt_film(pixels: np.ndarray, knees: list[Box], degrees: float):
    """The film rotated by ``degrees`` (counter-clockwise) on a canvas holding all of it."""
    height, width = pixels.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_width, new_height = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += new_width / 2 - width / 2
    matrix[1, 2] += new_height / 2 - height / 2
    film = cv2.warpAffine(
        pixels, matrix, (new_width, new_height), borderMode=cv2.BORDER_CONSTANT, borderValue=border_grey(pixels)
    )
    boxes = []
    for knee in knees:
        cx, cy = (knee[0] + knee[2]) / 2, (knee[1] + knee[3]) / 2
        nx, ny = matrix @ np.array([cx, cy, 1.0])
        half = (knee[2] - knee[0]) / 2
        boxes.append((nx - half, ny - half, nx + half, ny + half))
    return film, boxes


def turn_film(pixels: np.ndarray, knees: list[Box], quarter_turns: int):
    """The film turned by 90 degrees clockwise ``quarter_turns`` times (1 or 3)."""
    height, width = pixels.shape
    if quarter_turns == 1:
        film = cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
        boxes = [(height - k[3], k[0], height - k[1], k[2]) for k in knees]
    else:
        film = cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
        boxes = [(k[1], width - k[2], k[3], width - k[0]) for k in knees]
    return film, boxes


def full_leg_film(pixels: np.ndarray, knees: list[Box], factor: float):
    """The film ``factor`` times as tall: the rows above and below the knees stretched along the legs."""
    height, width = pixels.shape
    top, bottom = int(min(k[1] for k in knees)), int(max(k[3] for k in knees))
    extra = (factor - 1) * height
    share = top / max(1, top + height - bottom)  # the stretch is shared as the rows are
    new_top, new_bottom = top + int(extra * share), height - bottom + int(extra * (1 - share))
    parts = [cv2.resize(pixels[:top], (width, new_top))] if top else []
    parts.append(pixels[top:bottom])
    if bottom < height:
        parts.append(cv2.resize(pixels[bottom:], (width, new_bottom)))
    shift = new_top - top if top else 0
    return np.vstack(parts), [(k[0], k[1] + shift, k[2], k[3] + shift) for k in knees]


def transformed_films(radiographs: dict[str, np.ndarray], reference: dict[str, list[tuple[str, Box]]], seed: int = 0):
    """Yield ``(transform, film name, pixels, reference boxes)`` for every transform of every film."""
    rng = np.random.default_rng(seed)
    for name in AP_FILMS:
        pixels = radiographs[name]
        knees = [box for _, box in reference[name]]
        yield AS_GIVEN, name, pixels, knees
        for share in SCALES:
            for index, target in enumerate(knees):
                film, boxes = cut_film(pixels, knees, target, share, rng)
                yield f"scale {share:.0%}", f"{name}#{index}", film, boxes
        for degrees in TILTS:
            film, boxes = tilt_film(pixels, knees, degrees)
            yield f"tilt {degrees:+d}", name, film, boxes
        for turns in (1, 3):
            film, boxes = turn_film(pixels, knees, turns)
            yield f"rotated {turns * 90}", name, film, boxes
        for factor in LEG_LENGTHS:
            film, boxes = full_leg_film(pixels, knees, factor)
            yield f"full leg {factor}x", name, film, boxes


def load_films() -> dict[str, np.ndarray]:
    """The AP films at full resolution (the reference boxes are in source pixels)."""
    from kneepipe.imaging import read_radiograph

    return {name: read_radiograph(RADIOGRAPHS / name, max_side=16384).pixels for name in AP_FILMS}


def write_reference(detector) -> None:
    """Write the detector's boxes on the original films (read as ``kneepipe detect`` reads them)."""
    from kneepipe.imaging import read_radiograph

    rows = []
    for name in AP_FILMS:
        radiograph = read_radiograph(RADIOGRAPHS / name, max_side=detector.config.max_side)
        detection = detector.detect([radiograph])[0]
        for joint in detection.joints:
            rows.append([name, joint.side, *(f"{v:.1f}" for v in joint.box), f"{joint.confidence:.4f}"])
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    with REFERENCE.open("w", newline="") as handle:
        handle.write(
            "# Reference knee boxes of the AP films of ../shared/data/radiographs (source pixels, x1,y1,x2,y2):\n"
            "# the shipped detector's boxes on the original films, checked by eye against the hand\n"
            "# annotations in tests/data/radiograph_annotations.csv. Written by\n"
            "# `python benchmarks/detect_scales.py --reference`; read by the same benchmark and tests.\n"
        )
        writer = csv.writer(handle)
        writer.writerow(["image", "side", "x1", "y1", "x2", "y2", "confidence"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} reference knees to {REFERENCE}")


def main() -> None:
    parser = argparse.ArgumentParser(description="detector recall on zoomed, cut, tilted and turned real films")
    parser.add_argument("--reference", action="store_true", help="rewrite the reference boxes from the detector")
    parser.add_argument("--seed", type=int, default=0, help="seed of the knees' placement in cut films")
    parser.add_argument("--threshold", type=float, default=0.5, help="IoU at which a knee counts as found")
    parser.add_argument(
        "--truth",
        choices=("reference", "annotations"),
        default="reference",
        help="the boxes carried over: the reference CSV (the shipped detector's boxes, checked by eye) or the "
        "hand annotations (a detector trained on copies of the films learns their framing)",
    )
    parser.add_argument(
        "--films",
        type=lambda text: tuple(text.split(",")),
        default=(),
        help="only these films, comma-separated (e.g. the held-out fold of a detector trained on copies of the "
        "others); the others' cuts are still drawn, so each film's cuts are the same as in a full run",
    )
    parser.add_argument("overrides", nargs="*", help="detect config overrides, key=value")
    args = parser.parse_args()
    unknown = sorted(set(args.films) - set(AP_FILMS))
    if unknown:
        parser.error(f"--films: not among the AP films: {', '.join(unknown)}")

    from kneepipe.config import load_config, parse_overrides
    from kneepipe.detect.config import DetectConfig
    from kneepipe.detect.predict import JointDetector
    from kneepipe.imaging import Radiograph

    config = load_config(DetectConfig, overrides=parse_overrides(args.overrides))
    detector = JointDetector.load(config)
    if args.reference:
        write_reference(detector)
        return
    films = load_films()

    reference = read_reference(ANNOTATIONS if args.truth == "annotations" else REFERENCE)
    found: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    misses: dict[str, list[str]] = defaultdict(list)
    wrong_side: dict[str, int] = defaultdict(int)
    for transform, name, film, boxes in transformed_films(films, reference, args.seed):
        if args.films and name.split("#")[0] not in args.films:
            continue
        height, width = film.shape
        radiograph = Radiograph(film, Path(name), (width, height))
        tick = time.perf_counter()
        detection = detector.detect([radiograph])[0]
        seconds[transform] += time.perf_counter() - tick
        count[transform] += 1
        statuses[transform][detection.status] += 1
        for index, box in enumerate(boxes):
            total[transform] += 1
            best, joint = max(((iou(box, j.box), j) for j in detection.joints), default=(0.0, None), key=lambda m: m[0])
            if best >= args.threshold:
                found[transform] += 1
                # Films as given keep the reference's knees in order, so each has its reference side.
                if transform == AS_GIVEN and joint is not None and joint.side != reference[name][index][0]:
                    wrong_side[transform] += 1
            else:
                misses[transform].append(f"{name} (IoU {best:.2f})")

    print(f"recall at IoU >= {args.threshold} against the {args.truth} ({detector.version}, seed {args.seed})")
    print(f"{'transform':<12} {'films':>5} {'knees':>5} {'found':>5} {'recall':>7} {'s/film':>7}  statuses")
    for transform in total:
        recall = found[transform] / total[transform]
        status_text = ", ".join(f"{k} {v}" for k, v in sorted(statuses[transform].items()))
        print(
            f"{transform:<12} {count[transform]:>5} {total[transform]:>5} {found[transform]:>5} {recall:>7.3f} "
            f"{seconds[transform] / count[transform]:>7.2f}  {status_text}"
        )
    for transform, names in misses.items():
        print(f"missed at {transform}: {', '.join(names)}")
    print(f"films as given: {wrong_side[AS_GIVEN]} of {found[AS_GIVEN]} knees found on the wrong side")


if __name__ == "__main__":
    main()
