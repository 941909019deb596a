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


def test_prior_guard_declines_on_another_clinic_and_adapts_on_a_label_shift(oai_dir, shared_data):
    """Real crops, graded as ``kneepipe grade`` does: EM is declined on another clinic's knees (its
    images differ), but regrades a pure label shift of val."""
    import numpy as np

    from kneepipe.config import load_config
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.folder import adjust_for_prior, grade_crops
    from kneepipe.grade.prior import resample_to_counts

    grader = Grader.load()  # Keras float32, as benchmarks/clinic_transfer.py measures
    config = load_config(GradeConfig, overrides={"adapt_prior": True})
    train_prior = np.asarray(grader.preprocessing.train_prior)
    decision = grader.preprocessing.decision

    clinic = load_crops(*labelled_files(shared_data / "clinic-kl" / "dev"))
    logits, shift = grade_crops(grader, clinic.crops, config)
    plain = grader.probabilities(logits)
    kept, facts = adjust_for_prior(plain, train_prior, config, decision, shift)
    assert facts["prior_test"]["p_value"] < config.adapt_prior_alpha  # EM alone would have regraded
    assert facts["prior_test"]["applied"] is False and "shift score" in facts["prior_test"]["declined"]
    assert "kneepipe adapt" in facts["prior_test"]["declined"]
    np.testing.assert_array_equal(kept, plain)

    val = load_crops(*labelled_files(oai_dir / "val"))
    shifted = resample_to_counts(val.kl_grades, np.array([63, 199, 139, 84, 46]), seed=0)
    logits, shift = grade_crops(grader, val.crops[shifted], config)
    assert not shift["shift_warning"]
    plain = grader.probabilities(logits)
    adapted, facts = adjust_for_prior(plain, train_prior, config, decision, shift)
    truth = val.kl_grades[shifted]
    assert facts["prior_test"]["applied"] is True
    gain = (grader.decide(adapted) == truth).mean() - (grader.decide(plain) == truth).mean()
    assert gain > 0.03, gain
    # KL0 is 63 of the 531 knees: the estimate's pseudo-knees keep it predicted. Without them
    # the maximum-likelihood estimate drives KL0 to no knee at all, and the guard declines it.
    assert (grader.decide(adapted) == 0).sum() > 0
    ml_config = load_config(GradeConfig, overrides={"adapt_prior": True, "adapt_prior_concentration": 0})
    kept, facts = adjust_for_prior(plain, train_prior, ml_config, decision, shift)
    assert "no knee at KL0" in facts["prior_test"]["declined"]
    np.testing.assert_array_equal(kept, plain)
