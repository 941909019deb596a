"""The detector on films of a second, independently written rendering (``benchmarks/second_rendering.py``).

The films are rendered in memory from real OAI val crops (both knees of a patient, the
right knee on the image's left); their true boxes are exact, and each crop is cut back
out of its film unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou
from kneepipe.detect.framing import crop_joint, square_box
from kneepipe.imaging import Radiograph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import second_rendering  # noqa: E402  (the benchmark's renderer)

FILMS = 4


@pytest.fixture(scope="module")
def films(oai_dir: Path) -> list[tuple[np.ndarray, list, list[np.ndarray]]]:
    patients = second_rendering.patients_of(oai_dir / "val")
    rng = np.random.default_rng(7)
    rendered = []
    for patient in sorted(patients)[:FILMS]:
        knees = [(second_rendering.read_crop(path), side, grade, path) for path, side, grade in patients[patient]]
        image, placed = second_rendering.render_film(rng, knees)
        by_side = {side: crop for crop, side, _, _ in knees}
        rendered.append((image, placed, [by_side[knee.side] for knee in placed]))
    return rendered


def test_films_keep_each_crop_exactly_in_its_box(films):
    for image, placed, crops in films:
        assert 1200 <= max(image.shape) <= 3500
        assert [knee.side for knee in placed] == ["R", "L"]
        assert placed[0].box[0] < placed[1].box[0]  # the right knee on the image's left
        for knee, crop in zip(placed, crops, strict=True):
            np.testing.assert_array_equal(crop_joint(image, knee.box), crop)


def test_detector_finds_both_knees_with_their_sides(films):
    from kneepipe.detect.predict import JointDetector

    detector = JointDetector.load(load_config(DetectConfig))
    radiographs = [
        Radiograph(image, Path(f"film_{i}.png"), (image.shape[1], image.shape[0]))
        for i, (image, _, _) in enumerate(films)
    ]
    for (image, placed, _), detection in zip(films, detector.detect(radiographs), strict=True):
        size = (image.shape[1], image.shape[0])
        for knee in placed:
            best = max(detection.joints, key=lambda joint: box_iou(knee.box, square_box(joint.box, size)), default=None)
            assert best is not None, f"no joint found on a film with two knees ({detection.message})"
            assert box_iou(knee.box, square_box(best.box, size)) >= 0.5
            assert best.side == knee.side
