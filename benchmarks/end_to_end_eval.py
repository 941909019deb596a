"""What detection costs: end-to-end accuracy on pseudo-radiographs vs. grading the same crops directly.

Every OAI ``val`` crop is placed exactly once on a pseudo-radiograph by the project's
compositor (:func:`kneepipe.training.compose.compose_radiograph`): both knees of a patient
on one bilateral film, in their natural sides (no mirroring, so the grader is asked about
the very crop it would grade directly). The films are large enough that a knee spans at
least 224 px, so the composite adds no down-sampling of its own. Two renderings:

* ``faithful``: each crop's pixels stay as they are inside its box (no tilt, exposure,
  blur, noise or overlays). The gap to crops-only is what detection and re-cropping
  cost: the acceptance figure.
* ``varied``: the detector's training rendering (leg tilt, film rotation, contrast,
  brightness, gamma 0.6-1.6, blur, noise, markers). Its gap adds what such film
  variation costs the grader, a robustness figure.

For each rendering:

* films at the true boxes: the crops cut back out of the films at their labelled boxes
  (the detector's framing function, no detector), graded: what the rendering alone costs;
* end to end: ``run_pipeline`` (the library of ``kneepipe run``) on the films with the
  labels CSV, missed and misassigned knees counted as failures;

against crops only: ``grade_folder`` (the library of ``kneepipe grade``) on the val crops.
Both use the same shipped models and configs. Prints all, the differences, and exits 1
when the faithful films' end-to-end accuracy is more than 2 points below crops-only or
a knee went ungraded.

Run from the project root::

    .venv/bin/python benchmarks/end_to_end_eval.py --out /tmp/kneepipe-e2e

Options: ``--limit N`` (first N patients, for a quick look), detect config overrides as
``key=value`` after the options, ``--detector``/``--grader``
(other weights), ``--seed``, ``--rendering faithful|varied|both``.
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


def compose_every_crop(
    crops_root: Path, out_dir: Path, seed: int = 0, limit: int | None = None, faithful: bool = False
) -> Path:
    """Place every crop of ``crops_root`` once on a pseudo-radiograph; returns the labels CSV.

    Writes ``out_dir/images/film_XXXXX.png`` (lossless, so JPEG artefacts add nothing) and
    ``out_dir/labels.csv`` (``image,side,kl_grade,x1,y1,x2,y2,source_crop``).
    """
    from kneepipe.training.compose import _read_crop, compose_radiograph, find_crops

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
        image, placed = compose_radiograph(rng, knees, long_side, faithful=faithful)
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


def evaluate_rendering(args, rendering: str, crops_only: dict, detector, grader, configs) -> dict:
    """Films of one rendering: graded at their true boxes and end to end, against crops only."""
    from kneepipe.pipeline.run import run_pipeline

    pipeline_cfg, detect_cfg, grade_cfg = configs
    films = args.out / f"films_{rendering}"
    labels = films / "labels.csv"
    if not labels.exists():
        started = time.perf_counter()
        compose_every_crop(args.crops, films, args.seed, args.limit, faithful=rendering == "faithful")
        print(f"composed {rendering} films in {time.perf_counter() - started:.0f} s -> {films}", file=sys.stderr)
    true_boxes = graded_at_true_boxes(films / "images", labels, grader, detect_cfg.max_side)
    run = run_pipeline(
        films / "images",
        args.out / f"end_to_end_{rendering}",
        pipeline_cfg,
        detect_cfg,
        grade_cfg,
        labels=labels,
        detector=detector,
        grader=grader,
    )
    e2e = run.metrics
    return {
        "films": run.summary["images"],
        "films_true_boxes": {k: true_boxes[k] for k in ("n", "accuracy", "qwk", "mae", "ece")},
        "end_to_end": {k: e2e[k] for k in ("labelled_knees", "accuracy", "qwk", "mae", "ece")},
        "end_to_end_graded_only": {k: e2e["graded_only"][k] for k in ("n", "accuracy", "qwk", "mae")},
        "matched": e2e["matched"],
        "missed": e2e["missed"],
        "misassigned": e2e["misassigned"],
        "accuracy_gap_points": round(100 * (crops_only["accuracy"] - e2e["accuracy"]), 2),
        "rendering_cost_points": round(100 * (crops_only["accuracy"] - true_boxes["accuracy"]), 2),
        "detection_cost_points": round(100 * (true_boxes["accuracy"] - e2e["accuracy"]), 2),
        "end_to_end_seconds": round(run.seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (films, outputs)")
    parser.add_argument("--crops", type=Path, default=DEFAULT_CROPS, help="OAI val crops <grade>/<patient><side>.png")
    parser.add_argument("--limit", type=int, default=None, help="only the first N patients")
    parser.add_argument("--detector", default=None, help="detector weights (default: shipped)")
    parser.add_argument("--grader", default=None, help="grader file (default: shipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rendering", choices=["faithful", "varied", "both"], default="both")
    parser.add_argument("overrides", nargs="*", help="detect config overrides, key=value (runtime=torch ...)")
    args = parser.parse_args()

    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from kneepipe.config import load_config, parse_overrides
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.folder import grade_folder
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.run import load_models

    pipeline_cfg = load_config(PipelineConfig, overrides={"overwrite": True, "thumbnail_size": 0})
    detect_cfg = load_config(DetectConfig, overrides={"model": args.detector, **parse_overrides(args.overrides)})
    grade_cfg = load_config(GradeConfig, overrides={"model": args.grader})
    detector, grader = load_models(detect_cfg, grade_cfg)
    renderings = ["faithful", "varied"] if args.rendering == "both" else [args.rendering]

    # The crops placed on the films (the same for every rendering: one seed, one order).
    started = time.perf_counter()
    first = args.out / f"films_{renderings[0]}" / "labels.csv"
    if not first.exists():
        compose_every_crop(args.crops, first.parent, args.seed, args.limit, faithful=renderings[0] == "faithful")
    crops = crops_folder(args.crops, first, args.out)
    crops_only = grade_folder(crops, args.out / "crops_only", grade_cfg, grader=grader).metrics
    crops_seconds = time.perf_counter() - started

    result = {
        "labelled_knees": crops_only["n"],
        "crops_only": {k: crops_only[k] for k in ("n", "accuracy", "qwk", "mae", "ece")},
        "crops_only_seconds": round(crops_seconds, 1),
        "detector": detector.version,
        "grader": grader.version,
    }
    configs = (pipeline_cfg, detect_cfg, grade_cfg)
    for rendering in renderings:
        result[rendering] = evaluate_rendering(args, rendering, crops_only, detector, grader, configs)
    print(json.dumps(result, indent=2))
    print(f"crops only: accuracy {crops_only['accuracy']:.4f} QWK {crops_only['qwk']:.4f} ({crops_only['n']} crops)")
    for rendering in renderings:
        r = result[rendering]
        print(
            f"{rendering} films: at the true boxes accuracy {r['films_true_boxes']['accuracy']:.4f} "
            f"QWK {r['films_true_boxes']['qwk']:.4f}; end to end accuracy {r['end_to_end']['accuracy']:.4f} "
            f"QWK {r['end_to_end']['qwk']:.4f} ({r['end_to_end']['labelled_knees']} knees on {r['films']} films; "
            f"{r['matched']} matched, {r['missed']} missed, {r['misassigned']} wrong side); gap to crops only "
            f"{r['accuracy_gap_points']:.2f} points (rendering {r['rendering_cost_points']:.2f}, "
            f"detection {r['detection_cost_points']:.2f})"
        )
    (args.out / "end_to_end_eval.json").write_text(json.dumps(result, indent=2))
    accepted = result.get("faithful") or result[renderings[0]]
    ok = accepted["accuracy_gap_points"] <= 2.0 and accepted["matched"] == accepted["end_to_end"]["labelled_knees"]
    print(
        f"acceptance ({'faithful' if 'faithful' in result else renderings[0]} films): gap <= 2.00 points and "
        f"every knee graded: {'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
