"""The training package's commands: every entry point is a `kneepipe` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import ANNOTATIONS
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG
from kneepipe.training.grader_torch import read_pack


def test_train_pack_writes_a_crop_pack(oai_dir, tmp_path):
    for part in ("train", "val"):
        for grade in range(5):
            folder = tmp_path / "crops" / part / str(grade)
            folder.mkdir(parents=True)
            for path in sorted((oai_dir / part / str(grade)).iterdir())[:2]:
                shutil.copy(path, folder / path.name)
    result = CliRunner().invoke(app, ["train", "pack", str(tmp_path / "crops"), "--out", str(tmp_path / "p.npz")])
    assert result.exit_code == 0, result.output
    crops, grades = read_pack(tmp_path / "p.npz", "val")
    assert crops.shape == (10, 224, 224) and np.bincount(grades).tolist() == [2] * 5


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--backend", "torch"], "--backend torch needs --pack"),
        (["--pack", "p.npz", "--minutes", "1"], "--pack and --minutes are options of --backend torch"),
    ],
)
def test_train_grader_names_the_options_a_backend_needs(tmp_path, arguments, words):
    result = CliRunner().invoke(app, ["train", "grader", "--out", str(tmp_path / "run"), *arguments])
    assert result.exit_code == EXIT_CONFIG and words in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_training_without_data_says_which_key_to_set(tmp_path):
    result = CliRunner().invoke(app, ["train", "grader", "--out", str(tmp_path / "run"), "epochs=1"])
    assert result.exit_code != 0 and "no training data: set data" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluate_detector_prints_the_model_cards_real_film_figures(radiographs_dir, tmp_path):
    out = tmp_path / "figures.json"
    arguments = ["--radiographs", str(radiographs_dir), "--annotations", str(ANNOTATIONS), "--out", str(out)]
    result = CliRunner().invoke(app, ["evaluate", "detector", *arguments])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    real = figures["radiographs"]
    assert figures["detector"].startswith("detector.pt@") and "val_composites" not in figures
    assert real["ap_joints"] == 20 and real["found_iou50"] == 20 and real["side_correct"] == 20  # DETECTOR.md
    assert real["without_ok_status"] == len(real["lateral_and_bad_exposure_status"]) == 14
