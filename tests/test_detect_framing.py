"""Crop framing and the compositor: the geometry the grader's crops depend on."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from kneepipe.detect.framing import crop_joint, square_box
from kneepipe.joints import SIDES
from kneepipe.training.compose import compose_dataset, find_crops


def test_square_box_keeps_centre_and_averages_sides():
    assert square_box((10, 10, 30, 50)) == (5.0, 15.0, 35.0, 45.0)


def test_square_box_undoes_clipping_at_the_image_border():
    # A 100 px knee cut by the left border comes back 60 px wide from the detector.
    assert square_box((0, 50, 60, 150), image_size=(400, 300)) == (-40.0, 50.0, 60.0, 150.0)
    assert square_box((340, 50, 400, 150), image_size=(400, 300)) == (340.0, 50.0, 440.0, 150.0)
    assert square_box((100, 240, 200, 300), image_size=(400, 300)) == (100.0, 240.0, 200.0, 340.0)


def test_crop_joint_cuts_resizes_and_pads_with_edge_values():
    image = np.zeros((100, 200), np.uint8)
    image[:, :100] = 50
    image[:, 100:] = 200
    crop = crop_joint(image, (50, 0, 150, 100), size=224)
    assert crop.shape == (224, 224) and crop.dtype == np.uint8
    assert crop[:, :100].max() == 50 and crop[:, 124:].min() == 200
    # Half the square lies left of the image: filled with the edge column (50), not black.
    edge = crop_joint(image, (-50, 0, 50, 100), size=100)
    assert edge.min() == 50


def test_crop_joint_refuses_a_box_off_the_image():
    with pytest.raises(ValueError, match="outside"):
        crop_joint(np.zeros((50, 50), np.uint8), (100, 100, 140, 140))


@pytest.fixture(scope="module")
def composites(tmp_path_factory, oai_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("composites")
    compose_dataset(oai_dir / "val", out, count=8, seed=3)
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def test_composite_boxes_cut_back_the_source_crop(composites: Path, oai_dir: Path):
    """Cropping a composite at its labelled box gives back the OAI crop (the framing)."""
    with (composites / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "side", "kl_grade", "x1", "y1", "x2", "y2", "source_crop"]
    sources = {crop.path.name: crop for crop in find_crops(oai_dir / "val")}
    same, mirrored_right = [], 0
    for row in rows:
        image = cv2.imread(str(composites / "images" / row["image"]), cv2.IMREAD_GRAYSCALE)
        box = tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        assert box[2] - box[0] == pytest.approx(box[3] - box[1], abs=0.2)
        cut = crop_joint(image, box, size=224)
        source = sources[row["source_crop"]]
        original = cv2.imread(str(source.path), cv2.IMREAD_GRAYSCALE)
        assert int(row["kl_grade"]) == source.kl_grade
        mirrored = row["side"] != source.side  # a mirrored crop swaps its side label
        expected = original[:, ::-1] if mirrored else original
        other = original if mirrored else original[:, ::-1]
        same.append(_correlation(cut, expected))
        mirrored_right += _correlation(cut, expected) > _correlation(cut, other)
    assert np.median(same) > 0.8
    assert mirrored_right >= 0.9 * len(rows)


def test_bilateral_composites_put_the_right_knee_on_the_image_left(composites: Path):
    bilateral = 0
    for label_file in (composites / "labels").glob("*.txt"):
        rows = [line.split() for line in label_file.read_text().splitlines() if line]
        assert all(int(row[0]) in (0, 1) for row in rows)
        if len(rows) == 2:
            bilateral += 1
            by_x = sorted(rows, key=lambda row: float(row[1]))
            assert [SIDES[int(row[0])] for row in by_x] == ["R", "L"]
    assert bilateral > 0


def test_a_faithful_composite_keeps_the_crops_pixels_in_their_boxes(oai_dir: Path):
    """The end-to-end benchmark's films: cut back at the true boxes, the crops come back as they were."""
    from kneepipe.training.compose import _read_crop, compose_radiograph

    crops = find_crops(oai_dir / "val")
    by_patient: dict[str, list] = {}
    for crop in crops:
        by_patient.setdefault(crop.patient_id, []).append(crop)
    pairs = [sorted(knees, key=lambda c: c.side) for knees in by_patient.values() if len(knees) == 2][:6]
    rng = np.random.default_rng(0)
    errors = []
    for pair in pairs:
        knees = [(_read_crop(c), c.side, c.kl_grade, c.path) for c in pair]
        image, placed = compose_radiograph(rng, knees, long_side=int(rng.integers(1100, 1500)), faithful=True)
        assert [k.side for k in sorted(placed, key=lambda k: k.box[0])] == ["R", "L"]
        for knee in placed:
            original = next(crop for crop, _, _, path in knees if path == knee.source)
            cut = crop_joint(image, knee.box, size=224).astype(float)
            errors.append(np.abs(cut - original).mean())
    # Resampling to the box size and back costs a grey level or two, nothing more.
    assert max(errors) < 3.0, errors


def test_scale_variety_frames_knees_small_and_filling_the_film_and_leaves_other_seeds_alone(oai_dir: Path, tmp_path):
    """Scale variety adds small-knee and frame-filling films; at 0 a seed still gives the usual films."""
    usual, varied = tmp_path / "usual", tmp_path / "varied"
    compose_dataset(oai_dir / "val", usual, count=30, seed=5)
    compose_dataset(oai_dir / "val", varied, count=30, seed=5, scale_variety=1.0)

    def widths(folder: Path) -> list[float]:  # each knee's box width as a share of its film's width
        shares = []
        for label_file in (folder / "labels").glob("*.txt"):
            shares += [float(line.split()[3]) for line in label_file.read_text().splitlines() if line]
        return shares

    again = tmp_path / "again"
    compose_dataset(oai_dir / "val", again, count=30, seed=5, scale_variety=0.0)
    assert (again / "labels.csv").read_text() == (usual / "labels.csv").read_text()
    usual_widths, varied_widths = widths(usual), widths(varied)
    assert min(usual_widths) > 0.2 and max(usual_widths) < 0.8
    assert sum(w < 0.2 for w in varied_widths) >= 5 and sum(w > 0.77 for w in varied_widths) >= 2


def test_exposure_variety_washes_films_out(oai_dir: Path, tmp_path):
    """Washed-out composites: the soft tissue and background are lifted towards the bone's grey."""
    usual, washed = tmp_path / "usual", tmp_path / "washed"
    compose_dataset(oai_dir / "val", usual, count=12, seed=2)
    compose_dataset(oai_dir / "val", washed, count=12, seed=2, exposure_variety=1.0)

    def median_grey(folder: Path) -> float:
        return float(np.median([np.median(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in folder.glob("images/*")]))

    assert median_grey(washed) > median_grey(usual) + 30
