"""95% intervals of a grader's metrics on a labelled folder, by a patient-level bootstrap.

Reads the ``grades.csv`` that ``kneepipe grade`` wrote for crops in ``<grade>/`` folders
and resamples patients (OAI file names: 7-digit id, then L or R), so the two knees of a
patient stay together, as they are not independent.

    kneepipe grade ../shared/data/oai-kl224/val --out runs/val
    python benchmarks/grade_intervals.py runs/val/grades.csv [--resamples 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from kneepipe.metrics import grading_metrics

PATIENT = re.compile(r"^(\d{7})[LR]$")


def read_grades(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """True grades, probabilities, predicted grades and patient ids of the graded, labelled crops."""
    true, probabilities, predicted, patients = [], [], [], []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            crop = Path(row["crop"])
            if row["status"] != "ok" or crop.parent.name not in set("01234"):
                continue
            match = PATIENT.match(crop.stem)
            true.append(int(crop.parent.name))
            probabilities.append([float(row[f"p{g}"]) for g in range(5)])
            predicted.append(int(row["kl_grade"]))
            patients.append(match.group(1) if match else crop.stem)
    return np.array(true), np.array(probabilities), np.array(predicted), patients


def intervals(grades_csv: Path, resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Each metric's value and its 2.5th and 97.5th bootstrap percentiles."""
    true, probabilities, predicted, patients = read_grades(grades_csv)
    rows = defaultdict(list)
    for index, patient in enumerate(patients):
        rows[patient].append(index)
    groups = list(rows.values())

    def measure(index: np.ndarray) -> dict[str, float]:
        metrics = grading_metrics(true[index], probabilities[index], predicted[index])
        return {
            "accuracy": metrics["accuracy"],
            "qwk": metrics["qwk"],
            "mae": metrics["mae"],
            "ece": metrics["ece"],
            "kl4_recall": metrics["recall"][4],
        }

    rng = np.random.default_rng(seed)
    samples = defaultdict(list)
    for _ in range(resamples):
        chosen = rng.integers(len(groups), size=len(groups))
        index = np.concatenate([groups[g] for g in chosen])
        for name, value in measure(index).items():
            if value is not None:
                samples[name].append(value)
    observed = measure(np.arange(len(true)))
    return {
        name: {
            "value": observed[name],
            "low": round(float(np.percentile(samples[name], 2.5)), 3),
            "high": round(float(np.percentile(samples[name], 97.5)), 3),
        }
        for name in observed
    } | {"knees": {"value": len(true)}, "patients": {"value": len(groups)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grades_csv", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(intervals(args.grades_csv, args.resamples, args.seed), indent=2))


if __name__ == "__main__":
    main()
