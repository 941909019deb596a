"""How the shipped grader transfers to another clinic: plain, as `kneepipe grade` does it, with
``--adapt-prior``, the shift score, and a site grader fitted by `kneepipe adapt` (k-fold CV).

Batches: ``clinic-kl/dev`` (another clinic's expert-graded knees), OAI ``val``, and ``val``
resampled to the grade counts 63/199/139/84/46 (a pure label shift; three seeds). Rows:

* ``train statistics``: the network as trained (``batch_norm=train``);
* ``default``: what ``kneepipe grade`` does (``batch_norm=auto``: batch-norm statistics
  re-estimated on the batch when its shift score warns);
* ``default --adapt-prior``: the same, then the EM grade prior and its guard;
* ``default, true grade mix``: the same, with the batch's own grade mix (from its labels) put
  in place of the training one by Bayes' rule: what a perfect label-shift estimate would
  give, a bound on ``--adapt-prior`` rather than a method;
* with ``--adapt``: ``kneepipe adapt`` on the batch as the site sample, out-of-fold figures
  of ``--folds``-fold cross-validation on its first fold split, and each split's with their
  mean over its three fold splits (minutes per batch).

    python benchmarks/clinic_transfer.py [--model FILE] [--adapt] [--folds 5]
        [--sets clinic,val,resample] [--seeds 0,1,2] [--mirror-average never|auto|always]

The resampled batches list some val knees more than once; ``kneepipe adapt`` keeps the copies
of a knee in one fold.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.folder import adjust_for_prior, grade_crops
from kneepipe.grade.predict import Grader
from kneepipe.grade.prior import resample_to_counts
from kneepipe.metrics import grading_metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESAMPLE_COUNTS = np.array([63, 199, 139, 84, 46])


def _row(name: str, truth: np.ndarray, grades: np.ndarray, shift: str = "", note: str = "") -> None:
    m = grading_metrics(truth, np.eye(5)[grades], grades)
    counts = "/".join(map(str, m["predicted_counts"]))
    figures = f"{m['accuracy']:.3f} | {m['qwk']:.3f} | {m['mae']:.3f}"
    print(f"| {name} | {figures} | {counts} | {shift} | {note} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="grader file; default: the shipped one")
    parser.add_argument("--adapt", action="store_true", help="also fit and cross-validate a site grader per batch")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sets", default="clinic,val,resample", help="which batches: clinic, val, resample")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the resampled val batches")
    parser.add_argument(
        "--mirror-average", choices=["never", "auto", "always"], default=None, help="default: configs/grade.yaml"
    )
    args = parser.parse_args()
    sets = set(args.sets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    grader = Grader.load(args.model)
    mirror = {"mirror_average": args.mirror_average} if args.mirror_average else {}
    trained = load_config(GradeConfig, overrides={"batch_norm": "train", **mirror})
    default = load_config(GradeConfig, overrides=mirror)
    prior_config = load_config(GradeConfig, overrides={"adapt_prior": True, **mirror})
    train_prior = np.asarray(grader.preprocessing.train_prior)
    print(f"grader {grader.version}\n")
    print("| batch | accuracy | QWK | MAE | predicted KL0-4 | shift score | note |")
    print("|---|---|---|---|---|---|---|")
    folders = [("clinic-kl/dev", DATA / "clinic-kl" / "dev")] if "clinic" in sets else []
    folders += [("oai val", DATA / "oai-kl224" / "val")] if sets & {"val", "resample"} else []
    for name, folder in folders:
        paths, truth = labelled_files(folder)
        crops = load_crops(paths, truth)
        truth = crops.kl_grades
        batches = [(name, np.arange(len(truth)))] if name != "oai val" or "val" in sets else []
        if name == "oai val" and "resample" in sets:
            batches += [(f"val resampled, seed {s}", resample_to_counts(truth, RESAMPLE_COUNTS, s)) for s in seeds]
        for label, index in batches:
            batch = crops.crops[index]
            logits, shift = grade_crops(grader, batch, trained)
            plain = grader.probabilities(logits)
            if shift["shift_score"] is None:  # a grader without training statistics (kneepipe train reference)
                score = "none"
            else:
                score = f"{shift['shift_score']:.2f}" + (" (warns)" if shift["shift_warning"] else "")
            _row(f"{label}, train statistics", truth[index], grader.decide(plain), score)
            logits, shift = grade_crops(grader, batch, default)
            probabilities = grader.probabilities(logits)
            _row(f"{label}, default", truth[index], grader.decide(probabilities), score, shift["batch_norm"])
            adapted, facts = adjust_for_prior(
                probabilities, train_prior, prior_config, grader.preprocessing.decision, shift
            )
            test = facts["prior_test"]
            note = "applied" if test["applied"] else test.get("declined", f"not significant (p = {test['p_value']})")
            _row(f"{label}, default --adapt-prior", truth[index], grader.decide(adapted), score, note.split(":")[0])
            mix = np.bincount(truth[index], minlength=5) / len(index)
            bound = probabilities * (mix / train_prior)
            bound /= bound.sum(axis=1, keepdims=True)
            _row(f"{label}, default, true grade mix", truth[index], grader.decide(bound), score, "bound: uses labels")
            if args.adapt:
                _adapt_row(args, label, [paths[i] for i in index], truth[index])


def _adapt_row(args, label: str, paths: list[Path], truth: np.ndarray) -> None:
    from kneepipe.grade.adapt import AdaptSettings, Sample, adapt_grader

    grader = Grader.load(args.model)  # a fresh copy: adapt changes its batch-norm statistics
    crops = load_crops(paths, truth)
    sample = Sample(list(crops.paths), crops.kl_grades, crops.crops)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        facts = adapt_grader(grader, sample, Path(folder) / "site.npz", AdaptSettings(folds=args.folds))
    after = facts["cross_validation"]["after"]
    splits = facts["cross_validation"]["splits"]
    note = (
        f"{args.folds}-fold CV, 95% CI accuracy {after['accuracy_ci95']}, QWK {after['qwk_ci95']}; "
        f"over fold splits {splits['seeds']}: accuracy {splits['accuracy']} (mean {splits['accuracy_mean']:.3f}), "
        f"QWK {splits['qwk']} (mean {splits['qwk_mean']:.3f}); "
        f"C {facts['method']['regularisation_C']}; {(time.monotonic() - started) / 60:.1f} min"
    )
    print(
        f"| {label}, kneepipe adapt | {after['accuracy']:.3f} | {after['qwk']:.3f} | {after['mae']:.3f} "
        f"| {'/'.join(map(str, after['predicted_counts']))} | | {note} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
