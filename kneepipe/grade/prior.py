"""Label-shift adaptation: grade a batch under its own grade distribution.

A grader's probabilities carry the grade prior of its training set. A clinic whose knees
are graded differently (more KL1, fewer KL0) then sees predictions that follow the
training prior instead of its own. Under label shift (``p(x | grade)`` fixed, ``p(grade)``
changed) Bayes' rule fixes this by reweighting every knee's probabilities by
``new_prior / train_prior``. The new prior is either known (``--prior``) or estimated
from the unlabelled batch itself by the EM algorithm of Saerens, Latinne and
Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori
probabilities: a simple procedure", Neural Computation 14(1).

EM needs calibrated probabilities (see :mod:`kneepipe.grade.calibration`), and its
estimate is noisy on a small or weakly separable batch: the maximum-likelihood prior can
wander far from the truth when two grades (KL0 and KL1) overlap, down to a share of zero
for a grade that makes up a tenth of the batch. Two things hold it back. The estimate is
a maximum a posteriori one (MAP-EM; Šipka, Šulc and Matas (2022), "The Hitchhiker's Guide
to Prior-Shift Adaptation", WACV): a Dirichlet prior over the grade mix adds
``concentration`` pseudo-knees at the training mix to every M-step, so a grade keeps a
share unless the batch gives strong evidence against it, and the pull fades as the batch
grows. And the estimate is only used when the batch gives significant evidence of a
shift: the likelihood-ratio test of Saerens et al. (section 2.3) compares the batch's
likelihood under the estimated prior with that under the training prior. Pure numpy and
scipy.

>>> import numpy as np
>>> p = np.array([[0.6, 0.4, 0, 0, 0], [0.3, 0.7, 0, 0, 0]])
>>> reweight(p, np.full(5, 0.2), np.full(5, 0.2)).round(2).tolist() == p.tolist()
True
"""

from __future__ import annotations

import numpy as np

from kneepipe import KL_GRADES

NUM_GRADES = len(KL_GRADES)


def _check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != NUM_GRADES:
        raise ValueError(f"expected an (n, {NUM_GRADES}) array of grade probabilities, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("grade probabilities must be finite and non-negative")
    sums = values.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise ValueError("a row of grade probabilities sums to zero")
    return values / sums


def _check_prior(prior: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(prior, dtype=np.float64).reshape(-1)
    if values.shape != (NUM_GRADES,):
        raise ValueError(f"{name} must have {NUM_GRADES} entries (KL 0-4), got {values.size}")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero, got {values.tolist()}")
    return values / values.sum()


def reweight(probabilities: np.ndarray, train_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Each knee's grade probabilities moved from the training prior to ``new_prior``.

    ``p_new(k | x) ∝ p(k | x) * new_prior[k] / train_prior[k]``, renormalised per knee.
    A grade the training prior never saw (``train_prior[k] == 0``) cannot be reweighted
    and is refused. A row whose reweighted mass vanishes (every grade it supports has a
    new prior of zero) keeps its original probabilities rather than becoming NaN.

    >>> import numpy as np
    >>> p = np.array([[0.5, 0.5, 0, 0, 0]])
    >>> reweight(p, np.full(5, 0.2), np.array([0.75, 0.25, 0, 0, 0])).round(2).tolist()
    [[0.75, 0.25, 0.0, 0.0, 0.0]]
    """
    probabilities = _check_probabilities(probabilities)
    train_prior = _check_prior(train_prior, "train_prior")
    new_prior = _check_prior(new_prior, "new prior")
    if (train_prior == 0).any():
        raise ValueError(f"train_prior has a zero entry {train_prior.tolist()}: cannot reweight by it")
    weighted = probabilities * (new_prior / train_prior)
    mass = weighted.sum(axis=1, keepdims=True)
    return np.where(mass > 0, weighted / np.where(mass > 0, mass, 1.0), probabilities)


def estimate_prior_em(
    probabilities: np.ndarray,
    train_prior: np.ndarray,
    max_iter: int = 100,
    tol: float = 1e-6,
    concentration: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Estimate a batch's grade prior by EM and regrade the batch with it (Saerens et al. 2002).

    E-step: reweight each knee's probabilities by ``prior / train_prior``. M-step: the
    new prior is the mean of the reweighted probabilities, with ``concentration``
    pseudo-knees at the training mix counted in (the MAP estimate under a Dirichlet prior
    whose parameters are ``1 + concentration * train_prior``; 0 gives the
    maximum-likelihood estimate). Starts from the training prior; stops when no entry of
    the prior moves by more than ``tol`` or after ``max_iter`` rounds. The estimate is only
    as good as the calibration of ``probabilities`` and the size of the batch.

    Args:
        probabilities: ``(n, 5)`` calibrated grade probabilities of the batch.
        train_prior: the grade distribution the grader's probabilities reflect.
        max_iter: the most EM rounds.
        tol: convergence threshold on the largest change of a prior entry.
        concentration: pseudo-knees at the training mix (``>= 0``).

    Returns:
        ``(prior, adjusted)``: the estimated prior ``(5,)`` and the batch's probabilities
        reweighted by it ``(n, 5)``.

    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1, 0, 0, 0]] * 3 + [[0.1, 0.9, 0, 0, 0]])
    >>> prior, adjusted = estimate_prior_em(p, np.array([0.5, 0.5, 0, 0, 0]) + 1e-3)
    >>> bool(prior[0] > 0.6)
    True
    >>> held, _ = estimate_prior_em(p, np.array([0.5, 0.5, 0, 0, 0]) + 1e-3, concentration=4)
    >>> bool(0.5 < held[0] < prior[0])  # four pseudo-knees at the training mix pull it back
    True
    """
    probabilities = _check_probabilities(probabilities)
    train_prior = _check_prior(train_prior, "train_prior")
    if (train_prior == 0).any():
        raise ValueError(f"train_prior has a zero entry {train_prior.tolist()}: cannot reweight by it")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}")
    if not np.isfinite(concentration) or concentration < 0:
        raise ValueError(f"concentration must be a finite number >= 0, got {concentration}")
    if len(probabilities) == 0:
        return train_prior.copy(), probabilities.copy()
    prior = train_prior.copy()
    pseudo = concentration * train_prior
    for _ in range(max_iter):
        adjusted = reweight(probabilities, train_prior, prior)
        new_prior = (adjusted.sum(axis=0) + pseudo) / (len(probabilities) + concentration)
        change = np.abs(new_prior - prior).max()
        prior = new_prior
        if change < tol:
            break
    return prior, reweight(probabilities, train_prior, prior)


def batch_log_likelihood(probabilities: np.ndarray, train_prior: np.ndarray, prior: np.ndarray) -> float:
    """Log-likelihood of a batch under a grade prior, up to a constant that does not depend on it.

    ``sum_i log sum_k p(k | x_i) * prior[k] / train_prior[k]``: the mixture likelihood
    EM maximises (Saerens et al. 2002, eq. 2.9).
    """
    probabilities = _check_probabilities(probabilities)
    ratio = _check_prior(prior, "prior") / _check_prior(train_prior, "train_prior")
    return float(np.log(np.clip((probabilities * ratio).sum(axis=1), 1e-300, None)).sum())


def prior_shift_test(probabilities: np.ndarray, train_prior: np.ndarray, prior: np.ndarray) -> tuple[float, float]:
    """Likelihood-ratio test of "the batch follows the training prior" against an estimated prior.

    The statistic ``2 * (log L(prior) - log L(train_prior))`` is asymptotically
    chi-squared with 4 degrees of freedom (five grade shares summing to one) when the
    batch's prior is the training one (Saerens et al. 2002, section 2.3). A small
    p-value says the shift is real; a large one says the EM estimate is within the noise
    of the batch and regrading with it would follow noise.

    Returns:
        ``(statistic, p_value)``.

    >>> import numpy as np
    >>> p = np.array([[0.7, 0.3, 0, 0, 0], [0.3, 0.7, 0, 0, 0]] * 50)
    >>> t = np.array([0.5, 0.5, 1e-9, 1e-9, 1e-9])
    >>> statistic, p_value = prior_shift_test(p, t, t)
    >>> statistic, p_value
    (0.0, 1.0)
    """
    from scipy.stats import chi2

    gain = batch_log_likelihood(probabilities, train_prior, prior) - batch_log_likelihood(
        probabilities, train_prior, train_prior
    )
    statistic = max(2.0 * gain, 0.0)
    return statistic, float(chi2.sf(statistic, df=NUM_GRADES - 1))


def parse_prior(text: str) -> np.ndarray:
    """A grade prior from text such as ``"0.1,0.4,0.25,0.15,0.1"``, normalised to sum to 1.

    Counts work too (``"63,199,139,84,46"``). Raises ``ValueError`` with a message that
    says what is wrong: not five entries, not numbers, negative, or all zero.

    >>> parse_prior("1,1,1,1,4").tolist()
    [0.125, 0.125, 0.125, 0.125, 0.5]
    """
    parts = [part.strip() for part in str(text).replace(";", ",").split(",")]
    if len(parts) != NUM_GRADES or any(part == "" for part in parts):
        raise ValueError(
            f"prior {text!r} must be {NUM_GRADES} comma-separated numbers, one per KL grade 0-4 "
            f"(e.g. 0.1,0.4,0.25,0.15,0.1)"
        )
    try:
        values = np.array([float(part) for part in parts])
    except ValueError as err:
        raise ValueError(f"prior {text!r} holds something that is not a number: {err}") from err
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"prior {text!r} must hold finite, non-negative numbers")
    if values.sum() <= 0:
        raise ValueError(f"prior {text!r} is all zero")
    return values / values.sum()


def resample_to_counts(true_grades: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices that resample a labelled set to given per-grade counts, for label-shift tests.

    Each grade draws ``counts[k]`` of its knees: without replacement while it has enough,
    with replacement where it runs short. The order is shuffled; ``seed`` fixes it all.
    How ``--adapt-prior`` is measured: resample ``val`` to a clinic's grade counts, then
    grade the resample plain and adapted.

    >>> import numpy as np
    >>> idx = resample_to_counts(np.array([0, 0, 1, 2, 3, 4]), np.array([1, 3, 0, 0, 0]))
    >>> sorted(np.array([0, 0, 1, 2, 3, 4])[idx].tolist())
    [0, 1, 1, 1]
    """
    grades = np.asarray(true_grades, dtype=int)
    counts = np.asarray(counts, dtype=int).reshape(-1)
    if counts.shape != (NUM_GRADES,) or (counts < 0).any():
        raise ValueError(f"counts must be {NUM_GRADES} non-negative integers, got {counts.tolist()}")
    rng = np.random.default_rng(seed)
    chosen = []
    for grade, count in zip(KL_GRADES, counts, strict=True):
        members = np.flatnonzero(grades == grade)
        if count and not len(members):
            raise ValueError(f"cannot draw {count} knees of KL {grade}: the set has none")
        chosen.append(rng.choice(members, size=count, replace=count > len(members)))
    indices = np.concatenate(chosen) if chosen else np.array([], dtype=int)
    return rng.permutation(indices)
