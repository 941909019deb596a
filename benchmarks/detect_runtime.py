"""The detector on each runtime: radiographs/s on the shared radiographs, PyTorch (the reference), OpenVINO, ONNX.

Runtimes: ``torch``, ``openvino-int8`` (the INT8 IR, the default), ``openvino`` (float32 IR)
and ``onnx``.

Decodes the films once, then runs :meth:`JointDetector.detect` (thresholds, the contrast
rescue pass, crops) over all of them on each runtime in turn, ``--rounds`` times
interleaved, and prints radiographs/s (best round) and, for each compiled runtime, the
smallest and mean box IoU and the largest confidence difference against PyTorch.

    python benchmarks/detect_runtime.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou
from kneepipe.detect.predict import JointDetector
from kneepipe.imaging import list_inputs, read_radiograph

RADIOGRAPHS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "radiographs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radiographs", type=Path, default=RADIOGRAPHS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    radiographs = [read_radiograph(path) for path in list_inputs(args.radiographs).files]
    detectors = {
        runtime: JointDetector.load(load_config(DetectConfig, overrides={"runtime": runtime}))
        for runtime in ("torch", "openvino-int8", "openvino", "onnx")
    }
    seconds: dict[str, list[float]] = {runtime: [] for runtime in detectors}
    found = {}
    for detector in detectors.values():
        detector.detect(radiographs[:2])  # warm-up
    for _ in range(args.rounds):
        for runtime, detector in detectors.items():
            start = time.perf_counter()
            found[runtime] = detector.detect(radiographs)
            seconds[runtime].append(time.perf_counter() - start)
    for runtime, detector in detectors.items():
        rate = len(radiographs) / min(seconds[runtime])
        print(f"{detector.runtime}: {rate:.2f} radiographs/s (best of {args.rounds} interleaved rounds)")
    for runtime in ("openvino-int8", "openvino", "onnx"):
        ious, confidence, differ = [], [], []
        for ref, other in zip(found["torch"], found[runtime], strict=True):
            if ref.status != other.status or len(ref.joints) != len(other.joints):
                differ.append(f"{ref.image.name} ({len(ref.joints)} vs {len(other.joints)} joints)")
                continue
            ious += [box_iou(a.box, b.box) for a, b in zip(ref.joints, other.joints, strict=True)]
            confidence += [abs(a.confidence - b.confidence) for a, b in zip(ref.joints, other.joints, strict=True)]
        print(
            f"{runtime}: {len(ious)} joints, box IoU vs torch smallest {min(ious):.4f}, "
            f"mean {sum(ious) / len(ious):.4f}, "
            f"largest confidence difference {max(confidence):.3f}, "
            f"films that differ: {', '.join(differ) or 'none'}; "
            f"speed-up {min(seconds['torch']) / min(seconds[runtime]):.2f}x"
        )


if __name__ == "__main__":
    main()
