"""Temperature scaling and label-shift adaptation on synthetic graders whose truth is known."""

import numpy as np
import pytest

from kneepipe.grade.calibration import apply_temperature, fit_temperature, temperature_nll
from kneepipe.grade.folder import adjust_for_prior, prior_summary
from kneepipe.grade.prior import estimate_prior_em, parse_prior, prior_shift_test, resample_to_counts, reweight
from kneepipe.metrics import expected_calibration_error

# The clinic of the issue: 63/199/139/84/46 knees of KL 0-4.
CLINIC_COUNTS = np.array([63, 199, 139, 84, 46])
# The OAI-KL224 train split's grade distribution.
TRAIN_COUNTS = np.array([2286, 1046, 1516, 757, 173])


def _gaussian_grader(train_prior: np.ndarray, n: int, seed: int, noise: float = 1.0):
    """Knees with a 1-D feature x ~ N(grade, noise); their exact posterior under ``train_prior``.

    The posterior is calibrated by construction for a batch drawn with ``train_prior``.
    """
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n, p=train_prior)
    x = grades + rng.normal(0.0, noise, size=n)
    log_likelihood = -0.5 * ((x[:, None] - np.arange(5)[None, :]) / noise) ** 2
    logits = log_likelihood + np.log(train_prior)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return grades, probabilities / probabilities.sum(axis=1, keepdims=True)


def test_temperature_scaling_lowers_ece_of_an_overconfident_grader():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    grades, calibrated = _gaussian_grader(train_prior, 4000, seed=1)
    overconfident = apply_temperature(calibrated, 1 / 3)  # logits tripled
    ece_before = expected_calibration_error(overconfident, grades)
    temperature = fit_temperature(overconfident, grades)
    recalibrated = apply_temperature(overconfident, temperature)
    ece_after = expected_calibration_error(recalibrated, grades)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert ece_before > 0.1
    assert ece_after < 0.03
    assert ece_after < ece_before / 3
    # Accuracy is untouched: temperature scaling never changes the arg-max.
    assert (recalibrated.argmax(1) == overconfident.argmax(1)).all()
    assert temperature_nll(overconfident, grades, temperature) < temperature_nll(overconfident, grades, 1.0)


def test_fit_temperature_accepts_logits_and_log_probabilities_alike():
    grades, probabilities = _gaussian_grader(np.full(5, 0.2), 2000, seed=2)
    logits = np.log(probabilities) * 2.5 + 7.0  # an overconfident logit vector, shifted per row
    from_logits = fit_temperature(logits, grades)
    from_probabilities = fit_temperature(apply_temperature(logits, 1.0), grades)
    assert from_logits == pytest.approx(from_probabilities, rel=1e-3)
    assert from_logits == pytest.approx(2.5, rel=0.1)


def test_apply_temperature_one_is_identity_and_rejects_bad_temperature():
    _, probabilities = _gaussian_grader(np.full(5, 0.2), 50, seed=3)
    np.testing.assert_allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-9)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(probabilities, 0.0)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((3, 4)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="KL grades"):
        fit_temperature(np.zeros((2, 5)), np.array([0, 7]))
    with pytest.raises(ValueError, match="zero crops"):
        fit_temperature(np.zeros((0, 5)), np.array([], dtype=int))


def test_em_recovers_a_known_prior_on_a_synthetic_resample():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    # A grader about 78% accurate; the clinic's proportions at four times its 531 knees, so
    # the EM's own sampling error (about 0.03 at most over 20 seeds) stays below the tolerance.
    grades, probabilities = _gaussian_grader(train_prior, 20000, seed=4, noise=0.5)
    clinic = resample_to_counts(grades, CLINIC_COUNTS * 4, seed=0)
    assert np.bincount(grades[clinic], minlength=5).tolist() == (CLINIC_COUNTS * 4).tolist()
    prior, adjusted = estimate_prior_em(probabilities[clinic], train_prior)
    true_prior = CLINIC_COUNTS / CLINIC_COUNTS.sum()
    assert np.abs(train_prior - true_prior).max() > 0.25  # the shift to undo is large
    assert np.abs(prior - true_prior).max() < 0.04
    assert prior.sum() == pytest.approx(1.0)
    # Grading with the recovered prior beats grading with the training prior on this batch.
    accuracy_plain = (probabilities[clinic].argmax(1) == grades[clinic]).mean()
    accuracy_adapted = (adjusted.argmax(1) == grades[clinic]).mean()
    assert accuracy_adapted > accuracy_plain + 0.03


def test_em_leaves_a_batch_drawn_with_the_training_prior_nearly_alone():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    grades, probabilities = _gaussian_grader(train_prior, 5000, seed=5, noise=0.5)
    prior, adjusted = estimate_prior_em(probabilities, train_prior)
    assert np.abs(prior - train_prior).max() < 0.04
    agreement = (adjusted.argmax(1) == probabilities.argmax(1)).mean()
    assert agreement > 0.97


def test_pseudo_knees_hold_the_em_estimate_towards_the_training_mix_and_fade_with_the_batch():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    # KL0 and KL1 overlap as they do on real crops (noise 1.0); the batch is the clinic's mix.
    grades, probabilities = _gaussian_grader(train_prior, 20000, seed=4)
    clinic = probabilities[resample_to_counts(grades, CLINIC_COUNTS, seed=0)]
    ml, _ = estimate_prior_em(clinic, train_prior)
    np.testing.assert_allclose(estimate_prior_em(clinic, train_prior, concentration=0.0)[0], ml)
    held, _ = estimate_prior_em(clinic, train_prior, concentration=20)
    # The estimate stays nearer the training mix than the maximum-likelihood one, and the share
    # that estimate cut hardest (KL0, which overlaps KL1) is cut less.
    assert np.abs(held - train_prior).sum() < 0.7 * np.abs(ml - train_prior).sum()
    assert int(np.argmin(ml - train_prior)) == 0 and ml[0] < held[0] < train_prior[0]
    assert held.sum() == pytest.approx(1.0)
    # A fixed number of pseudo-knees weighs less in a larger batch of the same mix.
    larger = probabilities[resample_to_counts(grades, CLINIC_COUNTS * 8, seed=0)]
    ml_large, _ = estimate_prior_em(larger, train_prior)
    held_large, _ = estimate_prior_em(larger, train_prior, concentration=20)
    assert np.abs(held_large - ml_large).max() < np.abs(held - ml).max() / 3
    # Overwhelming pseudo-knees leave the training mix in place.
    np.testing.assert_allclose(estimate_prior_em(clinic, train_prior, concentration=1e9)[0], train_prior, atol=1e-5)
    with pytest.raises(ValueError, match="concentration"):
        estimate_prior_em(clinic, train_prior, concentration=-1)


def test_reweight_with_equal_priors_is_identity_and_follows_bayes_rule():
    _, probabilities = _gaussian_grader(np.full(5, 0.2), 100, seed=6)
    prior = np.array([0.1, 0.4, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(reweight(probabilities, prior, prior), probabilities, atol=1e-12)
    shifted = reweight(probabilities, np.full(5, 0.2), prior)
    expected = probabilities * prior / (probabilities * prior).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(shifted, expected, atol=1e-12)
    with pytest.raises(ValueError, match="zero entry"):
        reweight(probabilities, np.array([0.5, 0.5, 0, 0, 0]), prior)


def test_parse_prior_normalises_and_explains_errors():
    np.testing.assert_allclose(parse_prior("0.1,0.4,0.25,0.15,0.1"), [0.1, 0.4, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(parse_prior(" 63, 199,139 ,84,46"), CLINIC_COUNTS / CLINIC_COUNTS.sum())
    with pytest.raises(ValueError, match="5 comma-separated numbers"):
        parse_prior("0.5,0.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_prior("0.1,0.4,x,0.15,0.1")
    with pytest.raises(ValueError, match="non-negative"):
        parse_prior("0.1,0.4,-0.25,0.15,0.1")
    with pytest.raises(ValueError, match="all zero"):
        parse_prior("0,0,0,0,0")


def test_resample_to_counts_draws_with_replacement_only_where_a_grade_runs_short():
    grades = np.array([0] * 10 + [1] * 2 + [2] * 5 + [3] * 5 + [4] * 5)
    indices = resample_to_counts(grades, np.array([4, 6, 0, 1, 1]), seed=3)
    assert np.bincount(grades[indices], minlength=5).tolist() == [4, 6, 0, 1, 1]
    kl0 = indices[grades[indices] == 0]
    assert len(set(kl0.tolist())) == 4  # enough KL0 knees: no repeats
    assert (resample_to_counts(grades, np.array([4, 6, 0, 1, 1]), seed=3) == indices).all()
    with pytest.raises(ValueError, match="has none"):
        resample_to_counts(np.array([0, 1]), np.array([0, 0, 1, 0, 0]))


def test_bias_corrected_scaling_restores_an_underpredicted_grade():
    from kneepipe.grade.calibration import fit_temperature_and_bias
    from kneepipe.grade.model import probabilities_from_logits

    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, size=2000)
    logits = np.eye(5)[grades] * 3.0 + rng.normal(0, 1.0, size=(2000, 5))
    logits[:, 1] -= 2.5  # a network that rarely says KL1
    before = probabilities_from_logits(logits, "softmax").argmax(axis=1)
    temperature, bias = fit_temperature_and_bias(logits, grades)
    after = probabilities_from_logits(logits, "softmax", temperature, bias).argmax(axis=1)
    assert (before == 1).sum() < 0.5 * (grades == 1).sum()
    assert abs((after == 1).sum() - (grades == 1).sum()) < 0.2 * (grades == 1).sum()
    assert bias[1] > 1.5 and abs(bias.sum()) < 1e-6


def _prior_config(**overrides):
    from kneepipe.config import load_config
    from kneepipe.grade.config import GradeConfig

    return load_config(GradeConfig, None, {"adapt_prior": True, **overrides})


def test_likelihood_ratio_test_separates_a_real_shift_from_batch_noise():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    # Noise 1.0: neighbouring grades overlap as KL0 and KL1 do, so EM's estimate on an
    # unshifted batch of val's size wanders; the test must call that noise.
    p_values = []
    for seed in range(20):
        _, probabilities = _gaussian_grader(train_prior, 826, seed=100 + seed)
        prior, _ = estimate_prior_em(probabilities, train_prior)
        p_values.append(prior_shift_test(probabilities, train_prior, prior)[1])
    assert sum(p < 0.01 for p in p_values) <= 1  # about 1 in 100 expected under no shift
    grades, probabilities = _gaussian_grader(train_prior, 20000, seed=4)
    clinic = resample_to_counts(grades, CLINIC_COUNTS, seed=0)
    prior, _ = estimate_prior_em(probabilities[clinic], train_prior)
    statistic, p_value = prior_shift_test(probabilities[clinic], train_prior, prior)
    assert p_value < 1e-6 and statistic > 30


def test_adjust_for_prior_applies_the_em_prior_only_for_a_significant_shift():
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    grades, probabilities = _gaussian_grader(train_prior, 20000, seed=4)
    unshifted = probabilities[:826]
    kept, facts = adjust_for_prior(unshifted, train_prior, _prior_config())
    assert facts["prior_test"]["applied"] is False and facts["prior_test"]["n"] == 826
    np.testing.assert_array_equal(kept, unshifted)
    assert "no significant shift" in prior_summary(facts)
    # alpha 1.0 always applies the estimate, whatever the test says.
    forced, facts = adjust_for_prior(unshifted, train_prior, _prior_config(adapt_prior_alpha=1.0))
    assert facts["prior_test"]["applied"] is True and not np.array_equal(forced, unshifted)

    clinic = resample_to_counts(grades, CLINIC_COUNTS, seed=0)
    adjusted, facts = adjust_for_prior(probabilities[clinic], train_prior, _prior_config())
    assert facts["prior_test"]["applied"] is True
    assert "shift significant" in prior_summary(facts)
    assert facts["prior_pseudo_knees"] == 30 and "(MAP, 30 pseudo-knees at the training mix)" in prior_summary(facts)
    accuracy_plain = (probabilities[clinic].argmax(1) == grades[clinic]).mean()
    assert (adjusted.argmax(1) == grades[clinic]).mean() > accuracy_plain
    # This grader's neighbouring grades overlap widely, so the pseudo-knees hold most of the gain
    # back; the maximum-likelihood estimate takes it all.
    ml, _ = adjust_for_prior(probabilities[clinic], train_prior, _prior_config(adapt_prior_concentration=0))
    assert (ml.argmax(1) == grades[clinic]).mean() > accuracy_plain + 0.03
    # A known prior is applied as given, with no test.
    given, facts = adjust_for_prior(unshifted, train_prior, _prior_config(adapt_prior=False, prior="1,1,1,1,1"))
    assert "prior_test" not in facts and not np.array_equal(given, unshifted)


def test_adapt_prior_declines_a_batch_whose_shift_score_warns():
    """A significant EM estimate is applied on a quiet batch and declined, with the reason, when its images shifted."""
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    grades, probabilities = _gaussian_grader(train_prior, 20000, seed=4)
    clinic = probabilities[resample_to_counts(grades, CLINIC_COUNTS, seed=0)]
    quiet = {"shift_score": 0.2, "shift_warn_above": 0.5, "shift_warning": False}
    adjusted, facts = adjust_for_prior(clinic, train_prior, _prior_config(), shift=quiet)
    assert facts["prior_test"]["applied"] is True and not np.array_equal(adjusted, clinic)
    warns = {"shift_score": 1.9, "shift_warn_above": 0.5, "shift_warning": True}
    kept, facts = adjust_for_prior(clinic, train_prior, _prior_config(), shift=warns)
    np.testing.assert_array_equal(kept, clinic)
    assert facts["prior_test"]["applied"] is False and facts["prior_test"]["p_value"] < 0.01
    declined = facts["prior_test"]["declined"]
    assert "shift score 1.90 is above 0.5" in declined and "kneepipe adapt" in declined
    assert "not a pure label shift" in prior_summary(facts)


def test_adapt_prior_declines_a_runaway_estimate_with_a_reason():
    # A batch whose images changed, not its grade mix: every knee leans towards KL3-KL4,
    # so EM would put almost the whole prior on KL4 (the failure on another clinic's knees).
    train_prior = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.0, size=(300, 5)) + np.array([0.0, 0.2, 1.0, 1.6, 1.8])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    kept, facts = adjust_for_prior(probabilities, train_prior, _prior_config())
    np.testing.assert_array_equal(kept, probabilities)
    assert facts["prior_test"]["applied"] is False
    assert "labelled sample" in facts["prior_test"]["declined"]
    assert "not a pure label shift" in prior_summary(facts)
    assert "KL4" in facts["prior_test"]["declined"] and "training share" in facts["prior_test"]["declined"]
    # Without the guard (alpha alone decides) EM would have regraded this batch.
    assert facts["prior_test"]["p_value"] < 0.01
