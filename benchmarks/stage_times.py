"""Where ``kneepipe run``'s time goes: decode, detect, grade, write and report, per film.

On pseudo-radiographs (real OAI val crops placed on 1200-1800 px JPEG films by the
project's compositor, as in ``pipeline_speed.py``), with the shipped models loaded first:

* each stage alone, one after the other on the same films: decode (``read_radiograph``),
  detect (steps of ``detect.batch`` films), grade (the step's crops, on the compiled INT8
  grader and on the Keras float32 reference), write (each crop's PNG and the film's
  thumbnail, as the run writes them);
* the pipeline end to end (``run_pipeline``, stages overlapped in threads, no report),
  then the report alone: the same run resumed with ``report`` on, so only the final
  grades, tables, Grad-CAM maps and HTML are computed.

    .venv/bin/python benchmarks/stage_times.py --images 60 --work /tmp/kneepipe-stages
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT.parent / "shared" / "data" / "oai-kl224" / "val"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kneepipe-stages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.predict import Grader
    from kneepipe.imaging import find_images, read_radiograph
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.outputs import thumbnail_jpeg, write_png
    from kneepipe.pipeline.run import load_models, run_pipeline
    from kneepipe.training.compose import compose_dataset

    films = args.work / "films"
    if len(list((films / "images").glob("*.jpg"))) < args.images:
        compose_dataset(VAL, films, count=args.images, seed=args.seed, long_side=(1200, 1800))
    paths = find_images(films / "images")[: args.images]
    detect_cfg = load_config(DetectConfig)
    grade_cfg = load_config(GradeConfig)
    pipeline_cfg = load_config(PipelineConfig, overrides={"overwrite": True, "report": False})
    detector, grader = load_models(detect_cfg, grade_cfg)
    reference = Grader.load(grade_cfg.model, runtime="keras")
    warm = detector.detect([read_radiograph(paths[0], max_side=detect_cfg.max_side)])[0]
    for model in (grader, reference):
        model.grade_each([joint.crop for joint in warm.joints])

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    radiographs = [read_radiograph(path, max_side=detect_cfg.max_side) for path in paths]
    seconds["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    detections = [
        detection
        for first in range(0, len(radiographs), detect_cfg.batch)
        for detection in detector.detect(radiographs[first : first + detect_cfg.batch])
    ]
    seconds["detect"] = time.perf_counter() - start
    crops = [joint.crop for detection in detections for joint in detection.joints]
    for name, model in ((f"grade, {grader.runtime}", grader), (f"grade, {reference.runtime}", reference)):
        start = time.perf_counter()
        for first in range(0, len(crops), 16):  # a pipeline step's knees: 8 films
            model.grade_each(crops[first : first + 16], grade_cfg.batch)
        seconds[name] = time.perf_counter() - start
    written = args.work / "written"
    written.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for index, (radiograph, detection) in enumerate(zip(radiographs, detections, strict=True)):
        (written / f"{index}.jpg").write_bytes(thumbnail_jpeg(radiograph, pipeline_cfg.thumbnail_size)[0])
        for side_index, joint in enumerate(detection.joints):
            write_png(written / f"{index}_{side_index}.png", joint.crop)
    seconds["write (crops, thumbnails)"] = time.perf_counter() - start

    inputs = args.work / "inputs"
    inputs.mkdir(exist_ok=True)
    for path in paths:
        if not (inputs / path.name).exists():
            (inputs / path.name).symlink_to(path.resolve())
    out = args.work / "run"
    start = time.perf_counter()
    run_pipeline(inputs, out, pipeline_cfg, detect_cfg, grade_cfg, detector=detector, grader=grader)
    pipeline_seconds = time.perf_counter() - start
    report_cfg = load_config(PipelineConfig, overrides={"report": True})
    start = time.perf_counter()
    run_pipeline(inputs, out, report_cfg, detect_cfg, grade_cfg, detector=detector, grader=grader)
    seconds["report (resumed run: final grades, Grad-CAM, HTML)"] = time.perf_counter() - start

    n = len(paths)
    print(f"{n} films, {len(crops)} knees; stages run alone, one after the other")
    print("| stage | s | ms per film | films/s |")
    print("|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {1000 * value / n:.0f} | {n / value:.1f} |")
    serial = sum(v for k, v in seconds.items() if not k.startswith(("grade, keras", "report")))
    print(
        f"| sum of decode, detect, grade ({grader.runtime}), write | {serial:.2f} | {1000 * serial / n:.0f} | "
        f"{n / serial:.1f} |"
    )
    print(
        f"| kneepipe run end to end (overlapped, no report) | {pipeline_seconds:.2f} | "
        f"{1000 * pipeline_seconds / n:.0f} | {n / pipeline_seconds:.1f} |"
    )


if __name__ == "__main__":
    main()
