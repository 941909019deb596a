"""Label shift on purpose: does ``--adapt-prior`` correct a grader that follows its training prior?

Resamples the val crops to a clinic's grade counts (default 63/199/139/84/46 of KL 0-4,
with replacement only where a grade runs short, fixed seed), lays the resample out as a
labelled folder of links (``<grade>/<n>_<crop>``), then grades it with ``kneepipe grade``
plain and with ``--adapt-prior``; and grades val itself both ways, to show adaptation
does not hurt when there is no shift (the likelihood-ratio test should then keep the
training prior).

    python benchmarks/prior_shift_eval.py [--model GRADER.npz] [--counts 63,199,139,84,46] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.grade.data import labelled_files
from kneepipe.grade.prior import resample_to_counts

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oai-kl224" / "val"


def grade(folder: Path, out: Path, model: str | None, adapt: bool) -> dict:
    args = ["grade", str(folder), "--out", str(out)] + (["--model", model] if model else [])
    result = CliRunner().invoke(app, args + (["--adapt-prior"] if adapt else []))
    if result.exit_code != 0:
        raise SystemExit(f"kneepipe grade failed ({result.exit_code}): {result.output}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--val", type=Path, default=VAL)
    parser.add_argument("--counts", default="63,199,139,84,46")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    paths, grades = labelled_files(args.val)
    counts = np.array([int(c) for c in args.counts.split(",")])
    index = resample_to_counts(np.array(grades), counts, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        shifted = Path(tmp) / "shifted"
        for n, i in enumerate(index):
            target = shifted / str(grades[i]) / f"{n:04d}_{paths[i].name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(paths[i].resolve(), target)
        rows = []
        for name, folder in (("val resampled to clinic counts", shifted), ("val as it is", args.val)):
            for adapt in (False, True):
                m = grade(folder, Path(tmp) / f"{name[:3]}-{adapt}", args.model, adapt)
                rows.append((name, "adapt-prior" if adapt else "plain", m))
    print(f"clinic counts KL0-4: {counts.tolist()} (seed {args.seed})")
    for name, mode, m in rows:
        prior, test = m.get("estimated_prior"), m.get("prior_test")
        print(
            f"{name:>31} {mode:>11}: accuracy {m['accuracy']:.4f}  QWK {m['qwk']:.4f}  MAE {m['mae']:.4f}  "
            f"predicted {m['predicted_counts']}"
            + (f"  estimated prior {prior}" if prior else "")
            + (
                f"  likelihood-ratio p = {test['p_value']:.3g}: {'applied' if test['applied'] else 'not applied'}"
                if test
                else ""
            )
        )
    print(f"training prior: {rows[1][2]['train_prior']}")


if __name__ == "__main__":
    main()
