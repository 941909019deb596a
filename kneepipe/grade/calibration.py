"""Temperature scaling: one number that makes the grader's confidence honest.

A network trained with cross-entropy is usually overconfident: its top probability
exceeds its accuracy. Temperature scaling (Guo et al., 2017) divides the logits by a
single ``T`` fitted on held-out data (``val``) by minimising the negative log-likelihood.
It leaves the arg-max, hence accuracy, unchanged, and it is what the batch-prior
adaptation of :mod:`kneepipe.grade.prior` needs: EM re-estimates a prior from
probabilities, so they must mean what they say.

Pure numpy/scipy; the fitted ``T`` is stored in the grader file's preprocessing record.

>>> import numpy as np
>>> logits = np.array([[4.0, 0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0, 0.0]] * 10)
>>> grades = np.array([0, 2] * 10)  # half of the confident answers are wrong
>>> t = fit_temperature(logits, grades)
>>> t > 1.0
True
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from kneepipe import KL_GRADES

# A probability row is recognised by non-negative entries summing to one (within this).
_ROW_SUM_TOLERANCE = 1e-3
# Probabilities are clipped here before the log so a hard zero cannot give -inf.
_MIN_PROBABILITY = 1e-12
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _as_logits(probabilities_or_logits: np.ndarray) -> np.ndarray:
    """Logits from probabilities (their log) or logits as they are.

    The softmax is shift-invariant per row, so ``log p`` is a valid logit vector and
    log-probabilities may be passed as logits.
    """
    values = np.asarray(probabilities_or_logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(KL_GRADES):
        raise ValueError(f"expected an (n, {len(KL_GRADES)}) array of grade scores, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("grade scores contain NaN or infinite values")
    is_probability = (values >= 0).all() and np.allclose(values.sum(axis=1), 1.0, atol=_ROW_SUM_TOLERANCE)
    if is_probability:
        return np.log(np.clip(values, _MIN_PROBABILITY, 1.0))
    return values


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _check_grades(true_grades: np.ndarray, n: int) -> np.ndarray:
    grades = np.asarray(true_grades)
    if grades.shape != (n,):
        raise ValueError(f"expected {n} true grades, got shape {grades.shape}")
    if n == 0:
        raise ValueError("cannot fit a temperature on zero crops")
    if not np.isin(grades, KL_GRADES).all():
        raise ValueError(f"true grades must be KL grades {KL_GRADES}; got {sorted(set(grades.tolist()))}")
    return grades.astype(int)


def temperature_nll(probabilities_or_logits: np.ndarray, true_grades: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true grades after dividing the logits by ``temperature``."""
    logits = _as_logits(probabilities_or_logits)
    grades = _check_grades(true_grades, len(logits))
    log_p = _log_softmax(logits / float(temperature))
    return float(-log_p[np.arange(len(grades)), grades].mean())


def fit_temperature(
    probabilities_or_logits: np.ndarray,
    true_grades: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(logits / T)`` on labelled crops.

    Fit it on ``val`` (never on a test split). ``T > 1`` softens an overconfident grader,
    ``T < 1`` sharpens an underconfident one. The search runs over ``log T`` within
    ``bounds``, where the NLL is smooth and unimodal in practice.

    Args:
        probabilities_or_logits: ``(n, 5)`` grade probabilities (rows of non-negative
            numbers summing to 1, e.g. the grader's softmax output) or logits
            (anything else, log-probabilities included).
        true_grades: ``(n,)`` true KL grades 0-4.
        bounds: the smallest and largest temperature considered.

    Returns:
        The fitted temperature, a positive float.

    Raises:
        ValueError: on a wrong shape, non-finite scores, no crops, or grades outside 0-4.

    >>> import numpy as np
    >>> p = np.full((4, 5), 0.2)
    >>> round(fit_temperature(np.log(p), np.array([0, 1, 2, 3])), 2) > 0
    True
    """
    logits = _as_logits(probabilities_or_logits)
    grades = _check_grades(true_grades, len(logits))
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    rows = np.arange(len(grades))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logits / np.exp(log_t))[rows, grades].mean())

    result = minimize_scalar(nll, bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Grade probabilities recalibrated by a temperature: ``softmax(log p / T)``.

    Accepts logits too (anything that is not a probability row), then it is
    ``softmax(logits / T)``. ``T = 1`` returns the probabilities unchanged.

    >>> import numpy as np
    >>> p = np.array([[0.9, 0.05, 0.03, 0.01, 0.01]])
    >>> bool(apply_temperature(p, 2.0)[0, 0] < 0.9)
    True
    """
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    logits = _as_logits(probabilities)
    return np.exp(_log_softmax(logits / float(temperature)))


def fit_temperature_and_bias(probabilities_or_logits: np.ndarray, true_grades: np.ndarray) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling: ``softmax(z / T + b)`` fitted by NLL on val.

    Besides the temperature, one bias per grade corrects a grade the network
    systematically under- or over-predicts (class weighting and label smoothing shift
    them). Alexandari et al. (2020, "Maximum likelihood with bias-corrected calibration
    is hard-to-beat at label shift adaptation") found this calibration makes the EM prior
    estimate of :mod:`kneepipe.grade.prior` reliable. The biases are centred (sum 0).

    >>> import numpy as np
    >>> logits = np.array([[2.0, 0, 0, 0, 0]] * 30 + [[0, 2.0, 0, 0, 0]] * 10)
    >>> t, b = fit_temperature_and_bias(logits, np.array([0] * 20 + [1] * 20))
    >>> bool(b[1] > b[0])  # grade 1 was under-predicted
    True
    """
    from scipy.optimize import minimize

    logits = _as_logits(probabilities_or_logits)
    grades = _check_grades(true_grades, len(logits))
    start = fit_temperature(logits, grades)

    def nll(params: np.ndarray) -> float:
        z = logits / np.exp(params[0]) + params[1:]
        return float(-_log_softmax(z)[np.arange(len(grades)), grades].mean())

    x0 = np.concatenate([[np.log(start)], np.zeros(len(KL_GRADES))])
    result = minimize(
        nll, x0, method="L-BFGS-B", bounds=[tuple(np.log(TEMPERATURE_BOUNDS))] + [(-10.0, 10.0)] * len(KL_GRADES)
    )
    bias = result.x[1:] - result.x[1:].mean()
    return float(np.exp(result.x[0])), bias
