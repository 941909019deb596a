"""Batch-norm statistics re-estimated on a batch (AdaBN): the grades depend on which crops, not on their order."""

from __future__ import annotations

import numpy as np
import pytest

from kneepipe.config import load_config
from kneepipe.grade import folder
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.features import content_key
from kneepipe.grade.folder import grade_crops
from kneepipe.grade.predict import Grader


@pytest.fixture(scope="module")
def clinic(shared_data):
    paths, grades = labelled_files(shared_data / "clinic-kl" / "dev")
    return paths[::5], load_crops(paths[::5], grades[::5]).crops  # 67 knees of another clinic: the score warns


@pytest.mark.slow
def test_a_batch_graded_with_its_own_statistics_grades_the_same_in_any_order(clinic, monkeypatch):
    """67 real crops of another clinic, graded with statistics of a 48-crop sample of them (two
    batches), then the same crops shuffled: each crop gets the same logits."""
    _, crops = clinic
    monkeypatch.setattr(folder, "BATCH_NORM_SAMPLE", 48)
    grader = Grader.load(runtime="openvino")
    config = load_config(GradeConfig, overrides={"mirror_average": "never"})
    forward, shift = grade_crops(grader, crops, config)
    assert shift["shift_warning"] and shift["batch_norm"] == "re-estimated on 48 crops of this batch"
    order = np.random.default_rng(1).permutation(len(crops))
    shuffled, _ = grade_crops(grader, [crops[i] for i in order], config)
    np.testing.assert_allclose(shuffled, forward[order], atol=1e-5)
    assert np.abs(forward - grader.predict_logits(crops)).max() > 1e-2  # the batch's statistics did change them


def test_the_sample_for_batch_statistics_is_the_same_whatever_the_order_of_the_files(clinic, monkeypatch):
    paths, _ = clinic
    files = paths[:20]
    monkeypatch.setattr(folder, "BATCH_NORM_SAMPLE", 8)
    grader = Grader.load(runtime="openvino")
    config = load_config(GradeConfig)
    root = files[0].parents[1]
    samples = [folder._grade_files(order, root, grader, config, None)[4] for order in (files, files[::-1])]
    keys = [sorted(content_key(crop) for crop in sample) for sample in samples]
    assert len(keys[0]) == 8 and keys[0] == keys[1]
