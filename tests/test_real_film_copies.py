"""Varied copies of the annotated real AP films as detector positives: boxes carried over exactly, sides swapped
with mirroring, no knee shown cut, and held-out films kept out."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ANNOTATIONS

from kneepipe.training.real_films import VISIBLE, annotated_films, film_copy, write_film_copies


def test_annotated_films_are_the_ap_films_with_their_boxes_less_the_held_out(radiographs_dir):
    films = annotated_films(ANNOTATIONS, radiographs_dir)
    names = {film.path.name for film in films}
    assert len(films) == 11 and sum(len(film.knees) for film in films) == 20
    assert {"bilateral_0.png", "arthritis_7.jpg", "stage_2_0.jpg"} <= names
    assert not names & {"arthritis_3.jpg", "stage_1_5.jpg", "arthritis_0.jpg"}  # lateral, foot, bad exposure
    assert all(film.path.is_file() for film in films)
    held_out = annotated_films(ANNOTATIONS, radiographs_dir, exclude=("stage_2_2.jpg", "arthritis_2.jpg"))
    assert {film.path.name for film in held_out} == names - {"stage_2_2.jpg", "arthritis_2.jpg"}
    with pytest.raises(ValueError, match="no annotated bilateral/single film named stage_1_5.jpg"):
        annotated_films(ANNOTATIONS, radiographs_dir, exclude=("stage_1_5.jpg",))


def _film_with_marked_knees() -> tuple[np.ndarray, tuple[tuple[str, tuple[float, ...]], ...]]:
    """A 1500x1000 film with two knees as on a standing AP film (right knee on the image's left), each a bright disc
    at its box's centre with a dark notch towards the film's middle."""
    film = np.full((1000, 1500), 60, np.uint8)
    knees = (("R", (200.0, 350.0, 500.0, 650.0)), ("L", (1000.0, 360.0, 1300.0, 660.0)))
    for _, (x1, y1, x2, y2) in knees:
        cv2.circle(film, (round((x1 + x2) / 2), round((y1 + y2) / 2)), 60, 250, -1)
    return film, knees


def test_copies_carry_each_box_exactly_and_swap_sides_when_mirrored():
    film, knees = _film_with_marked_knees()
    rng = np.random.default_rng(3)
    sizes, both = [], 0
    for _ in range(60):
        image, placed = film_copy(film, knees, rng)
        assert max(image.shape) == 768
        for side, (x1, y1, x2, y2) in placed:
            assert side in ("R", "L") and x2 - x1 == pytest.approx(y2 - y1)  # square, as the grader's crops
            sizes.append((x2 - x1) / image.shape[1])
            # The disc drawn at the box's centre lies at the carried-over box's centre (within resampling).
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            x, y = int(np.clip(cx, 0, image.shape[1] - 1)), int(np.clip(cy, 0, image.shape[0] - 1))
            if 0 <= cx < image.shape[1] and 0 <= cy < image.shape[0]:
                assert image[y, x] > 150, "a labelled box is not centred on its knee"
            # No knee is labelled that lies less than VISIBLE inside the copy.
            inside = (min(x2, image.shape[1]) - max(x1, 0)) * (min(y2, image.shape[0]) - max(y1, 0))
            assert inside >= VISIBLE * (x2 - x1) * (y2 - y1) - 1e-6
        if len(placed) == 2:
            both += 1
            boxes = dict(placed)
            # Mirrored or not, the right knee of a standing AP film lies on the image's left.
            assert boxes["R"][0] < boxes["L"][0]
    assert both >= 5
    assert min(sizes) < 0.3 and max(sizes) > 0.7  # knees from small on the film to filling it


def test_copies_of_a_real_film_are_written_with_valid_labels(tmp_path, radiographs_dir):
    films = [film for film in annotated_films(ANNOTATIONS, radiographs_dir) if film.path.name == "stage_1_3.jpg"]
    written = write_film_copies(films, tmp_path, copies=6, rng=np.random.default_rng(0))
    images = sorted((tmp_path / "images" / "train").glob("real_stage_1_3_*.jpg"))
    labels = sorted((tmp_path / "labels" / "train").glob("real_stage_1_3_*.txt"))
    assert written == 6 and len(images) == 6 and [p.stem for p in labels] == [p.stem for p in images]
    knees = 0
    for image_path, label_path in zip(images, labels, strict=True):
        image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
        assert image is not None and max(image.shape) == 768
        for line in label_path.read_text().splitlines():
            cls, *box = line.split()
            assert cls in ("0", "1") and all(0.0 <= float(v) <= 1.0 for v in box)
            knees += 1
    assert 6 <= knees <= 12  # every copy shows at least the knee it was cut around


def test_a_training_run_names_the_annotated_films_it_needs(tmp_path, oai_dir):
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.training.detector import build_dataset

    config = load_config(DetectConfig, overrides={"train_crops": str(oai_dir), "real_copies": 2, "train_images": 2})
    with pytest.raises(FileNotFoundError, match="real_copies: name train_annotations and train_radiographs"):
        build_dataset(config, Path(tmp_path / "dataset"))


def test_lateral_and_foot_films_give_background_copies_cut_anywhere(tmp_path, radiographs_dir):
    films = annotated_films(ANNOTATIONS, radiographs_dir, kinds=("lateral", "foot"))
    assert len(films) == 14 and all(not film.knees for film in films)
    feet = [film for film in films if film.path.name == "stage_1_5.jpg"]
    pixels = feet[0].pixels()
    rng = np.random.default_rng(1)
    shares = []
    for _ in range(20):
        image, placed = film_copy(pixels, feet[0].knees, rng)
        assert placed == [] and max(image.shape) == 768
        shares.append(image.std())
    assert min(shares) > 5  # each copy shows the film, not an empty canvas
    assert write_film_copies(feet, tmp_path, copies=3, rng=rng) == 3
    assert all(p.read_text() == "" for p in (tmp_path / "labels" / "train").glob("real_stage_1_5_*.txt"))
