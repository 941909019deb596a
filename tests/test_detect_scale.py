"""Knees at any scale and orientation, their side, and the review flag: on real films and real OAI crops.

The films are the shared real radiographs; transformed copies (a knee cut out and
enlarged, a film turned by 90 degrees, a mirrored film) are made in memory with the
benchmark's transforms (``benchmarks/detect_scales.py``), whose reference boxes are the
boxes of the detector shipped before this one on the original films, checked by eye.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_OK
from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.side import SideClassifier, decide_side, side_features, side_from_name
from kneepipe.imaging import Radiograph, read_radiograph
from kneepipe.joints import Joint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import detect_scales  # noqa: E402  (the benchmark's transforms and reference boxes)


@pytest.fixture(scope="module")
def detector():
    from kneepipe.detect.predict import JointDetector

    return JointDetector.load(load_config(DetectConfig))


@pytest.fixture(scope="module")
def reference():
    return detect_scales.read_reference()


@pytest.fixture(scope="module")
def annotated():
    """The hand annotations' knees, in :func:`reference`'s form."""
    return detect_scales.read_reference(detect_scales.ANNOTATIONS)


def _film(pixels: np.ndarray, name: str, **facts) -> Radiograph:
    height, width = pixels.shape
    return Radiograph(np.ascontiguousarray(pixels), Path(name), (width, height), **facts)


def _first_look(detector, monkeypatch, keep: int | None) -> list[int]:
    """Make the detector's first look at a film find only its ``keep`` uppermost joints (all: None).

    The shipped model finds knees that the one before it missed at first sight; this stands for such a
    first look, so the looks that follow one (the windows, the straightened look) are still exercised on
    real pixels. Returns the number of images of each model call (``predict_boxes``), filled as it runs.
    """
    calls: list[int] = []
    predict = type(detector).predict_boxes

    def looked(images: list[np.ndarray]) -> list[np.ndarray]:
        rows = predict(detector, images)
        if not calls and keep is not None:
            rows = [r[np.argsort((r[:, 1] + r[:, 3]) / 2)][:keep] for r in rows]
        calls.append(len(images))
        return rows

    monkeypatch.setattr(detector, "predict_boxes", looked)
    return calls


def _val_crops(oai_dir: Path) -> tuple[list[np.ndarray], np.ndarray]:
    paths = sorted((oai_dir / "val").glob("*/*.png"))
    crops = [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]
    return crops, np.array([side_from_name(path) == "R" for path in paths])


# --- scale and orientation ------------------------------------------------------------------------


def _found(detection, boxes, threshold=0.5) -> list[float]:
    """Best IoU of each reference box with the detection's joints."""
    return [max((detect_scales.iou(box, joint.box) for joint in detection.joints), default=0.0) for box in boxes]


def test_the_benchmark_reads_the_hand_annotations_as_its_truth_too(reference):
    annotated = detect_scales.read_reference(detect_scales.ANNOTATIONS)
    assert sorted(annotated) == sorted(reference) == sorted(detect_scales.AP_FILMS)
    for name, knees in annotated.items():
        # The same knees on the same sides, and the reference boxes lie on the annotated joints.
        assert [side for side, _ in knees] == [side for side, _ in reference[name]]
        assert all(detect_scales.iou(a, b) >= 0.5 for (_, a), (_, b) in zip(knees, reference[name], strict=True))


def test_every_shared_film_upright_reads_upright_and_turned_reads_sideways(radiographs_dir):
    from kneepipe.detect.orientation import bone_orientation
    from kneepipe.imaging import find_images

    paths = find_images(radiographs_dir)
    assert len(paths) == 27
    for path in paths:
        pixels = read_radiograph(path).pixels
        assert not bone_orientation(pixels).sideways, path.name
        assert bone_orientation(np.rot90(pixels)).sideways, path.name
        assert bone_orientation(np.rot90(pixels, -1)).sideways, path.name


def test_a_real_single_knee_enlarged_to_fill_the_frame_is_found(detector, reference):
    # The film: one AP knee across 70% of a portrait film's width, cut from a real
    # bilateral film and enlarged (1200 x 1560 px); the reference box is carried over exactly.
    films = detect_scales.load_films()
    for name, index in (("stage_2_7.jpg", 0), ("arthritis_5.jpg", 0), ("stage_1_3.jpg", 1)):
        knees = [box for _, box in reference[name]]
        film, boxes = detect_scales.cut_film(films[name], knees, knees[index], 0.7, np.random.default_rng(index))
        assert film.shape[1] == 1200 and len(boxes) == 1
        detection = detector.detect([_film(film, f"{name}-enlarged.png")])[0]
        assert detection.status == "ok", (name, detection.message)
        assert _found(detection, boxes)[0] >= 0.5, name


def test_a_film_on_a_larger_canvas_is_detected_on_its_content_alone(detector, radiographs_dir):
    # A real bilateral film pasted on a uniform canvas three times its size: the knees are found exactly
    # where they are on the film itself, shifted by the padding, and cut into the very same crops.
    pixels = read_radiograph(radiographs_dir / "stage_1_3.jpg").pixels  # no uniform band of its own
    pixels = pixels[: pixels.shape[0] // 4 * 4, : pixels.shape[1] // 4 * 4]  # on the padding's 4-pixel grid
    height, width = pixels.shape
    canvas = np.full((3 * height, 2 * width), int(np.median(pixels[0])), np.uint8)
    top, left = height, width // 2
    canvas[top : top + height, left : left + width] = pixels
    alone = detector.detect([_film(pixels, "film.png")])[0]
    pasted = detector.detect([_film(canvas, "pasted.png")])[0]
    assert pasted.status == "ok" and len(pasted.joints) == len(alone.joints) == 2
    for joint, original in zip(pasted.joints, alone.joints, strict=True):
        assert joint.side == original.side
        assert np.allclose(joint.box, np.add(original.box, (left, top, left, top)), atol=1e-3)
        assert np.array_equal(joint.crop, original.crop)


def test_a_small_knee_on_a_padded_film_is_found(detector, reference):
    # A knee across 20% of the film's width, the rest of it the film's border grey (a single-knee film
    # exported on a large fixed canvas): found on the content, every knee inside the cut at IoU >= 0.5.
    # Without the trim three of these five gave no box (benchmarks/detect_scales.py, scale 20%).
    films = detect_scales.load_films()
    for name, index in (("stage_1_1.jpg", 1), ("arthritis_2.jpg", 1), ("bilateral_0.png", 0), ("stage_1_3.jpg", 0)):
        knees = [box for _, box in reference[name]]
        film, boxes = detect_scales.cut_film(films[name], knees, knees[index], 0.2, np.random.default_rng(index))
        detection = detector.detect([_film(film, f"{name}-small.png")])[0]
        assert detection.status == "ok", (name, detection.message)
        assert min(_found(detection, boxes)) >= 0.5, name


def test_a_knee_filling_the_frame_that_only_the_view_classifier_is_sure_of_is_kept_for_review(
    detector, reference, monkeypatch
):
    # arthritis_2's right knee across 80% of the film. The shipped model finds it; the detector before it
    # scored it 0.01 in every view, so no pass found a joint, while the view classifier read an AP knee.
    # Here every pass finds nothing (and the search is off), as with that model: the model's best box is
    # still kept, from pair_conf up; with ap_sure at 1.0 the film is refused as having no knee.
    films = detect_scales.load_films()
    knees = [box for _, box in reference["arthritis_2.jpg"]]
    film, boxes = detect_scales.cut_film(films["arthritis_2.jpg"], knees, knees[0], 0.8, np.random.default_rng(0))
    assert detector.detect([_film(film, "filled.png")])[0].status == "ok"

    def unsure(**keys):
        blind = dataclasses.replace(detector, config=dataclasses.replace(detector.config, search_below=0.0, **keys))
        monkeypatch.setattr(blind, "predict_boxes", lambda images: [np.zeros((0, 6), np.float32) for _ in images])
        return blind

    assert unsure(ap_sure=1.0).detect([_film(film, "filled.png")])[0].status == "no_knee"
    detection = unsure().detect([_film(film, "filled.png")])[0]
    assert detection.status == "ok" and len(detection.joints) == 1 and _found(detection, boxes)[0] >= 0.5
    (flagged,) = unsure(review_conf=1.0).detect([_film(film, "filled.png")])[0].joints
    assert flagged.needs_review and "low detector confidence" in flagged.review_reason


def test_the_knees_of_a_full_leg_film_are_found_in_windows(detector, reference, monkeypatch):
    # A real bilateral film made three times as tall, its femurs and tibias run on (the benchmark's
    # full-leg transform): shrunk whole to the model's input its knees are a third of the learnt size.
    # The shipped model still finds both (0.54-0.63); the one before it found neither. With the first
    # look emptied, as that model's was, square windows down the film's length find both, each on its side.
    films = detect_scales.load_films()
    knees = [box for _, box in reference["stage_1_1.jpg"]]
    film, boxes = detect_scales.full_leg_film(films["stage_1_1.jpg"], knees, 3)
    assert film.shape[0] >= 2 * film.shape[1]
    for first_look_empty in (False, True):
        looks = _first_look(detector, monkeypatch, keep=0 if first_look_empty else None)
        detection = detector.detect([_film(film, "full-leg.png")])[0]
        assert detection.status == "ok" and min(_found(detection, boxes)) >= 0.5
        assert sorted(joint.side for joint in detection.joints) == ["L", "R"]
        assert (len(looks) > 1) == first_look_empty, looks  # the windows: one more model call


def test_a_long_lateral_film_is_not_looked_at_in_windows(detector, radiographs_dir):
    # arthritis_8 and stage_2_8 are laterals 1.74 and 1.66 times as tall as wide: windows gave them boxes,
    # so a film under twice as tall as wide gets windows only when the view classifier does not read it
    # lateral. Both stay lateral views, as every shared lateral does.
    for name in ("arthritis_8.jpg", "stage_2_8.jpg"):
        pixels = read_radiograph(radiographs_dir / name).pixels
        (view,) = detector.view_classifier.probabilities([pixels])
        none = np.zeros((0, 6))
        assert detector.wants_windows(pixels, none, None)  # long enough, nothing found
        assert not detector.wants_windows(pixels, none, view), name
        assert detector.detect([_film(pixels, name)])[0].status == "lateral_view", name


def test_a_film_stored_on_its_side_is_found_turned_and_flagged(detector, reference):
    films = detect_scales.load_films()
    knees = [box for _, box in reference["stage_2_7.jpg"]]
    for turns in (1, 3):
        film, boxes = detect_scales.turn_film(films["stage_2_7.jpg"], knees, turns)
        detection = detector.detect([_film(film, "sideways.png")])[0]
        assert detection.status == "ok" and "film stored on its side" in detection.message
        assert min(_found(detection, boxes)) >= 0.5
        assert sorted(joint.side for joint in detection.joints) == ["L", "R"]
        for joint in detection.joints:
            assert joint.crop.shape == (224, 224)
            assert "film stored on its side" in joint.review_reason


@pytest.mark.parametrize(("name", "turned"), [("stage_2_7.jpg", False), ("stage_1_4.jpg", True)])
def test_an_upright_film_misread_as_sideways_is_detected_as_stored(
    detector, reference, radiographs_dir, monkeypatch, name, turned
):
    """A collimator band across a short, wide film can outweigh its legs' edges: the knees as stored win.

    ``stage_2_7.jpg``'s knees as stored (0.88, 0.89) are sure: the film is not turned. Knees found below
    ``SURE_AS_STORED`` are not (``stage_1_4.jpg``'s were 0.46 and 0.32 with the detector shipped before;
    0.89-0.90 now, so the bar is raised above them here): the film is also looked at turned both ways,
    and its knees as stored beat the turns'.
    """
    if turned:
        monkeypatch.setattr("kneepipe.detect.predict.SURE_AS_STORED", 0.95)
    looked, select = [], detector._select_per_image
    monkeypatch.setattr(detector, "_select_per_image", lambda images: looked.append(len(images)) or select(images))
    detection = detector.detect_sideways(read_radiograph(radiographs_dir / name))
    assert looked[0] == 1 and (2 in looked) == turned, looked  # the film as stored, then both turns at once
    assert detection.status == "ok" and "film stored on its side" not in detection.message
    assert min(_found(detection, [box for _, box in reference[name]])) >= 0.5
    assert sorted(joint.side for joint in detection.joints) == ["L", "R"]


def test_a_sideways_film_without_a_knee_is_refused_as_rotated(detector, radiographs_dir):
    # A lateral view lying sideways: no knee is found on it either way up. Without the view classifier
    # that is all that can be said of it.
    lateral = read_radiograph(radiographs_dir / "arthritis_3.jpg").pixels
    blind = dataclasses.replace(detector, view_classifier=None)
    detection = blind.detect([_film(np.ascontiguousarray(np.rot90(lateral)), "lateral-sideways.png")])[0]
    assert detection.status == "rotated" and not detection.joints
    assert "lies sideways" in detection.message


@pytest.mark.parametrize(("name", "status"), [("stage_1_5.jpg", "no_knee"), ("stage_2_1.jpg", "lateral_view")])
def test_a_sideways_foot_or_lateral_is_named_from_its_view_read_upright(detector, radiographs_dir, name, status):
    # Lying sideways, a foot reads as an AP knee to the view classifier (0.96), and the detector boxes
    # it faintly (0.28-0.37); the lateral stage_2_1.jpg is boxed at 0.44 turned upright. Read upright
    # both ways, the classifier agrees on no knee (0.99-1.00) and on a lateral view (0.77 and 0.96):
    # neither is graded, whichever way it lies.
    pixels = read_radiograph(radiographs_dir / name).pixels
    for turns in (1, 3):
        detection = detector.detect([_film(np.ascontiguousarray(np.rot90(pixels, turns)), "sideways.png")])[0]
        assert detection.status == status and not detection.joints, (turns, detection.message)


def test_a_tilted_film_is_detected_straightened(detector, reference):
    films = detect_scales.load_films()
    knees = [box for _, box in reference["stage_2_7.jpg"]]
    for degrees in (-20, 20):
        film, boxes = detect_scales.tilt_film(films["stage_2_7.jpg"], knees, degrees)
        detection = detector.detect([_film(film, "tilted.png")])[0]
        assert "film tilted" in detection.message
        assert min(_found(detection, boxes)) >= 0.5, degrees


@pytest.mark.parametrize("name", ["stage_1_3.jpg", "stage_2_2.jpg", "arthritis_5.jpg"])
def test_a_slightly_tilted_film_is_also_looked_at_straightened(name, detector, annotated, monkeypatch):
    # Tilted by 10 degrees their edges read 11.8, 5.2 and 12.9 degrees, too little to straighten outright
    # (upright films read up to 12.1). The shipped model finds both knees at once; the one before it found
    # the upper knee only. With the first look cut to the upper knee, as that model's was, the
    # straightened look adds the lower one (pooled look by look: pool_looks). Measured against the hand
    # annotations: the reference boxes of stage_2_2.jpg lie 0.54-0.57 from them, a framing the shipped model
    # did not learn.
    films = detect_scales.load_films()
    knees = [box for _, box in annotated[name]]
    film, boxes = detect_scales.tilt_film(films[name], knees, -10)
    for upper_only in (False, True):
        looks = _first_look(detector, monkeypatch, keep=1 if upper_only else None)
        detection = detector.detect([_film(film, "tilted.png")])[0]
        assert "film tilted" not in detection.message  # crops cut from the film as stored
        assert min(_found(detection, boxes)) >= 0.5
        assert sorted(joint.side for joint in detection.joints) == ["L", "R"]
        assert (len(looks) > 1) == upper_only, looks  # the straightened look: one more model call


def test_two_views_side_by_side_give_no_box_between_them(detector, radiographs_dir, reference):
    # An AP view beside a lateral view of a knee, on one film: the AP knee is found where it is, no
    # joint lies across the gap between the views, and a box on the lateral view is flagged for review.
    ap = read_radiograph(radiographs_dir / "arthritis_7.jpg").pixels
    lateral = read_radiograph(radiographs_dir / "arthritis_3.jpg").pixels
    height = 1200
    views = [cv2.resize(view, (round(view.shape[1] * height / view.shape[0]), height)) for view in (ap, lateral)]
    film = np.hstack(views)
    seam = views[0].shape[1]
    detection = detector.detect([_film(film, "two-views.png")])[0]
    zoom = height / ap.shape[0]
    (ap_box,) = [tuple(v * zoom for v in box) for _, box in reference["arthritis_7.jpg"]]
    assert max(_found(detection, [ap_box])) >= 0.5
    for joint in detection.joints:
        x1, _, x2, _ = joint.box
        on_ap, on_lateral = max(0.0, min(x2, seam) - max(x1, 0)), max(0.0, x2 - max(x1, seam))
        assert max(on_ap, on_lateral) >= 0.8 * (x2 - x1), (joint.box, seam)
        if on_lateral > on_ap:
            assert joint.needs_review, joint


# --- side from anatomy -----------------------------------------------------------------------------


def test_side_classifier_reads_the_side_of_real_oai_val_crops(oai_dir):
    crops, right = _val_crops(oai_dir)
    assert len(crops) == 826
    classifier = SideClassifier.load()
    probability = classifier.probability_right(crops)
    accuracy = float(np.mean((probability >= 0.5) == right))
    assert accuracy >= 0.975, accuracy  # 0.9818 measured (kneepipe/weights/SIDE.md)
    # Mirror-antisymmetric by construction: a mirrored crop reads as the other knee, as surely.
    mirrored = classifier.probability_right([crop[:, ::-1] for crop in crops[:50]])
    assert np.allclose(mirrored, 1 - probability[:50], atol=1e-5)


def test_side_features_negate_under_mirroring():
    crop = np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)
    assert np.allclose(side_features([crop], 16), -side_features([crop[:, ::-1]], 16), atol=1e-5)


def test_train_side_command_writes_a_classifier_measured_on_val(tmp_path, oai_dir):
    # A small real subset keeps it quick: 300 train crops, 100 val crops, linked in place.
    for split, count in (("train", 300), ("val", 100)):
        for path in sorted((oai_dir / split).glob("*/*.png"))[:: max(1, 5778 // count if split == "train" else 8)][
            :count
        ]:
            target = tmp_path / "crops" / split / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    out = tmp_path / "side.npz"
    result = CliRunner().invoke(app, ["train", "side", "--data", str(tmp_path / "crops"), "--out", str(out)])
    assert result.exit_code == EXIT_OK, result.output
    assert "val accuracy" in result.output
    trained = SideClassifier.load(out)
    crops, right = _val_crops(tmp_path / "crops")
    assert np.mean((trained.probability_right(crops) >= 0.5) == right) >= 0.9


def test_train_side_names_a_folder_without_crops(tmp_path):
    (tmp_path / "train").mkdir()
    result = CliRunner().invoke(app, ["train", "side", "--data", str(tmp_path), "--out", str(tmp_path / "s.npz")])
    assert result.exit_code != EXIT_OK
    output = " ".join(result.output.split())  # the console wraps long lines
    assert f"{tmp_path / 'train'}: no crops named" in output


def test_sources_of_the_side_and_their_conflicts():
    assert decide_side(("R", 0.9)) == decide_side(("R", 0.9), tag=None, position=None)
    assert decide_side(("R", 0.9)).source == "anatomy" and not decide_side(("R", 0.9)).doubt
    assert "side uncertain" in decide_side(("L", 0.6)).doubt
    tagged = decide_side(("R", 0.95), tag="L")
    assert (tagged.side, tagged.source) == ("L", "tag") and "laterality tag says L" in tagged.doubt
    placed = decide_side(("L", 0.6), position="R")  # an unsure anatomy does not contradict the position
    assert (placed.side, placed.doubt) == ("R", "")


def test_shared_films_knees_get_their_annotated_side(detector, reference):
    # The anatomy reads the single knees; on bilateral films the position decides and the anatomy checks.
    for name in detect_scales.AP_FILMS:
        detection = detector.detect([read_radiograph(detect_scales.RADIOGRAPHS / name)])[0]
        sides = sorted(joint.side for joint in detection.joints)
        assert sides == sorted(side for side, _ in reference[name]), (name, detection.message)


def test_a_single_knee_is_sided_by_its_fibula_and_a_mirrored_one_is_the_other_knee(detector, radiographs_dir):
    pixels = read_radiograph(radiographs_dir / "arthritis_7.jpg").pixels  # a right knee, no tag
    upright = detector.detect([_film(pixels, "single.png")])[0]
    mirrored = detector.detect([_film(pixels[:, ::-1], "mirrored.png")])[0]
    assert [joint.side for joint in upright.joints] == ["R"]
    assert [joint.side for joint in mirrored.joints] == ["L"]


def test_a_mirrored_single_knee_film_against_its_tag_is_reported_and_flagged(detector, radiographs_dir):
    pixels = read_radiograph(radiographs_dir / "arthritis_7.jpg").pixels  # a right knee
    detection = detector.detect([_film(pixels[:, ::-1], "mirrored.dcm", laterality="R")])[0]
    (joint,) = detection.joints
    assert joint.side == "R"  # the tag decides
    assert "side conflict: the laterality tag says R, the anatomy (fibula side) reads L" in detection.message
    assert joint.needs_review and "side conflict" in joint.review_reason


def test_a_bilateral_film_whose_anatomy_contradicts_the_position_is_flagged(detector, radiographs_dir):
    # stage_2_2: the side markers and the position say R on the image's left; the anatomy misreads both
    # knees (mirroring cannot explain it: see the next test). The position decides; both knees are flagged.
    detection = detector.detect([read_radiograph(radiographs_dir / "stage_2_2.jpg")])[0]
    assert [joint.side for joint in detection.joints] == ["R", "L"]
    assert all("side conflict: position on the film reads" in joint.review_reason for joint in detection.joints)
    assert detection.message.count("side conflict") == 2


def test_a_mirrored_bilateral_film_cannot_be_told_from_its_anatomy(detector, radiographs_dir):
    # Mirroring moves each knee to the other side and mirrors its anatomy too, so both sources agree:
    # only a laterality tag or a burnt-in marker can reveal it (kneepipe/weights/DETECTOR.md).
    pixels = read_radiograph(radiographs_dir / "stage_2_7.jpg").pixels
    detection = detector.detect([_film(pixels[:, ::-1], "mirrored.png")])[0]
    assert [joint.side for joint in detection.joints] == ["R", "L"] and "side conflict" not in detection.message


def test_a_laterality_tag_against_the_anatomy_is_reported_and_flagged(detector, radiographs_dir):
    pixels = read_radiograph(radiographs_dir / "arthritis_7.jpg").pixels  # a right knee
    detection = detector.detect([_film(pixels, "tagged.dcm", laterality="L")])[0]
    (joint,) = detection.joints
    assert joint.side == "L"  # the tag decides
    assert "laterality tag says L" in joint.review_reason and "side conflict" in detection.message


# --- the review flag -------------------------------------------------------------------------------


def test_a_knee_found_below_review_conf_needs_review(detector, radiographs_dir):
    detection = detector.detect([read_radiograph(radiographs_dir / "stage_1_0.jpg")])[0]
    assert all(not joint.needs_review for joint in detection.joints)  # confident knees: R 0.73, L 0.78 (INT8)
    strict = dataclasses.replace(detector, config=dataclasses.replace(detector.config, review_conf=0.75))
    flagged = strict.detect([read_radiograph(radiographs_dir / "stage_1_0.jpg")])[0]
    reasons = {joint.side: joint.review_reason for joint in flagged.joints}
    assert reasons["L"] == ""
    assert reasons["R"].startswith("low detector confidence 0.73 (below review_conf 0.75)")


def test_other_checks_add_review_reasons_to_a_joint():
    joint = Joint(Path("a.png"), "R", (0, 0, 10, 10), 0.9, np.zeros((4, 4), np.uint8))
    assert not joint.needs_review and joint.review_reason == ""
    flagged = dataclasses.replace(joint, review=(*joint.review, "borderline view"))
    assert flagged.needs_review and flagged.review_reason == "borderline view"


def test_needs_review_in_joints_csv(tmp_path, radiographs_dir):
    result = CliRunner().invoke(
        app, ["detect", str(radiographs_dir / "stage_1_0.jpg"), "--out", str(tmp_path), "review_conf=0.75"]
    )
    assert result.exit_code == EXIT_OK, result.output
    with (tmp_path / "joints.csv").open(newline="") as handle:
        rows = {row["side"]: row for row in csv.DictReader(handle)}
    assert (rows["L"]["needs_review"], rows["L"]["review_reason"]) == ("false", "")
    assert rows["R"]["needs_review"] == "true" and "low detector confidence" in rows["R"]["review_reason"]


@pytest.mark.slow
def test_needs_review_in_results_summary_and_report(tmp_path, radiographs_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("stage_1_0.jpg", "arthritis_7.jpg"):
        (raw / name).symlink_to((radiographs_dir / name).resolve())
    out = tmp_path / "out"
    args = ["run", str(raw), "--out", str(out), "--report", "--no-progress", "detect.review_conf=0.75"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_OK, result.output
    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(row["needs_review"] in ("true", "false") for row in rows)
    flagged = [row for row in rows if row["needs_review"] == "true"]
    assert flagged and all("low detector confidence" in row["review_reason"] for row in flagged)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knees_needing_review"] == len(flagged)
    page = (out / "report.html").read_text()
    assert page.count('<div class="knee review">') == len(flagged)
    assert f"<b>{len(flagged)}</b>knees to review" in page
    for row in flagged:
        assert row["review_reason"].split(" (")[0] in page
