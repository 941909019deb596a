"""Mirror averaging: a crop's logits and its mirror image's, averaged, on real crops."""

from __future__ import annotations

import numpy as np
import pytest

from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.folder import grade_crops
from kneepipe.grade.predict import Grader


@pytest.fixture(scope="module")
def val_crops(oai_dir):
    paths, grades = labelled_files(oai_dir / "val")
    return load_crops(paths[::70], grades[::70]).crops


def test_mirror_averaged_logits_are_the_mean_of_a_crop_and_its_mirror_image(val_crops):
    grader = Grader.load(runtime="openvino")
    plain = grader.predict_logits(val_crops)
    mirrored = grader.predict_logits([crop[:, ::-1] for crop in val_crops])
    with grader.mirror_averaged():
        averaged = grader.predict_logits(val_crops)
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-4)
    assert np.abs(averaged - plain).max() > 1e-3  # a knee and its mirror image are not graded identically
    np.testing.assert_allclose(grader.predict_logits(val_crops), plain, atol=1e-5)  # restored after the block
    with grader.mirror_averaged(enabled=False):
        np.testing.assert_allclose(grader.predict_logits(val_crops), plain, atol=1e-5)


def test_mirror_average_always_is_set_from_the_config(val_crops):
    config = load_config(GradeConfig, overrides={"mirror_average": "always"})
    grader = Grader.from_config(config)
    plain = Grader.load(runtime="openvino")
    mirrored = plain.predict_logits([crop[:, ::-1] for crop in val_crops])
    expected = (plain.predict_logits(val_crops) + mirrored) / 2
    np.testing.assert_allclose(grader.predict_logits(val_crops), expected, atol=1e-4)


@pytest.mark.slow
def test_a_batch_graded_with_its_own_statistics_is_mirror_averaged_unless_told_not_to(shared_data):
    """Another clinic's knees warn, so they are graded with batch statistics; ``auto`` mirror-averages them
    there (the shipped default)."""
    paths, grades = labelled_files(shared_data / "clinic-kl" / "dev")
    clinic = load_crops(paths[::3], grades[::3]).crops  # 111 knees: above batch_norm_min_crops
    grader = Grader.load(runtime="openvino")
    logits = {}
    for choice in ("never", "auto"):
        config = load_config(GradeConfig, overrides={"mirror_average": choice})
        logits[choice], shift = grade_crops(grader, clinic, config)
        assert shift["shift_warning"] and shift["batch_norm"].startswith("re-estimated on 111 crops")
        assert ("mirror image" in shift["batch_norm"]) is (choice == "auto")
    assert np.abs(logits["auto"] - logits["never"]).max() > 1e-3
    # Too few crops to re-estimate statistics on: graded as trained, and not mirror-averaged.
    config = load_config(GradeConfig, overrides={"mirror_average": "auto"})
    few, shift = grade_crops(grader, clinic[:8], config)
    assert shift["batch_norm"] == "as trained"
    np.testing.assert_allclose(few, grader.predict_logits(clinic[:8]), atol=1e-5)
