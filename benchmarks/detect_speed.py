"""How fast ``kneepipe detect`` runs on the shared radiographs, and where the time goes.

Runs the detector twice over ``../shared/data/radiographs`` (27 real radiographs):
once phase by phase (decode, inference, crop, write) and once end to end through
:func:`kneepipe.detect.predict.detect_folder` (what ``kneepipe detect`` calls), and
prints radiographs per second. A benchmark, not a test: figures depend on the machine
and on what else runs on it.

    python benchmarks/detect_speed.py [--model PATH] [--batch 8] [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RADIOGRAPHS = ROOT / ".." / "shared" / "data" / "radiographs"


def main() -> None:
    parser = argparse.ArgumentParser(description="kneepipe detect speed on the shared radiographs")
    parser.add_argument("--model", help="detector weights; default: the shipped model")
    parser.add_argument("--batch", type=int, help="radiographs per inference batch")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="detect config overrides, key=value (e.g. search_below=0)")
    args = parser.parse_args()

    from kneepipe.config import load_config, parse_overrides
    from kneepipe.detect.config import DetectConfig
    from kneepipe.detect.predict import (
        JointDetector,
        detect_folder,
        write_joint_rows,
        write_joints_csv,
    )
    from kneepipe.imaging import find_images, read_radiograph

    overrides = {k: v for k, v in {"model": args.model, "batch": args.batch}.items() if v}
    overrides.update(parse_overrides(args.overrides))
    config = load_config(DetectConfig, overrides=overrides)
    tick = time.perf_counter()
    detector = JointDetector.load(config)
    load_seconds = time.perf_counter() - tick
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import torch

    paths = find_images(RADIOGRAPHS)
    detector.detect([read_radiograph(paths[0], max_side=config.max_side)])  # warm-up

    phases = {"decode": 0.0, "inference": 0.0, "crop": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        rows, taken = [], set()
        for start in range(0, len(paths), config.batch):
            batch = paths[start : start + config.batch]
            tick = time.perf_counter()
            radiographs = [read_radiograph(path, max_side=config.max_side) for path in batch]
            phases["decode"] += time.perf_counter() - tick
            tick = time.perf_counter()
            boxes = detector.predict_boxes([r.pixels for r in radiographs])
            phases["inference"] += time.perf_counter() - tick
            tick = time.perf_counter()
            detections = [detector.to_detection(r, b) for r, b in zip(radiographs, boxes, strict=True)]
            phases["crop"] += time.perf_counter() - tick
            tick = time.perf_counter()
            for detection in detections:
                rows.extend(write_joint_rows(detection, Path(tmp), taken))
            phases["write"] += time.perf_counter() - tick
        tick = time.perf_counter()
        write_joints_csv(rows, Path(tmp) / "joints.csv")
        phases["write"] += time.perf_counter() - tick

    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        summary = detect_folder(RADIOGRAPHS, Path(tmp), config, detector=detector, progress=False)
        end_to_end = time.perf_counter() - tick

    total = sum(phases.values())
    report = {
        "radiographs": len(paths),
        "joints": summary.joints,
        "detector": detector.version,
        "imgsz": config.imgsz,
        "batch": config.batch,
        "torch_threads": torch.get_num_threads(),
        "model_load_s": round(load_seconds, 2),
        "end_to_end_s": round(end_to_end, 2),
        "radiographs_per_s": round(len(paths) / end_to_end, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "phases_share": {k: round(v / total, 3) for k, v in phases.items()},
    }
    print(
        f"{len(paths)} radiographs in {end_to_end:.1f} s end to end: "
        f"{len(paths) / end_to_end:.2f} radiographs/s (model load {load_seconds:.1f} s not counted)"
    )
    for phase, seconds in phases.items():
        print(
            f"  {phase:<10}{seconds:7.2f} s  {seconds / total:6.1%}  {1000 * seconds / len(paths):7.1f} ms/radiograph"
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
