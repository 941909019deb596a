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
