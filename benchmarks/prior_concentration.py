"""How many pseudo-knees should hold ``--adapt-prior``'s EM estimate to the training mix?

``--adapt-prior`` estimates a batch's grade mix by EM and regrades the batch with it. The
maximum-likelihood estimate can drive a grade's share to zero on a batch where that grade
is a tenth of the knees (KL0 on val resampled to 63/199/139/84/46, seed 0). The MAP
estimate adds ``adapt_prior_concentration`` pseudo-knees at the training mix
(:func:`kneepipe.grade.prior.estimate_prior_em`). This benchmark chooses that number on
label shifts other than the one the acceptance figures are measured on, then reports the
acceptance mix:

* val is graded once, as ``kneepipe grade`` grades it (the shipped grader by default);
* ``--shifts`` random grade mixes are drawn (Dirichlet with all parameters 1.5, seed
  ``--seed``; every grade at least 3% of the batch, and at least 0.3 away in total
  variation x 2 from the acceptance mix), and val is resampled to each at the acceptance
  batch's size (531 knees);
* each resample is graded plain and with ``--adapt-prior`` as the product runs it (the
  likelihood-ratio test and the guard included), for each number of pseudo-knees;
* the table gives the mean and worst accuracy and QWK change against plain grading, the
  number of batches made worse in either, and of batches where a grade that makes up 5% or
  more of the batch is never predicted. Then the acceptance mix, seeds 0, 1 and 2;
* for comparison, black-box shift estimation (BBSE; Lipton, Wang and Smola 2018): the batch's
  mean probabilities solved against val's soft confusion matrix for the grade mix, which then
  regrades the batch with the guard of ``--adapt-prior`` but no test. Val is both the
  confusion matrix's data and the resamples' source, so this row is in-sample and optimistic.

    python benchmarks/prior_concentration.py [--model FILE] [--shifts 40] [--seed 123]
        [--concentrations 0,10,20,30,50,100]

Val also calibrated the grader, so every figure here is in-sample for the calibration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score

from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.folder import adjust_for_prior, grade_crops, label_shift_guard
from kneepipe.grade.predict import Grader
from kneepipe.grade.prior import resample_to_counts, reweight

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oai-kl224" / "val"
ACCEPTANCE = np.array([63, 199, 139, 84, 46])


def accuracy_and_qwk(truth: np.ndarray, grades: np.ndarray) -> tuple[float, float]:
    return float(np.mean(truth == grades)), float(cohen_kappa_score(truth, grades, weights="quadratic"))


def random_mixes(count: int, seed: int) -> list[np.ndarray]:
    """``count`` grade counts summing to the acceptance batch's size, none of them near its mix."""
    rng = np.random.default_rng(seed)
    target, mixes = ACCEPTANCE / ACCEPTANCE.sum(), []
    while len(mixes) < count:
        mix = rng.dirichlet(np.full(5, 1.5))
        if mix.min() >= 0.03 and np.abs(mix - target).sum() >= 0.3:
            mixes.append(np.round(mix * ACCEPTANCE.sum()).astype(int))
    return mixes


def bbse_confusion(val_probabilities: np.ndarray, val_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Val's soft confusion matrix for BBSE and its grade shares: ``confusion[:, j]`` the mean probabilities
    of val's grade-``j`` knees times grade ``j``'s share of val."""
    share = np.bincount(val_truth, minlength=5) / len(val_truth)
    confusion = np.stack([val_probabilities[val_truth == j].mean(axis=0) * share[j] for j in range(5)], axis=1)
    return confusion, share


def bbse_prior(confusion: np.ndarray, share: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """The batch's grade mix by BBSE: ``confusion @ weights = batch mean`` (:func:`bbse_confusion`)."""
    weights = np.clip(np.linalg.lstsq(confusion, batch.mean(axis=0), rcond=None)[0], 0, None)
    mix = np.clip(weights * share, 1e-6, None)
    return mix / mix.sum()


def changes(grader, plain: np.ndarray, regraded: np.ndarray, truth: np.ndarray) -> tuple[float, float, bool, int]:
    """Accuracy and QWK change from ``plain`` to ``regraded`` probabilities, whether ``regraded`` leaves a
    grade that makes up 5% or more of the batch with no knee, and how many knees it grades KL0."""
    before = accuracy_and_qwk(truth, grader.decide(plain))
    after_grades = grader.decide(regraded)
    after = accuracy_and_qwk(truth, after_grades)
    present = np.bincount(truth, minlength=5) >= 0.05 * len(truth)
    vanished = bool((present & (np.bincount(after_grades, minlength=5) == 0)).any())
    return after[0] - before[0], after[1] - before[1], vanished, int((after_grades == 0).sum())


def bbse_row(grader, probabilities, truth, index, train_prior, val_confusion) -> tuple[float, float, bool, bool, int]:
    """What BBSE's mix does to one batch, declined by the guard of ``--adapt-prior`` as EM's would be;
    whether it applied; whether the mix, before the guard, left a grade with no knee; KL0 knees."""
    batch, labels = probabilities[index], truth[index]
    mix = bbse_prior(*val_confusion, batch)
    adapted = reweight(batch, train_prior, mix)
    refused = label_shift_guard(batch, adapted, train_prior, mix, 6.0, grader.preprocessing.decision)
    unguarded = changes(grader, batch, adapted, labels)
    accuracy, qwk, _, kl0 = changes(grader, batch, batch, labels) if refused else unguarded
    return accuracy, qwk, not refused, unguarded[2], kl0


def regrade(grader, probabilities, truth, config, train_prior) -> tuple[float, float, bool, bool, int]:
    """Accuracy and QWK change of ``--adapt-prior`` on one batch, whether it applied, whether a grade
    vanished, and how many knees it grades KL0."""
    adapted, facts = adjust_for_prior(probabilities, train_prior, config, grader.preprocessing.decision)
    accuracy, qwk, vanished, kl0 = changes(grader, probabilities, adapted, truth)
    return accuracy, qwk, facts["prior_test"]["applied"], vanished, kl0


def table_row(label: str, shifts: list[tuple], acceptance: list[tuple], vanished_note: str = "") -> str:
    """One row of the table from the random shifts' and the acceptance seeds' :func:`regrade` results."""
    rows = np.array(shifts, dtype=float)
    worse = int(((rows[:, 0] < -1e-9) | (rows[:, 1] < -1e-9)).sum())
    seeds = " / ".join(
        f"{100 * gain:+.1f} ({kl0})" if applied else f"{100 * gain:+.1f} (declined; {kl0})"
        for gain, _, applied, _, kl0 in acceptance
    )
    return (
        f"| {label} | {100 * rows[:, 0].mean():+.2f} ({100 * rows[:, 0].min():+.2f}) "
        f"| {rows[:, 1].mean():+.4f} ({rows[:, 1].min():+.4f}) | {int(rows[:, 2].sum())} | {worse} "
        f"| {int(rows[:, 3].sum())}{vanished_note} | {seeds} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="grader file; default: the shipped one")
    parser.add_argument("--shifts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--concentrations", default="0,10,20,30,50,100")
    args = parser.parse_args()
    grader = Grader.load(args.model)
    train_prior = np.asarray(grader.preprocessing.train_prior)
    crops = load_crops(*labelled_files(VAL))
    logits, shift = grade_crops(grader, crops.crops, load_config(GradeConfig))
    if shift["shift_warning"]:
        raise SystemExit(f"val's shift score warns ({shift['shift_score']}): not a pure label shift")
    probabilities, truth = grader.probabilities(logits), crops.kl_grades
    mixes = random_mixes(args.shifts, args.seed)
    batches = [resample_to_counts(truth, counts, seed=1000 + i) for i, counts in enumerate(mixes)]
    acceptance = [resample_to_counts(truth, ACCEPTANCE, seed=s) for s in (0, 1, 2)]
    print(f"grader {grader.version}; {args.shifts} random label shifts of val (seed {args.seed}), 531 knees each\n")
    print(
        "| pseudo-knees | accuracy change, mean (worst) | QWK change, mean (worst) | applied | worse "
        "| a grade vanished | acceptance mix, seeds 0 / 1 / 2: accuracy change (KL0 predicted) |"
    )
    print("|---|---|---|---|---|---|---|")
    for concentration in [float(c) for c in args.concentrations.split(",")]:
        config = load_config(GradeConfig, overrides={"adapt_prior": True, "adapt_prior_concentration": concentration})
        shifts = [regrade(grader, probabilities[i], truth[i], config, train_prior) for i in batches]
        seeds = [regrade(grader, probabilities[i], truth[i], config, train_prior) for i in acceptance]
        print(table_row(f"{concentration:g}", shifts, seeds), flush=True)
    val_confusion = bbse_confusion(probabilities, truth)
    shifts = [bbse_row(grader, probabilities, truth, i, train_prior, val_confusion) for i in batches]
    seeds = [bbse_row(grader, probabilities, truth, i, train_prior, val_confusion) for i in acceptance]
    print(table_row("BBSE, guarded, no test", shifts, seeds, " (before the guard)"))


if __name__ == "__main__":
    main()
