"""The shipped detector on real radiographs, and ``kneepipe detect`` run in-process."""

from __future__ import annotations

import csv
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ANNOTATIONS
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_FAILED, EXIT_FILE_ERRORS, EXIT_OK
from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou, read_annotations
from kneepipe.detect.predict import (
    DEFAULT_WEIGHTS,
    JOINTS_CSV_COLUMNS,
    FilmChecks,
    JointDetector,
    detect_folder,
    detect_radiographs,
    model_input,
    pair_partner,
    saturated_fraction,
    suppress_nested,
)
from kneepipe.imaging import Radiograph, read_radiograph

pytestmark = pytest.mark.slow  # runs the real model


@pytest.fixture(scope="module")
def detector() -> JointDetector:
    assert DEFAULT_WEIGHTS.is_file(), "the shipped detector kneepipe/weights/detector.pt is missing"
    return JointDetector.load(load_config(DetectConfig))


@pytest.fixture(scope="module")
def annotations():
    return read_annotations(ANNOTATIONS)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == JOINTS_CSV_COLUMNS
        return list(reader)


@pytest.mark.parametrize(
    "name", ["bilateral_0.png", "stage_2_7.jpg", "arthritis_7.jpg", "stage_1_0.jpg", "stage_2_2.jpg"]
)
def test_finds_annotated_joints_with_their_sides(detector, annotations, radiographs_dir, name):
    detection = detector.detect([read_radiograph(radiographs_dir / name)])[0]
    truth = annotations[name]["joints"]
    assert detection.status == "ok" and len(detection.joints) == len(truth)
    for side, box in truth:
        best = max(detection.joints, key=lambda joint: box_iou(box, joint.box))
        assert box_iou(box, best.box) >= 0.5, (name, side, best.box)
        assert best.side == side
        assert best.crop.shape == (224, 224) and best.crop.dtype == np.uint8


def test_no_joint_on_a_foot(detector, radiographs_dir):
    detection = detector.detect([read_radiograph(radiographs_dir / "stage_1_5.jpg")])[0]
    assert detection.joints == () and detection.status == "no_knee"


@pytest.mark.parametrize("name", ["arthritis_0.jpg", "arthritis_1.jpg"])
def test_badly_exposed_films_are_not_gradable(detector, radiographs_dir, name):
    detection = detector.detect([read_radiograph(radiographs_dir / name)])[0]
    assert detection.joints == ()
    assert detection.status == "overexposed" and "over-exposed" in detection.message


def test_nested_boxes_of_one_knee_become_one_joint():
    rows = np.array([[10, 10, 110, 110, 0.6, 0], [30, 30, 100, 100, 0.7, 1], [200, 10, 300, 110, 0.5, 1]])
    kept = suppress_nested(rows, 0.4)
    assert kept[:, 4].tolist() == [0.7, 0.5]


def test_a_faint_second_knee_is_kept_only_beside_a_confident_one(detector):
    main = np.array([100, 100, 200, 210, 0.6, 0])
    partner = np.array([330, 120, 430, 225, 0.01, 1])
    # Beside it at the same height and size: the other knee of a bilateral film.
    assert pair_partner(main, partner[None]) is not None
    kept = detector.select_boxes(np.array([main, partner]))
    assert kept[:, 4].tolist() == [0.6, 0.01]
    for name, faint in {
        "too low on the film": [330, 300, 430, 410, 0.01, 1],
        "too small": [330, 140, 380, 190, 0.01, 1],
        "too far": [700, 120, 800, 225, 0.01, 1],
        "overlapping": [150, 100, 250, 210, 0.01, 1],
        "below pair_conf": [330, 120, 430, 225, 0.001, 1],
    }.items():
        assert len(detector.select_boxes(np.array([main, faint]))) == 1, name
    # Without a confident knee, faint boxes stay unused (a foot, a lateral view).
    assert len(detector.select_boxes(np.array([[330, 120, 430, 225, 0.01, 1]]))) == 0


def test_a_box_stacked_above_or_below_a_knee_is_not_another_knee(detector):
    knee = [100, 300, 200, 400, 0.6, 0]
    shaft = [100, 60, 200, 165, 0.3, 0]  # same leg, higher up: confident but stacked
    other_knee = [330, 300, 430, 400, 0.2, 1]
    kept = detector.select_boxes(np.array([knee, shaft, other_knee]))
    assert kept[:, 4].tolist() == [0.6, 0.2]
    # The stacked box gone, the faint partner beside the knee is found by the pairing rule.
    kept = detector.select_boxes(np.array([knee, shaft, [330, 300, 430, 400, 0.01, 1]]))
    assert kept[:, 4].tolist() == [0.6, 0.01]


def test_a_film_with_a_faint_joint_is_detected_again_after_equalisation(detector, radiographs_dir, monkeypatch):
    film = read_radiograph(radiographs_dir / "bilateral_0.png").pixels
    films = [np.ascontiguousarray(film[:, : film.shape[1] - k]) for k in range(3)]  # told apart by width
    right, left = [100, 300, 300, 500, 0.8, 0], [500, 300, 700, 500, 0.6, 1]
    shaft = [500, 20, 700, 220, 0.2, 1]  # the faint knee's leg boxed too high
    first = {films[0].shape: [right, shaft], films[1].shape: [right, left], films[2].shape: []}
    second = {"rows": [right, left]}
    calls: list[list[bool]] = []

    def fake_select(images):
        equalised = [all(image is not f for f in films) for image in images]
        calls.append(equalised)
        return [
            np.array(second["rows"] if eq else first[image.shape], float).reshape(-1, 6)
            for image, eq in zip(images, equalised, strict=True)
        ]

    monkeypatch.setattr(detector, "_select_per_image", fake_select)
    rows = detector.predict_boxes(films)
    # Only the film with a joint below rescue_below had a second, equalised look.
    assert calls == [[False, False, False], [True]]
    assert rows[0][:, 4].tolist() == [0.8, 0.6]  # the more confident pass replaced the shaft
    assert rows[1][:, 4].tolist() == [0.8, 0.6]
    assert len(rows[2]) == 0  # no joint at all is not retried: laterals and feet stay refused
    # The second look is kept only when its joints are more confident in sum.
    second["rows"] = [[100, 300, 300, 500, 0.7, 0]]
    assert detector.predict_boxes(films[:1])[0][:, 4].tolist() == [0.8, 0.2]
    # rescue_below 0 switches the second look off.
    monkeypatch.setattr(detector, "config", load_config(DetectConfig, overrides={"rescue_below": 0.0}))
    calls.clear()
    assert detector.predict_boxes(films[:1])[0][:, 4].tolist() == [0.8, 0.2] and calls == [[False]]


def test_white_padding_is_not_over_exposure():
    film = np.full((400, 600), 90, np.uint8)
    film[::7, ::5] = 40  # texture, so the content is not uniform
    padded = cv2.copyMakeBorder(film, 120, 0, 200, 40, cv2.BORDER_CONSTANT, value=255)
    assert np.mean(padded >= 250) > 0.3 and saturated_fraction(padded) == 0.0
    burnt = padded.copy()
    burnt[170:370, 300:600] = 255  # a quarter of the film itself saturated
    assert saturated_fraction(burnt) == pytest.approx(0.25, abs=0.02)


def test_boxes_are_in_source_pixels_when_the_image_was_shrunk(detector, radiographs_dir):
    full = read_radiograph(radiographs_dir / "bilateral_0.png")
    small = read_radiograph(radiographs_dir / "bilateral_0.png", max_side=400)
    assert small.scale < 1
    boxes_full = [j.box for j in detector.detect([full])[0].joints]
    boxes_small = [j.box for j in detector.detect([small])[0].joints]
    assert len(boxes_full) == len(boxes_small) == 2
    for a, b in zip(boxes_full, boxes_small, strict=True):
        assert box_iou(a, b) > 0.8


def test_a_lateral_dicom_view_is_refused_without_the_model(detector):
    lateral = Radiograph(pixels=np.zeros((64, 64), np.uint8), path=Path("knee.dcm"), original_size=(64, 64), view="LL")
    detection = detector.detect([lateral])[0]
    assert detection.status == "lateral_view" and "LL" in detection.message


def test_film_checks_made_ahead_give_the_detection_made_without_them(detector, radiographs_dir, monkeypatch):
    """``kneepipe run`` checks each film's pixels in its decoding thread; the detector then only runs the models."""
    names = ("stage_2_7.jpg", "stage_1_5.jpg", "arthritis_0.jpg", "stage_2_8.jpg", "stage_2_0.jpg")
    films = [read_radiograph(radiographs_dir / name) for name in names]  # AP, foot, over-exposed, lateral, long AP
    checks = [detector.check_film(film) for film in films]
    assert [c.refused[0] if c.refused else None for c in checks] == [None, None, "overexposed", None, None]
    assert all(c.view_input is not None and c.view_input.shape == (192, 192) for c in checks if not c.refused)
    plain = detector.detect(films)
    monkeypatch.setattr(detector, "check_film", lambda film: pytest.fail(f"{film.path.name} checked again"))
    ahead = detect_radiographs(detector, films, checks)
    statuses = ["ok", "no_knee", "overexposed", "lateral_view", "ok"]
    assert [d.status for d in ahead] == [d.status for d in plain] == statuses
    for a, b in zip(ahead, plain, strict=True):
        assert a.message == b.message
        assert [(j.side, j.box, j.confidence) for j in a.joints] == [(j.side, j.box, j.confidence) for j in b.joints]


def test_a_film_missing_its_checks_is_checked_by_the_detector(detector, radiographs_dir):
    film = read_radiograph(radiographs_dir / "stage_2_7.jpg")
    (detection,) = detector.detect([film], [None])
    assert detection.status == "ok" and len(detection.joints) == 2
    with pytest.raises(ValueError, match="2 film checks for 1 radiographs"):
        detector.detect([film], [None, None])
    with pytest.raises(ValueError, match="needs its orientation"):
        FilmChecks(None, film.pixels)


def test_single_knee_side_comes_from_the_dicom_tag(detector, radiographs_dir):
    single = read_radiograph(radiographs_dir / "arthritis_7.jpg")  # a right knee
    tagged = Radiograph(pixels=single.pixels, path=single.path, original_size=single.original_size, laterality="L")
    assert [j.side for j in detector.detect([tagged])[0].joints] == ["L"]


def test_detect_folder_checks_films_in_its_decoding_thread(tmp_path, radiographs_dir, detector, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("bilateral_0.png", "stage_2_7.jpg", "stage_1_6.jpg"):
        shutil.copy(radiographs_dir / name, raw / name)
    (raw / "empty.jpg").write_bytes(b"")
    threads, check = [], detector.check_film

    def checked_where(film):
        threads.append(threading.current_thread().name)
        return check(film)

    monkeypatch.setattr(detector, "check_film", checked_where)
    summary = detect_folder(raw, tmp_path / "out", detector.config, detector=detector, progress=False)
    assert len(threads) == 3 and all(name.startswith("kneepipe-decode") for name in threads), threads
    assert summary.status_counts == {"ok": 4, "no_knee": 1, "error": 1}


def test_cli_detects_a_folder_and_reports_bad_files(tmp_path, radiographs_dir):
    raw = tmp_path / "raw"
    (raw / "nested").mkdir(parents=True)
    shutil.copy(radiographs_dir / "bilateral_0.png", raw / "nested" / "bilateral_0.png")
    shutil.copy(radiographs_dir / "stage_1_6.jpg", raw / "foot.jpg")
    (raw / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (raw / "empty.jpg").write_bytes(b"")
    out = tmp_path / "crops"

    result = CliRunner().invoke(app, ["detect", str(raw), "--out", str(out), "--no-progress"])

    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    rows = _read_rows(out / "joints.csv")
    by_image = {}
    for row in rows:
        by_image.setdefault(Path(row["image"]).name, []).append(row)
    assert set(by_image) == {"bilateral_0.png", "foot.jpg", "broken.png", "empty.jpg"}
    assert sorted(r["side"] for r in by_image["bilateral_0.png"]) == ["L", "R"]
    for row in by_image["bilateral_0.png"]:
        assert row["status"] == "ok" and (out / row["crop"]).is_file()
        assert row["crop"] == f"bilateral_0_{row['side']}.png"
    assert [r["status"] for r in by_image["foot.jpg"]] == ["no_knee"]
    for bad in ("broken.png", "empty.jpg"):
        (row,) = by_image[bad]
        assert row["status"] == "error" and row["message"] and row["x1"] == "" and row["crop"] == ""
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["conf"] == load_config(DetectConfig).conf and "detector_version" in args


def test_cli_single_file_and_model_option(tmp_path, radiographs_dir):
    out = tmp_path / "one"
    result = CliRunner().invoke(
        app,
        ["detect", str(radiographs_dir / "stage_2_0.jpg"), "-o", str(out), "--model", str(DEFAULT_WEIGHTS), "conf=0.1"],
    )
    assert result.exit_code == EXIT_OK, result.output
    (row,) = _read_rows(out / "joints.csv")
    assert (row["status"], row["side"]) == ("ok", "R")


def test_cli_fails_cleanly_on_missing_input_or_weights(tmp_path, radiographs_dir):
    runner = CliRunner()
    missing = runner.invoke(app, ["detect", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == EXIT_FAILED and "nope" in missing.output
    no_model = runner.invoke(
        app,
        [
            "detect",
            str(radiographs_dir / "bilateral_0.png"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(tmp_path / "x.pt"),
        ],
    )
    assert no_model.exit_code == EXIT_FAILED and "x.pt" in no_model.output


def test_the_model_sees_a_large_film_as_its_letterbox_would_resize_it(radiographs_dir):
    from ultralytics.data.augment import LetterBox

    film = cv2.imread(str(radiographs_dir / "stage_2_2.jpg"), cv2.IMREAD_GRAYSCALE)
    height, width = film.shape
    pixels, (scale_x, scale_y) = model_input(film, 416)
    assert max(pixels.shape[:2]) == 416 and pixels.shape[2] == 3
    assert scale_x * pixels.shape[1] == pytest.approx(width) and scale_y * pixels.shape[0] == pytest.approx(height)
    letterbox = LetterBox((416, 416), auto=False)
    expected = letterbox(image=cv2.cvtColor(film, cv2.COLOR_GRAY2BGR))
    assert np.array_equal(letterbox(image=pixels), expected)  # the very pixels the model saw before
    small = film[:200, :300]
    assert np.array_equal(model_input(small, 416)[0][..., 0], small) and model_input(small, 416)[1] == (1.0, 1.0)
