"""The shipped grader on real val crops: clearly better than chance, and self-describing."""

import pytest

from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.predict import DEFAULT_GRADER, Grader
from kneepipe.metrics import grading_metrics

pytestmark = pytest.mark.slow

PER_GRADE = 20


@pytest.fixture(scope="module")
def balanced_val(oai_dir):
    """20 real val crops of each KL grade (100 knees; chance accuracy 0.2, chance QWK 0)."""
    paths, grades = labelled_files(oai_dir / "val")
    chosen = [i for g in range(5) for i in [j for j, k in enumerate(grades) if k == g][:PER_GRADE]]
    return load_crops([paths[i] for i in chosen], [grades[i] for i in chosen])


def test_shipped_grader_clearly_beats_chance_on_real_val_crops(balanced_val):
    grader = Grader.load()
    probabilities = grader.predict_proba(balanced_val.crops)
    metrics = grading_metrics(balanced_val.kl_grades, probabilities, grader.decide(probabilities))
    assert metrics["accuracy"] > 0.4, metrics
    assert metrics["qwk"] > 0.6, metrics
    assert metrics["mae"] < 0.8, metrics
    # No collapse: every grade is predicted for some knee.
    assert min(metrics["predicted_counts"]) > 0, metrics


def test_shipped_grader_carries_its_preprocessing_and_calibration():
    grader = Grader.load()
    pre = grader.preprocessing
    assert DEFAULT_GRADER.stat().st_size < 60 * 1024 * 1024
    assert pre.crop_size == 224 and 71 <= pre.input_size <= 224
    assert pre.temperature != 1.0  # fitted on val
    assert pre.decision in ("argmax", "median")
    assert sum(pre.train_prior) == pytest.approx(1.0)
