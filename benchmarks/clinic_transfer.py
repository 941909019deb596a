"""How the shipped grader transfers to another clinic, plain and with ``--adapt-prior``.

Grades ``clinic-kl/dev`` (another clinic's expert-graded knees), OAI ``val`` and ``val``
resampled to the grade counts 63/199/139/84/46 (a pure label shift; three seeds), each
plain and with the EM prior and its guard, and prints accuracy, QWK and the predicted
grade counts.

    python benchmarks/clinic_transfer.py [--model FILE] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.folder import adjust_for_prior
from kneepipe.grade.predict import Grader
from kneepipe.grade.prior import resample_to_counts
from kneepipe.metrics import grading_metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESAMPLE_COUNTS = np.array([63, 199, 139, 84, 46])


def _row(name: str, grader: Grader, truth: np.ndarray, probabilities: np.ndarray, note: str = "") -> None:
    grades = grader.decide(probabilities)
    m = grading_metrics(truth, probabilities, grades)
    counts = "/".join(map(str, m["predicted_counts"]))
    print(f"| {name} | {m['accuracy']:.3f} | {m['qwk']:.3f} | {m['mae']:.3f} | {counts} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="grader file; default: the shipped one")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    grader = Grader.load(args.model, precision=args.precision)
    config = load_config(GradeConfig, overrides={"adapt_prior": True})
    train_prior = np.asarray(grader.preprocessing.train_prior)
    print(f"grader {grader.version}\n")
    print("| batch | accuracy | QWK | MAE | predicted KL0-4 | prior |")
    print("|---|---|---|---|---|---|")
    for name, folder in [("clinic-kl/dev", DATA / "clinic-kl" / "dev"), ("oai val", DATA / "oai-kl224" / "val")]:
        paths, truth = labelled_files(folder)
        crops = load_crops(paths, truth)
        probabilities = grader.predict_proba(crops.crops)
        truth = crops.kl_grades
        batches = [(name, np.arange(len(truth)))]
        if name == "oai val":
            batches += [(f"val resampled, seed {s}", resample_to_counts(truth, RESAMPLE_COUNTS, s)) for s in range(3)]
        for label, index in batches:
            plain = probabilities[index]
            adapted, facts = adjust_for_prior(plain, train_prior, config, grader.preprocessing.decision)
            test = facts["prior_test"]
            note = "applied" if test["applied"] else test.get("declined", f"not significant (p = {test['p_value']})")
            _row(f"{label}, plain", grader, truth[index], plain)
            _row(f"{label}, --adapt-prior", grader, truth[index], adapted, note)


if __name__ == "__main__":
    main()
