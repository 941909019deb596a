"""A second look at each joint box, measured: the knee detected again on a view around its box.

The shipped detector's squares come back too large on films rendered unlike its training
composites (``benchmarks/second_rendering.py``: by a median 10% of the side). A candidate
remedy: cut a square of ``context`` times the box's side around each detected box (so the
knee spans ``1 / context`` of the view, as on the training composites), run the detector
on it and take the joint overlapping the first box most (a box not found again is kept).
This benchmark measures it on the boxes of a finished labelled run, without changing the
detector:

* ``--run DIR --films DIR --labels CSV``: a ``kneepipe run`` output folder (its
  ``results.csv``) on labelled films, e.g. those of ``second_rendering.py`` or
  ``end_to_end_eval.py``: recall at IoU 0.5/0.75, mean IoU, box errors and KL accuracy
  (the grader on the crops; missed knees count as wrong) for the first and second boxes;
* ``--radiographs``: the shared real films and their hand annotations: IoU of the first
  and second boxes against the annotations.

Run from the project root, e.g.::

    .venv/bin/python benchmarks/second_look.py --run /tmp/kneepipe-render2/end_to_end \\
        --films /tmp/kneepipe-render2/films/images --labels /tmp/kneepipe-render2/films/labels.csv
    .venv/bin/python benchmarks/second_look.py --radiographs
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from second_rendering import box_errors, detection_figures  # noqa: E402

from kneepipe.detect.evaluate import box_iou, read_annotations  # noqa: E402
from kneepipe.detect.framing import Box, crop_joint, square_box  # noqa: E402

VIEW_SIZE = 640
RADIOGRAPHS = ROOT / ".." / "shared" / "data" / "radiographs"
ANNOTATIONS = ROOT / "tests" / "data" / "radiograph_annotations.csv"


def second_look(detector, pixels: np.ndarray, boxes: Sequence[Box], context: float, min_overlap: float = 0.3):
    """Each box re-detected on a view of ``context`` times its side around it (square boxes back)."""
    frames, views = [], []
    for box in boxes:
        x1, y1, x2, y2 = square_box(box)
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * context / 2
        frames.append((cx - half, cy - half, cx + half, cy + half))
        views.append(crop_joint(pixels, frames[-1], size=VIEW_SIZE))
    refined = []
    for box, frame, rows in zip(boxes, frames, detector.predict_boxes(views) if views else [], strict=True):
        per_pixel = (frame[2] - frame[0]) / VIEW_SIZE
        found = [
            (
                frame[0] + r[0] * per_pixel,
                frame[1] + r[1] * per_pixel,
                frame[0] + r[2] * per_pixel,
                frame[1] + r[3] * per_pixel,
            )
            for r in rows
        ]
        best = max(found, key=lambda c: box_iou(c, box), default=None)
        refined.append(square_box(best) if best is not None and box_iou(best, box) >= min_overlap else square_box(box))
    return refined


def on_run(detector, grader, run: Path, films: Path, labels: Path, context: float) -> dict:
    """First and second boxes of a labelled run: detection figures and KL accuracy (missed = wrong)."""
    first = detection_figures(labels, run / "results.csv", films)
    with labels.open(newline="") as handle:
        grades = {(row["image"], row["side"]): int(row["kl_grade"]) for row in csv.DictReader(handle)}
    by_film: dict[str, list[int]] = {}
    for index, knee in enumerate(first["per_knee"]):
        if knee["box"] is not None and knee["iou"] > 0:
            by_film.setdefault(knee["image"], []).append(index)
    second: dict[int, Box] = {}
    crops_first, crops_second = {}, {}
    for name, indices in by_film.items():
        pixels = cv2.imread(str(films / name), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise OSError(f"{films / name}: cannot be read as an image")
        looked = second_look(detector, pixels, [first["per_knee"][i]["box"] for i in indices], context)
        for index, box in zip(indices, looked, strict=True):
            second[index] = box
            crops_first[index] = crop_joint(pixels, first["per_knee"][index]["box"])
            crops_second[index] = crop_joint(pixels, box)
    result = {}
    for label, boxes, crops in (
        ("first", {i: first["per_knee"][i]["box"] for i in second}, crops_first),
        ("second_look", second, crops_second),
    ):
        ious, per_knee, right, graded = [], [], [], []
        for index, knee in enumerate(first["per_knee"]):
            iou = box_iou(knee["truth"], boxes[index]) if index in boxes else 0.0
            ious.append(iou)
            if index in boxes:
                per_knee.append({"truth": knee["truth"], "box": boxes[index]})
            if iou >= 0.5 and knee["predicted_side"] == knee["side"]:
                graded.append(index)
        predicted = grader.decide(grader.predict_proba([crops[i] for i in graded])) if graded else []
        truth = {i: grades[(first["per_knee"][i]["image"], first["per_knee"][i]["side"])] for i in graded}
        right = [int(p) == truth[i] for i, p in zip(graded, predicted, strict=True)]
        values = np.array(ious)
        result[label] = {
            "knees": len(values),
            "recall_iou50": round(float((values >= 0.5).mean()), 4),
            "recall_iou75": round(float((values >= 0.75).mean()), 4),
            "mean_iou": round(float(values.mean()), 4),
            "box_error_p10_p50_p90": box_errors(per_knee),
            "accuracy": round(sum(right) / len(values), 4),
        }
    return result


def on_radiographs(detector, context: float) -> dict:
    """First and second boxes on the shared real AP films against the hand annotations."""
    from kneepipe.imaging import read_radiograph

    truth = read_annotations(ANNOTATIONS)
    first_ious, second_ious, ratios = [], [], []
    for name in sorted(n for n, entry in truth.items() if entry["kind"] in ("bilateral", "single")):
        radiograph = read_radiograph(RADIOGRAPHS / name)
        detection = detector.detect([radiograph])[0]
        boxes = [tuple(v * radiograph.scale for v in joint.box) for joint in detection.joints]
        looked = second_look(detector, radiograph.pixels, boxes, context)
        for _, box in truth[name]["joints"]:
            if not boxes:
                first_ious.append(0.0)
                second_ious.append(0.0)
                continue
            scaled = [tuple(v / radiograph.scale for v in b) for b in boxes]
            i = max(range(len(boxes)), key=lambda k: box_iou(box, scaled[k]))
            one = square_box(scaled[i])
            two = tuple(v / radiograph.scale for v in looked[i])
            first_ious.append(box_iou(box, one))
            second_ious.append(box_iou(box, two))
            ratios.append((two[2] - two[0]) / (one[2] - one[0]))
    result: dict[str, object] = {}
    for label, ious in (("first", first_ious), ("second_look", second_ious)):
        values = np.array(ious)
        result[label] = {
            "ap_joints": len(values),
            "recall_iou50": round(float((values >= 0.5).mean()), 4),
            "mean_iou": round(float(values.mean()), 4),
            "min_iou": round(float(values.min()), 4),
        }
    result["second_side_over_first_p10_p50_p90"] = [round(float(v), 3) for v in np.percentile(ratios, [10, 50, 90])]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a kneepipe run output folder on labelled films")
    parser.add_argument("--films", type=Path, help="the run's films")
    parser.add_argument("--labels", type=Path, help="the films' labels CSV with boxes")
    parser.add_argument("--radiographs", action="store_true", help="the shared real films and their annotations")
    parser.add_argument("--context", type=float, default=3.5, help="view side as a multiple of the box's side")
    args = parser.parse_args()
    if not args.radiographs and not (args.run and args.films and args.labels):
        parser.error("give --run, --films and --labels, or --radiographs")

    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.run import load_models

    detector, grader = load_models(load_config(DetectConfig), load_config(GradeConfig), grader=not args.radiographs)
    if args.radiographs:
        result = on_radiographs(detector, args.context)
    else:
        result = on_run(detector, grader, args.run, args.films, args.labels, args.context)
    result["context"] = args.context
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
