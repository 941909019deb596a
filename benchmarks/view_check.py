"""What the view and quality checks cost and whether they refuse good films.

* composites: OAI-style films built from the val crops by the project's compositor
  (``kneepipe.training.compose``, seed 2024): every one shows one or two AP knees, so
  any ``lateral_view``, ``no_knee`` or knee-level refusal of them is a false refusal;
* speed: ``detect_folder`` over the 27 shared radiographs with the checks on and off
  (``view_check``), interleaved ``--repeats`` times on one loaded detector, so both see
  the same machine load; the view classifier's own time per film is also timed.

    python benchmarks/view_check.py [--composites 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--composites", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from kneepipe.detect.predict import JointDetector, detect_folder
    from kneepipe.imaging import Radiograph, find_images, read_radiograph
    from kneepipe.training.compose import _pairs, _read_crop, compose_radiograph, find_crops

    detector = JointDetector.load()
    assert detector.view_classifier is not None, "the view check is off"
    rng = np.random.default_rng(2024)
    crops = find_crops(SHARED / "oai-kl224" / "val")
    pairs, singles = _pairs(crops)
    statuses: Counter = Counter()
    knees: Counter = Counter()
    for index in range(args.composites):
        group = (
            pairs[int(rng.integers(len(pairs)))] if rng.random() < 0.65 else (singles[int(rng.integers(len(singles)))],)
        )
        film, placed = compose_radiograph(rng, [(_read_crop(c), c.side, c.kl_grade, c.path) for c in group], 640)
        detection = detector.detect([Radiograph(film, Path(f"composite_{index}.png"), (film.shape[1], film.shape[0]))])[
            0
        ]
        statuses[detection.status] += 1
        knees.update(joint.status for joint in detection.joints)
    figures: dict = {"composites": args.composites, "film_statuses": dict(statuses), "knee_statuses": dict(knees)}

    paths = find_images(SHARED / "radiographs")
    films = [read_radiograph(path).pixels for path in paths]
    tick = time.perf_counter()
    detector.view_classifier.probabilities(films)
    figures["view_classifier_ms_per_film"] = round(1000 * (time.perf_counter() - tick) / len(films), 1)
    seconds: dict[str, list[float]] = {"checks_on": [], "checks_off": []}
    classifier = detector.view_classifier
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for key, view in (("checks_on", classifier), ("checks_off", None)):
                runner = dataclasses.replace(detector, view_classifier=view)
                tick = time.perf_counter()
                detect_folder(
                    SHARED / "radiographs", Path(tmp) / f"{key}{repeat}", detector.config, runner, progress=False
                )
                seconds[key].append(time.perf_counter() - tick)
    figures["radiographs_per_second"] = {
        key: round(len(paths) / float(np.median(values)), 2) for key, values in seconds.items()
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
