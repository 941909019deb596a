"""Crops per second of ``kneepipe grade`` on the OAI val crops, float32 vs bfloat16.

Grades the same folder once per precision through the library call behind the CLI
(decode, resize, batched inference, CSV writing) and reports crops/s and the val QWK of
each, so the faster precision is only recommended when its QWK stays within 0.005.

    python benchmarks/grade_speed.py                      # shipped grader, ../shared/data/oai-kl224/val
    python benchmarks/grade_speed.py --model RUN/best.npz --crops DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.folder import grade_folder
from kneepipe.grade.predict import Grader

DEFAULT_CROPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oai-kl224" / "val"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=Path, default=DEFAULT_CROPS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    results = {}
    for precision in ("float32", "bfloat16"):
        config = load_config(GradeConfig, overrides={"model": args.model, "precision": precision, "batch": args.batch})
        grader = Grader.load(config.model, precision=precision)
        grader.predict_proba([np.zeros((224, 224), "uint8")] * 2)  # warm-up: trace the graph once
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run = grade_folder(args.crops, out, config, grader=grader)
            seconds = time.perf_counter() - start
        n = len(run.rows)
        qwk = run.metrics["qwk"] if run.metrics else None
        results[precision] = (n / seconds, qwk)
        print(f"{precision:>8}: {n} crops in {seconds:.1f} s = {n / seconds:.1f} crops/s, val QWK {qwk}")
    (f32_rate, f32_qwk), (bf16_rate, bf16_qwk) = results["float32"], results["bfloat16"]
    if f32_qwk is not None and bf16_qwk is not None:
        keeps = abs(bf16_qwk - f32_qwk) <= 0.005
        print(
            f"bfloat16 speed-up {bf16_rate / f32_rate:.2f}x; QWK change {bf16_qwk - f32_qwk:+.4f} "
            f"({'within' if keeps else 'outside'} 0.005)"
        )


if __name__ == "__main__":
    main()
