"""Training the detector: a one-epoch run at a tiny size proves the offline path."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ANNOTATIONS

from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.training.detector import background_images, train_detector


def test_background_images_are_the_annotated_lateral_and_foot_films(radiographs_dir):
    paths = background_images(ANNOTATIONS, radiographs_dir)
    names = {p.name for p in paths}
    assert {"stage_1_5.jpg", "stage_1_6.jpg", "arthritis_3.jpg"} <= names
    assert not names & {"bilateral_0.png", "arthritis_0.jpg", "arthritis_7.jpg"}
    assert all(p.is_file() for p in paths)


def test_resume_without_a_run_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no interrupted run"):
        train_detector(load_config(DetectConfig), tmp_path, resume=True)


def test_training_needs_its_data_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_crops: name the OAI crop folder"):
        train_detector(load_config(DetectConfig), tmp_path / "run")


@pytest.mark.slow
def test_one_epoch_training_writes_a_run_folder(tmp_path, oai_dir, radiographs_dir):
    config = load_config(
        DetectConfig,
        overrides={
            "train_crops": str(oai_dir),
            "train_radiographs": str(radiographs_dir),
            "train_annotations": str(ANNOTATIONS),
            "train_images": 6,
            "val_images": 2,
            "train_epochs": 1,
            "close_mosaic": 0,
            "train_imgsz": 64,
            "train_batch": 4,
            "background_copies": 1,
            "real_copies": 1,
            "real_exclude": ["stage_2_2.jpg"],
            "workers": 0,
        },
    )
    best = train_detector(config, tmp_path / "run")
    run = tmp_path / "run"
    assert best == run / "yolo" / "weights" / "best.pt" and best.is_file()
    assert (run / "yolo" / "weights" / "last.pt").is_file()
    assert (run / "yolo" / "results.csv").is_file()
    yolo_args = yaml.safe_load((run / "yolo" / "args.yaml").read_text())
    assert yolo_args["fliplr"] == 0.0 and yolo_args["plots"] is False
    assert yolo_args["pretrained"] is False
    ours = yaml.safe_load((run / "args.yaml").read_text())
    assert ours["train_images"] == 6
    data = yaml.safe_load((run / "dataset" / "data.yaml").read_text())
    assert data["names"] == {0: "right_knee", 1: "left_knee"}
    backgrounds = list((run / "dataset" / "labels" / "train").glob("background_*.txt"))
    assert backgrounds and all(p.read_text() == "" for p in backgrounds)
    # One varied copy of each annotated film: the 10 AP films left in carry knees, the laterals and feet none.
    copies = {p.stem: p.read_text() for p in (run / "dataset" / "labels" / "train").glob("real_*.txt")}
    assert len(copies) == 10 + 14 and "real_stage_2_2_000" not in copies
    assert all(copies[f"real_{name}_000"] for name in ("bilateral_0", "stage_1_3", "arthritis_7"))
    assert all(copies[f"real_{name}_000"] == "" for name in ("stage_1_5", "arthritis_3"))
    summary = json.loads((run / "dataset" / "summary.json").read_text())
    assert summary["real_film_copies"] == 24
