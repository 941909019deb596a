"""Honest ordinal metrics for KL grading.

Accuracy alone hides the failure kneepipe exists to expose (a grader that follows its
training prior), so every evaluation reports the ordinal agreement (quadratic weighted
kappa, mean absolute error), per-grade recall and precision, the confusion matrix,
calibration (expected calibration error) and the true vs. predicted grade counts.

>>> import numpy as np
>>> m = grading_metrics(np.array([0, 1, 2]), np.eye(5)[[0, 1, 1]])
>>> m["accuracy"], m["predicted_counts"]
(0.6667, [1, 2, 0, 0, 0])
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from kneepipe import KL_GRADES


def expected_calibration_error(
    probabilities: np.ndarray, true_grades: np.ndarray, bins: int = 15, predicted: np.ndarray | None = None
) -> float:
    """Expected calibration error of the grade given, in equal-width bins of its probability.

    ECE = sum over bins of (bin size / n) * |accuracy in bin - mean confidence in bin|, where
    a knee's confidence is the probability of the grade it was given: ``predicted`` (the
    grader's decision rule, e.g. the median), the arg-max when not given.

    >>> p = np.array([[0.45, 0.1, 0.45, 0.0, 0.0]])
    >>> expected_calibration_error(p, np.array([1]), predicted=np.array([1]))  # median rule: KL1 at 0.1
    0.9
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=int)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    correct = predicted == np.asarray(true_grades)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of 0 joins bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def grading_metrics(
    true_grades: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray | None = None, ece_bins: int = 15
) -> dict[str, Any]:
    """All grading metrics of a labelled batch, as a JSON-ready dict.

    Args:
        true_grades: ``(n,)`` true KL grades 0-4.
        probabilities: ``(n, 5)`` predicted grade probabilities.
        predicted: ``(n,)`` the predicted grades; the arg-max of ``probabilities`` if not given.
        ece_bins: number of equal-width bins for the expected calibration error.
    """
    true_grades = np.asarray(true_grades, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=int)
    labels = list(KL_GRADES)
    matrix = confusion_matrix(true_grades, predicted, labels=labels)
    true_counts = matrix.sum(axis=1)
    predicted_counts = matrix.sum(axis=0)
    diagonal = np.diag(matrix)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(true_counts > 0, diagonal / np.maximum(true_counts, 1), np.nan)
        precision = np.where(predicted_counts > 0, diagonal / np.maximum(predicted_counts, 1), np.nan)
    n = int(len(true_grades))
    qwk = cohen_kappa_score(true_grades, predicted, labels=labels, weights="quadratic") if n else float("nan")

    def rounded(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 4)

    return {
        "n": n,
        "accuracy": rounded((predicted == true_grades).mean()) if n else None,
        "qwk": rounded(qwk),
        "mae": rounded(np.abs(predicted - true_grades).mean()) if n else None,
        "ece": rounded(expected_calibration_error(probabilities, true_grades, ece_bins, predicted)) if n else None,
        "recall": [rounded(r) for r in recall],
        "precision": [rounded(p) for p in precision],
        "confusion_matrix": matrix.tolist(),
        "true_counts": true_counts.tolist(),
        "predicted_counts": predicted_counts.tolist(),
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short plain-text table of :func:`grading_metrics`, counts side by side first."""
    lines = [
        f"n={metrics['n']}  accuracy={metrics['accuracy']}  QWK={metrics['qwk']}  "
        f"MAE={metrics['mae']}  ECE={metrics['ece']}",
        "",
        "grade   true  predicted   recall  precision",
    ]
    for grade in KL_GRADES:
        recall, precision = metrics["recall"][grade], metrics["precision"][grade]
        lines.append(
            f"KL{grade}  {metrics['true_counts'][grade]:>7} {metrics['predicted_counts'][grade]:>10}"
            f"   {'-' if recall is None else f'{recall:.3f}':>6}  {'-' if precision is None else f'{precision:.3f}':>9}"
        )
    lines += ["", "confusion matrix (rows true KL0-4, columns predicted KL0-4):"]
    lines += ["  " + " ".join(f"{v:>5}" for v in row) for row in metrics["confusion_matrix"]]
    return "\n".join(lines)
