"""The grader on each runtime: crops/s and val figures, Keras float32 (the reference) vs the compiled INT8 network.

Decodes the crops once, then grades all of them on each runtime in turn, ``--rounds``
times interleaved (so a busy machine slows both alike), with the grader file's
preprocessing, calibration and decision rule (batch-norm statistics as trained). Prints
crops/s (best round), accuracy and QWK on val, the share of identical grades, and the QWK
on another clinic's crops when that folder exists.

    python benchmarks/grade_runtime.py                     # shipped grader, ../shared/data/oai-kl224/val
    python benchmarks/grade_runtime.py --rounds 3 --batch 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.predict import Grader
from kneepipe.metrics import grading_metrics
from kneepipe.runtime import prepare_frameworks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=Path, default=DATA / "oai-kl224" / "val")
    parser.add_argument("--clinic", type=Path, default=DATA / "clinic-kl" / "dev")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    prepare_frameworks()
    val = load_crops(*labelled_files(args.crops))
    graders = {runtime: Grader.load(args.model, runtime=runtime) for runtime in ("keras", "openvino")}
    for grader in graders.values():
        grader.predict_logits(val.crops[:8])  # warm-up: trace the graph, compile the kernels
    seconds: dict[str, list[float]] = {runtime: [] for runtime in graders}
    logits: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for runtime, grader in graders.items():
            start = time.perf_counter()
            logits[runtime] = grader.predict_logits(val.crops, args.batch)
            seconds[runtime].append(time.perf_counter() - start)

    decided = {}
    print(f"{len(val.crops)} crops of {args.crops}, batch {args.batch}, best of {args.rounds} interleaved rounds")
    print("| runtime | crops/s | val accuracy | val QWK | clinic QWK |")
    print("|---|---|---|---|---|")
    for runtime, grader in graders.items():
        probabilities = grader.probabilities(logits[runtime])
        decided[runtime] = grader.decide(probabilities)
        metrics = grading_metrics(val.kl_grades, probabilities, decided[runtime])
        clinic_qwk = "-"
        if args.clinic.is_dir():
            clinic = load_crops(*labelled_files(args.clinic))
            clinic_p = grader.predict_proba(clinic.crops, args.batch)
            clinic_qwk = f"{grading_metrics(clinic.kl_grades, clinic_p, grader.decide(clinic_p))['qwk']:.4f}"
        rate = len(val.crops) / min(seconds[runtime])
        print(f"| {grader.runtime} | {rate:.1f} | {metrics['accuracy']:.4f} | {metrics['qwk']:.4f} | {clinic_qwk} |")
    identical = (decided["keras"] == decided["openvino"]).mean()
    speedup = min(seconds["keras"]) / min(seconds["openvino"])
    print(f"identical grades {identical:.4f}; speed-up {speedup:.2f}x")


if __name__ == "__main__":
    main()
