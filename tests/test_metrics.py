"""Grading metrics against values worked out by hand."""

import numpy as np
import pytest

from kneepipe.metrics import expected_calibration_error, format_metrics, grading_metrics


def test_metrics_match_a_hand_computed_example():
    true = np.array([0, 0, 1, 2, 4])
    predicted = np.array([0, 1, 1, 2, 2])
    probabilities = np.eye(5)[predicted] * 0.6 + 0.1  # confidence 0.7 on the predicted grade
    m = grading_metrics(true, probabilities)
    assert m["confusion_matrix"] == [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
    ]
    assert m["accuracy"] == 0.6
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 0 + 2) / 5)
    # QWK by its definition: 1 - sum(w*O) / sum(w*E), w = (i-j)^2 / (K-1)^2.
    observed = np.array(m["confusion_matrix"], dtype=float)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = np.subtract.outer(np.arange(5), np.arange(5)) ** 2 / 16
    assert m["qwk"] == pytest.approx(1 - (w * observed).sum() / (w * expected).sum(), abs=1e-4)
    assert m["recall"] == [0.5, 1.0, 1.0, None, 0.0]
    assert m["precision"] == [1.0, 0.5, 0.5, None, None]
    assert m["true_counts"] == [2, 1, 1, 0, 1]
    assert m["predicted_counts"] == [1, 2, 2, 0, 0]
    # Every confidence is 0.7 in one bin whose accuracy is 0.6.
    assert m["ece"] == pytest.approx(0.1, abs=1e-4)
    assert "KL4" in format_metrics(m)


def test_ece_is_zero_when_confidence_equals_accuracy():
    probabilities = np.tile([0.5, 0.5, 0, 0, 0], (4, 1))
    assert expected_calibration_error(probabilities, np.array([0, 0, 1, 1])) == pytest.approx(0.0)


def test_ece_scores_the_grade_the_decision_rule_gave():
    # Torn between KL0 and KL2: the median rule grades KL1, whose probability is 0.1.
    probabilities = np.array([[0.45, 0.1, 0.45, 0.0, 0.0]] * 10)
    median = np.ones(10, dtype=int)
    true = np.ones(10, dtype=int)  # KL1 every time: the grades are all right at a confidence of 0.1
    assert grading_metrics(true, probabilities, median)["ece"] == pytest.approx(0.9)
    assert expected_calibration_error(probabilities, true) == pytest.approx(0.45)  # arg-max: KL0, wrong, at 0.45
