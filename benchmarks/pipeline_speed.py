"""Throughput and memory of ``kneepipe run`` against a naive per-image loop, on the same films.

Both modes process the same pseudo-radiographs (real OAI ``val`` crops placed on films by
the project's compositor, JPEG, 1200-3500 px long side, bilateral and single) with the same
shipped models:

* pipeline: :func:`kneepipe.pipeline.run.run_pipeline`, the library call behind
  ``kneepipe run``, with its default runtimes (the compiled OpenVINO detector and INT8
  grader), decode thread with bounded prefetch, detector batches, grader batches in
  threads beside the detector, crops and journal written;
* naive: what a user would otherwise write, in the float32 frameworks (the detector's
  PyTorch weights, the grader's Keras network): for each file in turn, decode, detect that
  one image, grade each of its crops with batch size 1 (nothing written).

Each mode runs in its own process, the models loaded before the clock starts, so the
peak resident memory (``ru_maxrss``) and the resident memory sampled at each quarter of
the batch belong to that mode alone. The pipeline is also run on a quarter of the films:
memory that stays flat as the batch grows four-fold shows that nothing is held per image.

``--precision bfloat16`` (or ``both``) sets ``grade.precision`` in both modes: the naive
loop's Keras grader then runs in mixed bfloat16.

Run from the project root::

    .venv/bin/python benchmarks/pipeline_speed.py --images 120 --work /tmp/kneepipe-speed

Options: ``--precision float32|bfloat16|both``, ``--grade-workers N`` (grading threads of
the pipeline; default from ``configs/pipeline.yaml``), ``--detector``/``--grader`` (other
weights), ``--seed``, ``--rounds N``: time the pipeline and the naive loop in turn N times
(each in a new process) and report every round's ratio and their median; on a shared
machine whose speed drifts, the ratio of one round can be off by 10% either way.
Targets on a 2-core CPU: >= 16 radiographs/s end to end, >= 3x the naive loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CROPS = ROOT / ".." / "shared" / "data" / "oai-kl224" / "val"


def resident_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(
    mode: str, films: Path, count: int, out: Path, models: dict, precision: str, grade_workers: int | None
) -> dict:
    """Time one mode on the first ``count`` films; returns its figures."""
    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.imaging import find_images, read_radiograph
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.run import load_models, run_pipeline

    paths = find_images(films)[:count]
    frameworks = mode == "naive"  # the float32 frameworks themselves, not the compiled networks
    detect_cfg = load_config(
        DetectConfig, overrides={"model": models.get("detector")} | ({"runtime": "torch"} if frameworks else {})
    )
    grade_cfg = load_config(
        GradeConfig,
        overrides={"model": models.get("grader"), "precision": precision}
        | ({"runtime": "keras"} if frameworks else {}),
    )
    detector, grader = load_models(detect_cfg, grade_cfg)
    # Warm both models on one film (first-call graph building is not throughput).
    warm = detector.detect([read_radiograph(paths[0], max_side=detect_cfg.max_side)])[0]
    grader.predict_logits([joint.crop for joint in warm.joints] or [warm_crop()], batch_size=1)
    loaded_mb = resident_mb()
    quarters: list[float] = []

    def sample(done: int, total: int) -> None:
        if len(quarters) < 4 and done >= (len(quarters) + 1) * total / 4:
            quarters.append(round(resident_mb(), 1))

    threads = None
    started = time.perf_counter()
    if mode == "pipeline":
        overrides = {"overwrite": True} | ({"grade_workers": grade_workers} if grade_workers else {})
        pipeline_cfg = load_config(PipelineConfig, overrides=overrides)
        threads = pipeline_cfg.grade_workers
        selection = out / "inputs"
        selection.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = selection / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
        run = run_pipeline(
            selection,
            out / "run",
            pipeline_cfg,
            detect_cfg,
            grade_cfg,
            progress=sample,
            detector=detector,
            grader=grader,
        )
        knees = run.summary["knees_graded"]
    else:
        knees = 0
        for index, path in enumerate(paths):
            radiograph = read_radiograph(path, max_side=detect_cfg.max_side)
            detection = detector.detect([radiograph])[0]
            for joint in detection.joints:
                grader.predict_proba([joint.crop], batch_size=1)
                knees += 1
            sample(index + 1, len(paths))
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "precision": precision,
        "grade_workers": threads,
        "radiographs": len(paths),
        "knees": knees,
        "seconds": round(seconds, 2),
        "radiographs_per_s": round(len(paths) / seconds, 3),
        "knees_per_s": round(knees / seconds, 3),
        "resident_mb_after_loading": round(loaded_mb, 1),
        "resident_mb_at_each_quarter": quarters,
        "peak_resident_mb": round(peak_mb(), 1),
        "peak_above_loaded_mb": round(peak_mb() - loaded_mb, 1),
    }


def warm_crop():
    import numpy as np

    return np.zeros((224, 224), np.uint8)


def compose_films(crops: Path, folder: Path, count: int, seed: int) -> Path:
    """``count`` pseudo-radiographs of the val crops (kept between runs of this script)."""
    from kneepipe.training.compose import compose_dataset

    images = folder / "images"
    if not images.is_dir() or len(list(images.glob("*.jpg"))) < count:
        compose_dataset(crops, folder, count=count, seed=seed, long_side=(1200, 3500))
    return images


def run_worker(
    mode: str, films: Path, count: int, out: Path, models: dict, precision: str, grade_workers: int | None
) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--films", str(films), "--count", str(count)]
    command += ["--work", str(out), "--precision", precision]
    command += ["--grade-workers", str(grade_workers)] if grade_workers else []
    command += [arg for key, value in models.items() if value for arg in (f"--{key}", value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120, help="pseudo-radiographs (at least 100 for the figures)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kneepipe-speed"), help="working folder")
    parser.add_argument("--crops", type=Path, default=DEFAULT_CROPS)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--detector", default=None, help="detector weights (default: shipped)")
    parser.add_argument("--grader", default=None, help="grader file (default: shipped)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "both"], default="float32")
    parser.add_argument("--grade-workers", type=int, default=None, help="pipeline grading threads")
    parser.add_argument(
        "--rounds", type=int, default=1, help="pipeline and naive timed this many times in turn (the median ratio)"
    )
    parser.add_argument("--worker", choices=["pipeline", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--films", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = {"detector": args.detector, "grader": args.grader}
    if args.worker:
        figures = worker(args.worker, args.films, args.count, args.work, models, args.precision, args.grade_workers)
        print(json.dumps(figures))
        return 0

    films = compose_films(args.crops, args.work / "films", args.images, args.seed)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    result: dict = {"cpu_cores": os.cpu_count(), "images": args.images}
    lines = []
    for precision in precisions:

        def timed(name: str, mode: str, count: int, precision: str = precision) -> dict:
            out = args.work / f"{name}_{precision}"
            return run_worker(mode, films, count, out, models, precision, args.grade_workers)

        quarter = timed("pipeline_quarter", "pipeline", max(1, args.images // 4))
        rounds = [
            (timed("pipeline", "pipeline", args.images), timed("naive", "naive", args.images))
            for _ in range(max(1, args.rounds))
        ]
        ratios = [p["radiographs_per_s"] / n["radiographs_per_s"] for p, n in rounds]
        pipeline, naive = rounds[0]
        result[precision] = {
            "pipeline": pipeline,
            "pipeline_quarter_batch": quarter,
            "naive": naive,
            "speedup_radiographs_per_s": round(ratios[0], 2),
            "rounds": [
                {"pipeline": p["radiographs_per_s"], "naive": n["radiographs_per_s"], "speedup": round(r, 2)}
                for (p, n), r in zip(rounds, ratios, strict=True)
            ],
            "median_speedup": round(statistics.median(ratios), 2),
        }
        lines.append(
            f"[{precision}, {pipeline['grade_workers']} grading threads]\n"
            f"pipeline: {pipeline['radiographs_per_s']:.2f} radiographs/s, {pipeline['knees_per_s']:.2f} knees/s, "
            f"peak {pipeline['peak_resident_mb']:.0f} MB ({pipeline['peak_above_loaded_mb']:.0f} MB above the loaded "
            f"models) on {pipeline['radiographs']} films; on {quarter['radiographs']} films: peak "
            f"{quarter['peak_resident_mb']:.0f} MB ({quarter['peak_above_loaded_mb']:.0f} MB above)\n"
            f"naive:    {naive['radiographs_per_s']:.2f} radiographs/s, {naive['knees_per_s']:.2f} knees/s, "
            f"peak {naive['peak_resident_mb']:.0f} MB\n"
            f"pipeline / naive: {ratios[0]:.2f}x (targets: >= 16 radiographs/s, >= 3x)"
        )
        for number, ((p, n), ratio) in enumerate(zip(rounds[1:], ratios[1:], strict=True), start=2):
            lines.append(
                f"round {number}: pipeline {p['radiographs_per_s']:.2f}, naive {n['radiographs_per_s']:.2f} "
                f"radiographs/s: {ratio:.2f}x"
            )
        if len(rounds) > 1:
            lines.append(f"median over {len(rounds)} rounds: {statistics.median(ratios):.2f}x")
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    print("\n".join(lines))
    (args.work / "pipeline_speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
