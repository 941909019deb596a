"""``kneepipe detect``: a thin wrapper over the library.

Only typer and pathlib load at import time; torch and Ultralytics load when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kneepipe.cli_common import (
    EXIT_FAILED,
    ConfigOption,
    OverridesArgument,
    StrictOption,
    VerboseOption,
    batch_exit_code,
    console,
    fail,
    resolve_config,
)


def detect(
    inputs: Annotated[Path, typer.Argument(help="A radiograph, or a folder searched recursively.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the joint crops and joints.csv.")],
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Detector weights (.pt) instead of the shipped one.")
    ] = None,
    conf: Annotated[float | None, typer.Option(help="Minimum joint confidence (0-1).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    strict: StrictOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Find every knee joint and write a 224x224 crop per joint plus joints.csv.

    Exit code 0 when every file got a result (joints, or no knee / not gradable / skipped with
    a reason), 3 when some files could not be read or processed, 5 with --strict when some were
    not graded, 1 when nothing could run (missing input or weights), 2 for a bad config.
    """
    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.config import DetectConfig

    cfg = resolve_config(DetectConfig, config, overrides, {"model": str(model) if model else None, "conf": conf})
    from kneepipe.detect.predict import JointDetector, detect_folder

    if not inputs.exists():
        fail(f"{inputs}: no such file or folder", EXIT_FAILED)
    try:
        with native_logs_hidden():
            detector = JointDetector.load(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(f"cannot load the detector: {err}", EXIT_FAILED)
    try:
        summary = detect_folder(inputs, out_dir, cfg, detector=detector, progress=not no_progress)
    except OSError as err:  # the output folder cannot be written: a full disk, no permission
        fail(f"cannot write to {out_dir}: {err.strerror or err}", EXIT_FAILED)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(summary.status_counts.items()))
    where = escape(str(summary.joints_csv))
    console.print(f"{summary.images} radiographs, {summary.joints} joints ({counts}) -> {where}", highlight=False)
    if summary.skipped:
        console.print(
            f"{summary.skipped} entries skipped ({summary.hidden_skipped} hidden); each has a row in joints.csv"
        )
    errors = summary.status_counts.get("error", 0)
    if errors:
        console.print(f"[yellow]{errors} file(s) could not be processed; see joints.csv[/]")
    raise typer.Exit(batch_exit_code(summary.statuses, strict, summary.hidden_skipped))


def export_detector(
    model: Annotated[
        Path | None, typer.Option("--model", help="Detector weights (.pt); default: the shipped ones.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="Compiled format: openvino or onnx.")] = "openvino",
    imgsz: Annotated[
        int | None,
        typer.Option(help="Inference size to trace at (default: detect.imgsz); an onnx graph takes any size."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Training crops <grade>/<crop>.png: quantise to INT8, calibrated on films made of them."),
    ] = None,
    films: Annotated[int, typer.Option(help="Calibration pseudo-radiographs composed from --calibration.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the calibration films.")] = 0,
    verbose: VerboseOption = False,
) -> None:
    """Compile the detector beside its weights; `detect.runtime=openvino` (or `onnx`) runs it.

    With --calibration the OpenVINO network is quantised to INT8 (`detect.runtime=openvino-int8`).
    A record of the weights' digest and the compiled files' checksums ties them; the .pt file
    stays the reference (`detect.runtime=torch`).
    """
    from kneepipe.runtime import native_logs_hidden, prepare_frameworks, set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.compiled import FORMATS

    if fmt not in FORMATS:
        fail(f"format {fmt!r}: the detector exports to {' or '.join(FORMATS)}")
    if calibration is not None and fmt != "openvino":
        fail(f"format {fmt!r}: INT8 (--calibration) is compiled for openvino only")
    if imgsz is None:
        from kneepipe.config import load_config
        from kneepipe.detect.config import DetectConfig

        imgsz = load_config(DetectConfig).imgsz
    prepare_frameworks()
    from kneepipe.detect.compiled import compiled_paths
    from kneepipe.detect.compiled import export_detector as export

    try:
        with native_logs_hidden():
            compiled = export(model, imgsz, fmt, calibration, films, seed)
    except (OSError, ValueError) as err:
        fail(f"cannot export the detector: {err}")
    files = [compiled] if compiled.is_file() else sorted(compiled.iterdir())
    size = sum(path.stat().st_size for path in files) / 1e6
    from kneepipe.detect.predict import DEFAULT_WEIGHTS

    record = compiled_paths(model or DEFAULT_WEIGHTS, fmt, calibration is not None)[1]
    console.print(f"wrote {escape(str(compiled))} ({size:.1f} MB) and its record {record.name}")
