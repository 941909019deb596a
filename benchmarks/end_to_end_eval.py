"""What detection costs: end-to-end accuracy on pseudo-radiographs vs. grading the same crops directly.

Every OAI ``val`` crop is placed exactly once on a pseudo-radiograph by the project's
compositor (:func:`kneepipe.detect.compose.compose_radiograph`): both knees of a patient
on one bilateral film, in their natural sides (no mirroring, so the grader is asked about
the very crop it would grade directly). The films are large enough that a knee spans at
least 224 px, so the composite adds no down-sampling of its own. Then

* crops only: ``grade_folder`` (the library of ``kneepipe grade``) on the val crops;
* films at the true boxes: the crops cut back out of the films at their labelled boxes
  (the detector's framing function, no detector), graded: what the film rendering alone
  costs (the compositor changes exposure, gamma, noise and blur over the whole film);
* end to end: ``run_pipeline`` (the library of ``kneepipe run``) on the films with the
  labels CSV, missed and misassigned knees counted as failures.

Both use the same shipped models and configs. Prints both, the difference, and exits 1
when end-to-end accuracy is more than 2 points below crops-only or a knee went ungraded.

Run from the project root::

    .venv/bin/python benchmarks/end_to_end_eval.py --out /tmp/kneepipe-e2e

Options: ``--limit N`` (first N patients, for a quick look), ``--detector``/``--grader``
(other weights), ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CROPS = ROOT / ".." / "shared" / "data" / "oai-kl224" / "val"


def compose_every_crop(crops_root: Path, out_dir: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Place every crop of ``crops_root`` once on a pseudo-radiograph; returns the labels CSV.

    Writes ``out_dir/images/film_XXXXX.png`` (lossless, so JPEG artefacts add nothing) and
    ``out_dir/labels.csv`` (``image,side,kl_grade,x1,y1,x2,y2,source_crop``).
    """
    from kneepipe.detect.compose import _read_crop, compose_radiograph, find_crops

    crops = find_crops(crops_root)
    patients: dict[str, list] = {}
    for crop in crops:
        patients.setdefault(crop.patient_id, []).append(crop)
    patient_ids = sorted(patients)[:limit] if limit else sorted(patients)
    rng = np.random.default_rng(seed)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, patient_id in enumerate(patient_ids):
        own = sorted(patients[patient_id], key=lambda c: c.side)
        knees = [(_read_crop(c), c.side, c.kl_grade, c.path) for c in own]
        long_side = int(rng.integers(1100, 1500))
        image, placed = compose_radiograph(rng, knees, long_side)
        name = f"film_{index:05d}.png"
        cv2.imwrite(str(images_dir / name), image)
        for knee in placed:
            rows.append([name, knee.side, knee.kl_grade, *(f"{v:.1f}" for v in knee.box), knee.source.name])
    labels = out_dir / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "side", "kl_grade", "x1", "y1", "x2", "y2", "source_crop"])
        writer.writerows(rows)
    return labels


def crops_folder(crops_root: Path, labels: Path, out_dir: Path) -> Path:
    """A ``<grade>/<crop>`` folder of links to exactly the crops placed on the films."""
    folder = out_dir / "crops_by_grade"
    with labels.open() as handle:
        for row in csv.DictReader(handle):
            target = folder / row["kl_grade"] / row["source_crop"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to((crops_root / row["kl_grade"] / row["source_crop"]).resolve())
    return folder


def graded_at_true_boxes(films: Path, labels: Path, grader, max_side: int) -> dict:
    """The grader on crops cut from the films at the labelled boxes: the films without a detector.

    Separates what the film rendering costs (crops-only vs. this) from what detection
    costs (this vs. end to end): the crops go through the same framing function
    (:func:`kneepipe.detect.framing.crop_joint`) the detector's boxes go through.
    """
    from kneepipe.detect.framing import crop_joint
    from kneepipe.imaging import read_radiograph
    from kneepipe.metrics import grading_metrics

    with labels.open() as handle:
        rows = list(csv.DictReader(handle))
    by_film: dict[str, list[dict]] = {}
    for row in rows:
        by_film.setdefault(row["image"], []).append(row)
    crops, true = [], []
    for name, knees in by_film.items():
        radiograph = read_radiograph(films / name, max_side=max_side)
        for knee in knees:
            box = tuple(float(knee[k]) * radiograph.scale for k in ("x1", "y1", "x2", "y2"))
            crops.append(crop_joint(radiograph.pixels, box))
            true.append(int(knee["kl_grade"]))
    probabilities = grader.predict_proba(crops)
    return grading_metrics(np.array(true), probabilities, grader.decide(probabilities))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (films, outputs)")
    parser.add_argument("--crops", type=Path, default=DEFAULT_CROPS, help="OAI val crops <grade>/<patient><side>.png")
    parser.add_argument("--limit", type=int, default=None, help="only the first N patients")
    parser.add_argument("--detector", default=None, help="detector weights (default: shipped)")
    parser.add_argument("--grader", default=None, help="grader file (default: shipped)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.folder import grade_folder
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.run import load_models, run_pipeline

    films = args.out / "films"
    labels = films / "labels.csv"
    if not labels.exists():
        started = time.perf_counter()
        compose_every_crop(args.crops, films, args.seed, args.limit)
        print(f"composed films in {time.perf_counter() - started:.0f} s -> {films}", file=sys.stderr)
    crops = crops_folder(args.crops, labels, args.out)

    pipeline_cfg = load_config(PipelineConfig, overrides={"overwrite": True, "thumbnail_size": 0})
    detect_cfg = load_config(DetectConfig, overrides={"model": args.detector})
    grade_cfg = load_config(GradeConfig, overrides={"model": args.grader})
    detector, grader = load_models(detect_cfg, grade_cfg)

    started = time.perf_counter()
    crops_only = grade_folder(crops, args.out / "crops_only", grade_cfg, grader=grader).metrics
    crops_seconds = time.perf_counter() - started
    true_boxes = graded_at_true_boxes(films / "images", labels, grader, detect_cfg.max_side)
    run = run_pipeline(
        films / "images",
        args.out / "end_to_end",
        pipeline_cfg,
        detect_cfg,
        grade_cfg,
        labels=labels,
        detector=detector,
        grader=grader,
    )
    e2e = run.metrics
    gap = 100 * (crops_only["accuracy"] - e2e["accuracy"])
    all_graded = e2e["matched"] == e2e["labelled_knees"]
    result = {
        "films": run.summary["images"],
        "labelled_knees": e2e["labelled_knees"],
        "crops_only": {k: crops_only[k] for k in ("n", "accuracy", "qwk", "mae", "ece")},
        "films_true_boxes": {k: true_boxes[k] for k in ("n", "accuracy", "qwk", "mae", "ece")},
        "end_to_end": {k: e2e[k] for k in ("labelled_knees", "accuracy", "qwk", "mae", "ece")},
        "end_to_end_graded_only": {k: e2e["graded_only"][k] for k in ("n", "accuracy", "qwk", "mae")},
        "matched": e2e["matched"],
        "missed": e2e["missed"],
        "misassigned": e2e["misassigned"],
        "accuracy_gap_points": round(gap, 2),
        "film_rendering_cost_points": round(100 * (crops_only["accuracy"] - true_boxes["accuracy"]), 2),
        "detection_cost_points": round(100 * (true_boxes["accuracy"] - e2e["accuracy"]), 2),
        "crops_only_seconds": round(crops_seconds, 1),
        "end_to_end_seconds": round(run.seconds, 1),
        "detector": detector.version,
        "grader": grader.version,
    }
    print(json.dumps(result, indent=2))
    print(
        f"crops only: accuracy {crops_only['accuracy']:.4f} QWK {crops_only['qwk']:.4f} ({crops_only['n']} crops)\n"
        f"films, crops at the true boxes: accuracy {true_boxes['accuracy']:.4f} QWK {true_boxes['qwk']:.4f}\n"
        f"end to end: accuracy {e2e['accuracy']:.4f} QWK {e2e['qwk']:.4f} ({e2e['labelled_knees']} knees on "
        f"{run.summary['images']} films; {e2e['matched']} matched, {e2e['missed']} missed, "
        f"{e2e['misassigned']} wrong side)\n"
        f"end to end vs crops only: {gap:.2f} accuracy points (acceptance: <= 2.00, every knee graded); "
        f"of which the film rendering {result['film_rendering_cost_points']:.2f}, "
        f"detection {result['detection_cost_points']:.2f}"
    )
    (args.out / "end_to_end_eval.json").write_text(json.dumps(result, indent=2))
    return 0 if gap <= 2.0 and all_graded else 1


if __name__ == "__main__":
    sys.exit(main())
