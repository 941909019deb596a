"""Measuring the detector: on hand-annotated real radiographs and on val-crop composites.

Both measures match each true joint to the best-overlapping detection (greedy, by IoU)
and report recall at an IoU threshold and side accuracy over the matched joints.

Run as a module for the acceptance figures of the model card::

    python -m kneepipe.detect.evaluate [--model PATH] [--composites 300] [--seed 2024]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kneepipe.detect.predict import JointDetector
from kneepipe.imaging import read_radiograph
from kneepipe.joints import STATUS_OK, Detection

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT / ".." / "shared" / "data"
ANNOTATIONS = PROJECT_ROOT / "tests" / "data" / "radiograph_annotations.csv"
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


def read_annotations(path: Path = ANNOTATIONS) -> dict[str, dict[str, Any]]:
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


def evaluate_radiographs(
    detector: JointDetector,
    radiographs_dir: Path = SHARED_DATA / "radiographs",
    annotations: Path = ANNOTATIONS,
) -> dict[str, Any]:
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


def evaluate_composites(
    detector: JointDetector,
    crops_root: Path = SHARED_DATA / "oai-kl224" / "val",
    count: int = 300,
    seed: int = 2024,
    iou_threshold: float = 0.75,
) -> dict[str, Any]:
    """Recall at ``iou_threshold`` and side accuracy on fresh composites of the val crops."""
    from kneepipe.detect.compose import compose_dataset

    with tempfile.TemporaryDirectory() as tmp:
        labels_csv = compose_dataset(crops_root, Path(tmp), count=count, seed=seed)
        with labels_csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        truth: dict[str, list] = {}
        for row in rows:
            box = tuple(float(row[key]) for key in ("x1", "y1", "x2", "y2"))
            truth.setdefault(row["image"], []).append((row["side"], box))
        names = sorted(truth)
        ious, sides_right, extra = [], [], 0
        for start in range(0, len(names), 16):
            chunk = names[start : start + 16]
            radiographs = [read_radiograph(Path(tmp) / "images" / name) for name in chunk]
            for name, detection in zip(chunk, detector.detect(radiographs), strict=True):
                matches = match_joints(truth[name], detection)
                ious += [m["iou"] for m in matches]
                sides_right += [m["predicted_side"] == m["side"] for m in matches if m["iou"] >= 0.5]
                extra += max(0, len(detection.joints) - sum(m["iou"] > 0 for m in matches))
    found = sum(iou >= iou_threshold for iou in ious)
    return {
        "composites": count,
        "seed": seed,
        "joints": len(ious),
        "iou_threshold": iou_threshold,
        "recall": found / len(ious),
        "recall_iou50": sum(iou >= 0.5 for iou in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
        "side_accuracy": sum(sides_right) / len(sides_right) if sides_right else 0.0,
        "extra_detections": extra,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Print both evaluations as JSON (the model card's figures)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="detector weights; default: the shipped model")
    parser.add_argument("--composites", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--per-image", action="store_true", help="include per-image records")
    args = parser.parse_args(argv)
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig

    config = load_config(DetectConfig, overrides={"model": args.model} if args.model else None)
    detector = JointDetector.load(config)
    real = evaluate_radiographs(detector)
    if not args.per_image:
        real.pop("per_image")
    composites = evaluate_composites(detector, count=args.composites, seed=args.seed)
    print(json.dumps({"detector": detector.version, "radiographs": real, "val_composites": composites}, indent=2))


if __name__ == "__main__":
    main()
