"""The view and quality checks (kneepipe.detect.quality) on the shared real films.

Each status is checked where a user meets it: in the rows ``kneepipe detect`` writes to
joints.csv and ``kneepipe run`` writes to results.csv. The shipped view classifier was
fitted on these very films (after its leave-one-film-out measure, kneepipe/weights/view.json),
so the lateral and foot checks here say it learnt them; the held-out figures are in the
model card. Films made here (cut, darkened, with a drawn-in implant) live in tmp_path only.
"""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ANNOTATIONS
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_OK
from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou, read_annotations
from kneepipe.detect.framing import crop_joint
from kneepipe.detect.predict import DEFAULT_WEIGHTS, JointDetector, load_view_classifier
from kneepipe.detect.quality import (
    DEFAULT_VIEW_MODEL,
    LETTERBOX_GREY,
    ViewClassifier,
    cut_fraction,
    exposure_problem,
    letterbox,
    metal_fraction,
)
from kneepipe.imaging import area_resize, read_radiograph
from kneepipe.training.implant import draw_knee_implant

LATERAL_REASON = "lateral view: KL grading needs an AP/PA view"


def _rows(path: Path) -> dict[str, list[dict[str, str]]]:
    by_image: dict[str, list[dict[str, str]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            by_image.setdefault(Path(row["image"]).name, []).append(row)
    return by_image


@pytest.fixture(scope="module")
def annotations():
    return read_annotations(ANNOTATIONS)


@pytest.fixture(scope="module")
def detector() -> JointDetector:
    return JointDetector.load()


@pytest.fixture(scope="module")
def detected(tmp_path_factory, radiographs_dir) -> dict[str, list[dict[str, str]]]:
    """joints.csv of ``kneepipe detect`` over the 27 shared radiographs, by image name."""
    out = tmp_path_factory.mktemp("detected")
    result = CliRunner().invoke(app, ["detect", str(radiographs_dir), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_OK, result.output
    return _rows(out / "joints.csv")


def _films_of(annotations, kind: str) -> list[str]:
    return [name for name, entry in annotations.items() if entry["kind"] == kind]


def test_every_lateral_is_named_a_lateral_view(detected, annotations):
    laterals = _films_of(annotations, "lateral")
    assert len(laterals) == 12
    for name in laterals:
        rows = detected[name]
        assert len(rows) == 1 and rows[0]["status"] == "lateral_view", (name, rows)
        assert rows[0]["message"].startswith(LATERAL_REASON), rows[0]["message"]


def test_feet_give_no_knee(detected, annotations):
    # The shipped detector boxes both shared feet faintly (0.28-0.33); the view classifier's
    # "no knee" outweighs a box below no_knee_keep_conf, and the message says so.
    for name in _films_of(annotations, "foot"):
        rows = detected[name]
        assert len(rows) == 1 and rows[0]["status"] == "no_knee", (name, rows)
        assert rows[0]["message"] == "no knee in image" or rows[0]["message"].startswith(
            "no knee in image (view classifier: no knee 1.00; best box 0."
        ), rows[0]["message"]


def test_over_exposed_films_are_named(detected, annotations):
    for name in _films_of(annotations, "bad_exposure"):
        [row] = detected[name]
        assert row["status"] == "overexposed" and row["message"].startswith("over-exposed film"), row


def test_every_ap_joint_is_still_found_and_graded(detected, annotations):
    joints = 0
    for name, entry in annotations.items():
        for side, box in entry["joints"]:
            found = [r for r in detected[name] if r["status"] == "ok" and r["side"] == side]
            ious = [box_iou(box, [float(r[k]) for k in ("x1", "y1", "x2", "y2")]) for r in found]
            assert ious and max(ious) >= 0.5, (name, side, ious)
            joints += 1
    assert joints == 20


def test_exposure_names_a_darkened_film_and_passes_the_usable_ones(radiographs_dir, annotations, tmp_path):
    for name, entry in annotations.items():
        pixels = read_radiograph(radiographs_dir / name).pixels
        problem = exposure_problem(pixels, overexposed_fraction=0.3, underexposed_level=60)
        expected = "overexposed" if entry["kind"] == "bad_exposure" else None
        assert (problem[0] if problem else None) == expected, (name, problem)
    dark = (read_radiograph(radiographs_dir / "stage_1_3.jpg").pixels * 0.2).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "dark.png"), dark)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "dark.png"), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_OK, result.output
    [row] = _rows(out / "joints.csv")["dark.png"]
    assert row["status"] == "underexposed" and row["message"].startswith("under-exposed film"), row


@pytest.mark.parametrize("padded", [False, True], ids=["film", "film-on-padding"])
@pytest.mark.parametrize("name", ["bilateral_0.png", "stage_2_7.jpg"])
def test_a_knee_cut_by_the_film_edge_is_partial_and_the_other_knee_is_graded(
    name, padded, annotations, radiographs_dir, tmp_path
):
    pixels = cv2.imread(str(radiographs_dir / name), cv2.IMREAD_GRAYSCALE)
    right = min((box for _, box in annotations[name]["joints"]), key=lambda box: box[0])
    cut = int(right[0] + 0.3 * (right[2] - right[0]))  # 30% of the right knee's box cut away
    film = pixels[:, cut:]
    if padded:  # exported on a larger black canvas: the knee is still cut by the film's own edge
        film = np.pad(film, ((film.shape[0] // 4,) * 2, (film.shape[1] // 4,) * 2))
    cv2.imwrite(str(tmp_path / "cut.png"), film)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "cut.png"), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_OK, result.output
    rows = {row["side"]: row for row in _rows(out / "joints.csv")["cut.png"]}
    assert rows["R"]["status"] == "partial" and "cut by the film's edge" in rows["R"]["message"], rows
    assert rows["L"]["status"] == "ok", rows
    assert rows["R"]["crop"] and (out / rows["R"]["crop"]).is_file()  # found, boxed and cropped, not graded


def test_cut_fraction_of_boxes():
    assert cut_fraction((10, 10, 110, 110), (200, 200)) == 0.0
    assert cut_fraction((-30, 10, 70, 110), (200, 200)) == pytest.approx(0.3)
    assert cut_fraction((150, 150, 250, 230), (200, 200)) == pytest.approx(0.5)


def _with_implant(pixels: np.ndarray, box, seed: int = 0) -> np.ndarray:
    """``pixels`` with a metal implant drawn into the joint box (in the crop's framing)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    drawn = draw_knee_implant(crop_joint(pixels, box, size=224), np.random.default_rng(seed))
    patch = cv2.resize(drawn, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    film = pixels.copy()
    left, top, right, bottom = max(0, x1), max(0, y1), min(film.shape[1], x2), min(film.shape[0], y2)
    film[top:bottom, left:right] = patch[top - y1 : bottom - y1, left - x1 : right - x1]
    return film


def test_metal_is_found_in_drawn_implants_and_not_in_real_knees(oai_dir, annotations, radiographs_dir):
    real = [
        crop_joint(read_radiograph(radiographs_dir / name).pixels, box, size=224)
        for name, entry in annotations.items()
        for _, box in entry["joints"]
    ]
    oai = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((oai_dir / "val").glob("*/*.png"))[::8]]
    rng = np.random.default_rng(1)

    def flagged(crops):
        return sum(metal_fraction(crop, 245, 25) > 0.02 for crop in crops)

    assert flagged(real) == 0 and flagged(oai) == 0
    assert flagged([draw_knee_implant(crop, rng) for crop in real]) == len(real)
    assert flagged([draw_knee_implant(crop, rng) for crop in oai]) >= 0.9 * len(oai)

    def banded(crop: np.ndarray, edge: int) -> np.ndarray:  # white film padding or a collimator band at one edge
        crop = np.rot90(crop.copy(), edge)
        crop[:24] = 255
        return np.rot90(crop, -edge)

    assert flagged([banded(crop, index % 4) for index, crop in enumerate(real + oai)]) == 0
    implanted = [draw_knee_implant(crop, rng) for crop in real]
    assert flagged([banded(crop, index % 4) for index, crop in enumerate(implanted)]) == len(real)


def test_a_knee_prosthesis_is_not_graded_and_the_other_knee_is(annotations, radiographs_dir, tmp_path):
    name = "stage_1_3.jpg"
    pixels = read_radiograph(radiographs_dir / name).pixels
    right = min((box for _, box in annotations[name]["joints"]), key=lambda box: box[0])
    raw = tmp_path / "raw"
    raw.mkdir()
    cv2.imwrite(str(raw / "implant.png"), _with_implant(pixels, right))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(raw), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_OK, result.output
    rows = {row["side"]: row for row in _rows(out / "results.csv")["implant.png"]}
    assert rows["R"]["status"] == "knee_prosthesis" and "metal implant" in rows["R"]["message"], rows["R"]
    assert not rows["R"]["kl_grade"]
    assert rows["L"]["status"] == "ok" and rows["L"]["kl_grade"] in {"0", "1", "2", "3", "4"}, rows["L"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knees_graded"] == 1 and summary["knees_refused"] == {"knee_prosthesis": 1}


def test_the_view_letterbox_centres_the_shrunk_film_on_the_padding_grey(radiographs_dir):
    film = read_radiograph(radiographs_dir / "stage_1_0.jpg").pixels  # 3356 x 4096
    boxed = letterbox(film, 192)
    height, width = film.shape
    inner = area_resize(film, (192, round(height * 192 / width)))
    top = (192 - inner.shape[0]) // 2
    assert np.array_equal(boxed[top : top + inner.shape[0]], inner)
    assert (boxed[:top] == LETTERBOX_GREY).all() and (boxed[top + inner.shape[0] :] == LETTERBOX_GREY).all()


def test_the_shipped_view_classifier_reads_the_shipped_detector(detector):
    assert detector.view_classifier is not None
    probabilities = detector.view_classifier.probabilities([np.full((300, 200), 90, np.uint8)])
    assert probabilities.shape == (1, 3) and probabilities.sum() == pytest.approx(1.0)


def test_the_compiled_view_features_read_every_shared_film_as_pytorch_does(detector, radiographs_dir):
    """On an OpenVINO runtime the view check's backbone runs compiled; PyTorch is the reference it was fitted on."""
    assert detector.runtime.startswith("openvino") and detector.view_classifier.compiled is not None
    # traced once a process: a detector loaded again reuses the network
    assert JointDetector.load().view_classifier.compiled is detector.view_classifier.compiled
    torch_config = load_config(DetectConfig, overrides={"runtime": "torch"})
    reference = load_view_classifier(torch_config, DEFAULT_WEIGHTS)
    assert reference is not None and reference.compiled is None
    films = [read_radiograph(path).pixels for path in sorted(radiographs_dir.iterdir())]
    assert len(films) == 27
    compiled = detector.view_classifier.probabilities(films)  # a batch of 27: the network takes any size
    expected = reference.probabilities(films)
    np.testing.assert_allclose(compiled, expected, atol=1e-4)
    assert (compiled.argmax(axis=1) == expected.argmax(axis=1)).all()
    # one film at a time, from threads sharing the network, reads the same
    with ThreadPoolExecutor(2) as pool:
        singles = list(pool.map(lambda film: detector.view_classifier.probabilities([film])[0], films))
    np.testing.assert_allclose(np.array(singles), compiled, atol=1e-5)


def test_a_view_classifier_of_another_detector_is_refused_with_the_fix(tmp_path, caplog):
    with np.load(DEFAULT_VIEW_MODEL) as data:
        fields = {key: data[key] for key in data.files}
    fields["backbone_digest"] = np.array("0123456789ab")
    other = tmp_path / "view.npz"
    np.savez(other, **fields)
    with pytest.raises(ValueError, match="kneepipe train view"):
        ViewClassifier.load(other, DEFAULT_WEIGHTS)
    config = load_config(DetectConfig, overrides={"view_model": str(other)})
    assert load_view_classifier(config, DEFAULT_WEIGHTS) is None
    assert "view check off" in caplog.text


def test_train_view_writes_a_classifier_the_detector_loads(tmp_path, radiographs_dir):
    radiographs = tmp_path / "films"
    radiographs.mkdir()
    chosen = ["arthritis_3.jpg", "stage_2_8.jpg", "stage_1_5.jpg", "stage_1_3.jpg", "arthritis_7.jpg"]
    for name in chosen:
        shutil.copy(radiographs_dir / name, radiographs / name)
    table = tmp_path / "annotations.csv"
    with ANNOTATIONS.open() as source, table.open("w") as target:
        target.writelines(line for line in source if line.startswith(("#", "image,")) or line.split(",")[0] in chosen)
    out, again = tmp_path / "view.npz", tmp_path / "again" / "view.npz"
    for target in (out, again):
        result = CliRunner().invoke(
            app,
            ["train", "view", "--radiographs", str(radiographs), "--annotations", str(table), "--copies", "2"]
            + ["--out", str(target), *(["--no-measure"] if target == again else [])],
        )
        assert result.exit_code == EXIT_OK, result.output
    with np.load(out) as first, np.load(again) as second:  # the recipe's seed fixes the augmented copies too
        for key in ("mean", "scale", "coef", "intercept"):
            np.testing.assert_array_equal(first[key], second[key])
    report = (tmp_path / "view.json").read_text()
    assert '"leave_one_film_out"' in report and '"arthritis_3.jpg"' in report
    classifier = ViewClassifier.load(out, DEFAULT_WEIGHTS)
    assert classifier.classes == ("ap", "lateral", "no_knee")
    assert classifier.probabilities([read_radiograph(radiographs / "arthritis_3.jpg").pixels]).shape == (1, 3)


def test_a_box_on_a_film_the_view_classifier_reads_as_no_knee_is_refused_only_with_no_knee_keep_conf(
    detector, radiographs_dir, annotations
):
    """The shipped detector, trained on zoomed real films, boxes the shared feet faintly; the gate refuses such a box.

    The boxes here are put on real films by hand, so each confidence on each side of the gate can be shown.
    """
    import dataclasses

    def graded(name: str, box: tuple[float, float, float, float], confidence: float, **keys) -> tuple[str, str]:
        gated = dataclasses.replace(detector, config=dataclasses.replace(detector.config, **keys))
        radiograph = read_radiograph(radiographs_dir / name)
        rows = np.array([[*(v * radiograph.scale for v in box), confidence, 0]], np.float32)
        kind = gated.view_classifier.input_probabilities([gated.view_classifier.film_input(radiograph.pixels)])[0]
        detection = gated.check_quality(radiograph, gated.to_detection(radiograph, rows), kind)
        return detection.status, detection.message

    foot = (900.0, 1100.0, 1300.0, 1500.0)  # where a detector once boxed stage_1_5.jpg's foot
    assert graded("stage_1_5.jpg", foot, 0.35, no_knee_keep_conf=0.0)[0] == "ok"  # the gate off
    status, message = graded("stage_1_5.jpg", foot, 0.35)  # on by default, at 0.6
    assert status == "no_knee" and message.startswith("no knee in image (view classifier: no knee 1.00")
    assert graded("stage_1_5.jpg", foot, 0.7, no_knee_keep_conf=0.6)[0] == "ok"  # a surer box outweighs it
    _, knee = annotations["bilateral_0.png"]["joints"][0]
    assert graded("bilateral_0.png", knee, 0.35, no_knee_keep_conf=0.6)[0] == "ok"  # read as an AP knee
