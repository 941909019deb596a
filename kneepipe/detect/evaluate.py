"""Measuring the detector on hand-annotated real radiographs.

Each true joint is matched to the best-overlapping detection (greedy, by IoU); the
measure reports recall at an IoU threshold and side accuracy over the matched joints.
``kneepipe evaluate detector`` prints it with the val-composite measure
(:func:`kneepipe.training.detector.evaluate_composites`): the model card's figures.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kneepipe.detect.predict import Detector
from kneepipe.imaging import read_radiograph
from kneepipe.joints import STATUS_OK, Detection

JOINT_KINDS = ("bilateral", "single")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes.

    >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))
    0.3333333333333333
    """
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_joints(
    truth: Sequence[tuple[str, tuple[float, float, float, float]]], detection: Detection
) -> list[dict[str, Any]]:
    """Pair each true joint ``(side, box)`` with the best remaining detected joint by IoU."""
    free = list(detection.joints)
    matches = []
    for side, box in truth:
        best = max(free, key=lambda joint: box_iou(box, joint.box), default=None)
        iou = box_iou(box, best.box) if best is not None else 0.0
        if best is not None and iou > 0:
            free.remove(best)
        matches.append({"side": side, "iou": iou, "predicted_side": best.side if best and iou > 0 else None})
    return matches


def read_annotations(path: Path) -> dict[str, dict[str, Any]]:
    """Annotation rows grouped per image: ``{image: {"kind": ..., "joints": [(side, box)]}}``."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    images: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = images.setdefault(row["image"], {"kind": row["kind"], "joints": []})
        if row["x1"]:
            box = tuple(float(row[key]) for key in ("x1", "y1", "x2", "y2"))
            entry["joints"].append((row["side"], box))
    return images


def evaluate_radiographs(detector: Detector, radiographs_dir: Path, annotations: Path) -> dict[str, Any]:
    """The real-radiograph acceptance checks against the hand annotations.

    Returns recall at IoU 0.5 over bilateral/single AP joints, side accuracy over them,
    the joints found on foot films, and the status of every lateral and badly exposed
    film, plus a per-image record.
    """
    truth = read_annotations(annotations)
    names = sorted(truth)
    detections = detector.detect([read_radiograph(radiographs_dir / name) for name in names])
    per_image, ious, sides_right, foot_boxes, statuses = {}, [], [], 0, {}
    for name, detection in zip(names, detections, strict=True):
        kind = truth[name]["kind"]
        matches = match_joints(truth[name]["joints"], detection)
        per_image[name] = {
            "kind": kind,
            "status": detection.status,
            "message": detection.message,
            "detected": [
                {"side": j.side, "box": [round(v, 1) for v in j.box], "confidence": j.confidence}
                for j in detection.joints
            ],
            "matches": matches,
        }
        if kind in JOINT_KINDS:
            ious += [m["iou"] for m in matches]
            sides_right += [m["predicted_side"] == m["side"] for m in matches if m["iou"] >= 0.5]
        elif kind == "foot":
            foot_boxes += len(detection.joints)
        else:
            statuses[name] = detection.status
    found = sum(iou >= 0.5 for iou in ious)
    return {
        "ap_joints": len(ious),
        "found_iou50": found,
        "recall_iou50": found / len(ious) if ious else 0.0,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "side_correct": sum(sides_right),
        "side_accuracy": sum(sides_right) / len(sides_right) if sides_right else 0.0,
        "foot_boxes": foot_boxes,
        "lateral_and_bad_exposure_status": statuses,
        "without_ok_status": sum(status != STATUS_OK for status in statuses.values()),
        "per_image": per_image,
    }
