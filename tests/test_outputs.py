"""The pipeline's pieces without a model: failure isolation, records, outputs, heat-map choice."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from kneepipe.detect.predict import detect_radiographs
from kneepipe.imaging import Radiograph
from kneepipe.joints import STATUS_ERROR, STATUS_OK, Detection
from kneepipe.pipeline.explain import report_heat_maps
from kneepipe.pipeline.outputs import batch_summary, results_rows
from kneepipe.pipeline.records import image_record


def _film(name: str) -> Radiograph:
    return Radiograph(np.zeros((16, 16), np.uint8), Path(name), (16, 16))


class _FailsOn:
    """A detector that fails on any batch holding one named film."""

    version = "fake@0"

    def __init__(self, bad: str):
        self.bad, self.calls = bad, []

    def detect(self, radiographs):
        self.calls.append(len(radiographs))
        if any(r.path.name == self.bad for r in radiographs):
            raise RuntimeError(f"cannot read {self.bad}")
        return [Detection(r.path, ()) for r in radiographs]


def test_a_failing_film_costs_only_its_own_detection_and_is_logged(caplog):
    films = [_film("a.png"), _film("b.png"), _film("c.png")]
    detector = _FailsOn("b.png")
    with caplog.at_level(logging.WARNING, logger="kneepipe"):
        detections = detect_radiographs(detector, films)
    assert [d.image.name for d in detections] == ["a.png", "b.png", "c.png"]
    assert [d.status for d in detections] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert detections[1].message == "detection failed (RuntimeError: cannot read b.png)"
    assert detector.calls == [3, 1, 1, 1]
    assert "detection of 3 films failed (RuntimeError: cannot read b.png)" in caplog.text


def test_a_detector_that_loses_a_film_is_retried_one_by_one():
    class Short:
        def detect(self, radiographs):
            return [Detection(r.path, ()) for r in radiographs[:1]]

    detections = detect_radiographs(Short(), [_film("a.png"), _film("b.png")])
    assert [d.image.name for d in detections] == ["a.png", "b.png"]


def _knee(side: str, grade: int | None, crop: str = "") -> dict:
    knee = {
        "side": side,
        "box": [0.0, 0.0, 10.0, 10.0],
        "det_confidence": 0.9,
        "crop": crop,
        "status": STATUS_OK if grade is not None else STATUS_ERROR,
        "message": "" if grade is not None else "grading failed",
        "logits": None,
    }
    if grade is not None:
        knee.update(kl_grade=grade, probabilities=[0.0] * grade + [1.0] + [0.0] * (4 - grade))
    return knee


def _images() -> dict:
    first = image_record("site_a/1.png", Path("in/site_a/1.png"))
    first.update(status=STATUS_OK, original_size=[16, 16], knees=[_knee("R", 2, "crops/1_R.png"), _knee("L", None)])
    second = image_record("site_b/2.png", Path("in/site_b/2.png"))
    second.update(status="no_knee", message="no knee joint found", original_size=[16, 16])
    third = image_record("site_b/3.png", Path("in/site_b/3.png"))
    third.update(message="not an image")
    return {record["image"]: record for record in (first, second, third)}


def test_results_rows_and_summary_from_records():
    images = _images()
    rows = results_rows(images)
    assert [(r["image"], r.get("side"), r["status"]) for r in rows] == [
        ("site_a/1.png", "R", STATUS_OK),
        ("site_a/1.png", "L", STATUS_ERROR),
        ("site_b/2.png", None, "no_knee"),
        ("site_b/3.png", None, STATUS_ERROR),
    ]
    assert rows[0]["kl_grade"] == 2 and rows[0]["p2"] == "1.0000" and "kl_grade" not in rows[1]
    summary = batch_summary(images, group_pattern=r"(\d)\.png")
    assert summary["images"] == 3 and summary["images_read"] == 2 and summary["knees_graded"] == 1
    assert summary["grade_counts"] == [0, 0, 1, 0, 0]
    assert summary["refused"] == {"error": 1, "no_knee": 1}
    assert set(summary["groups"]) == {"1", "2", "3"}


def test_heat_maps_are_computed_for_the_knees_the_report_shows(tmp_path):
    (tmp_path / "crops").mkdir()
    for name in ("1_R", "4_R", "4_L"):
        cv2.imwrite(str(tmp_path / f"crops/{name}.png"), np.full((32, 32), 100, np.uint8))
    images = _images()
    fourth = image_record("4.png", Path("in/4.png"))
    fourth.update(status=STATUS_OK, knees=[_knee("R", 0, "crops/4_R.png"), _knee("L", 4, "crops/4_L.png")])
    images["4.png"] = fourth
    asked = []

    class Explains:
        def gradcam(self, crop, grade=None):
            asked.append(grade)
            if grade == 4:
                raise MemoryError
            return np.zeros(crop.shape, np.float32)

    maps = report_heat_maps(images, tmp_path, Explains(), max_radiographs=10, max_maps=10)
    assert asked == [2, 0, 4]  # the graded knees with crops, in report order
    assert set(maps) == {"crops/1_R.png", "crops/4_R.png", "crops/4_L.png"}
    assert maps["crops/4_L.png"] == "no heat map (MemoryError)"
    assert report_heat_maps(images, tmp_path, Explains(), max_radiographs=1, max_maps=10).keys() == {"crops/1_R.png"}
    assert len(report_heat_maps(images, tmp_path, Explains(), max_radiographs=10, max_maps=2)) == 2


def test_a_crop_the_grader_fails_on_costs_only_its_own_grade(caplog):
    import threading

    from kneepipe.grade.predict import Grader

    grader = Grader.__new__(Grader)  # the grading logic without a network
    grader._lock = threading.Lock()
    running, overlapped = [], []

    def predict_with_features(crops, batch_size=32):
        running.append(1)
        overlapped.append(len(running) > 1)  # two threads in the network at once
        time.sleep(0.01)
        try:
            if any(crop.max() == 255 for crop in crops):
                raise ValueError("bad crop")
            return np.stack([np.full(5, crop.mean(), np.float32) for crop in crops]), np.zeros((len(crops), 4))
        finally:
            running.pop()

    grader.predict_with_features = predict_with_features
    crops = [np.full((8, 8), v, np.uint8) for v in (10, 255, 30)]
    with caplog.at_level(logging.WARNING, logger="kneepipe"):
        graded = grader.grade_each(crops, batch_size=8)
    assert graded[0][0] == 10 and graded[2][0] == 30
    assert graded[1] == "grading failed (ValueError: bad crop)"
    assert "grading 3 crops failed (ValueError: bad crop)" in caplog.text
    threads = [threading.Thread(target=grader.grade_each, args=(crops,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlapped) == 4 * 4 + 4 and not any(overlapped)
    assert grader.grade_each([]) == []
