"""``kneepipe detect`` and ``kneepipe train detector``: thin wrappers over the library.

Only typer and pathlib load at import time; torch and Ultralytics load when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kneepipe.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SOME_REFUSED,
    ConfigOption,
    OverridesArgument,
    console,
    fail,
    resolve_config,
)


def detect(
    inputs: Annotated[Path, typer.Argument(help="A radiograph, or a folder searched recursively.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the joint crops and joints.csv.")],
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Detector weights (.pt) instead of the shipped one.")
    ] = None,
    conf: Annotated[float | None, typer.Option(help="Minimum joint confidence (0-1).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Find every knee joint and write a 224x224 crop per joint plus joints.csv.

    Exit code 0 when every file was read, 3 when some files got an error row,
    1 when nothing could run (missing input or weights), 2 for a bad config.
    """
    from kneepipe.detect.config import DetectConfig

    cfg = resolve_config(DetectConfig, config, overrides, {"model": str(model) if model else None, "conf": conf})
    from kneepipe.detect.predict import JointDetector, detect_folder

    if not inputs.exists():
        fail(f"{inputs}: no such file or folder", EXIT_FAILED)
    try:
        detector = JointDetector.load(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(f"cannot load the detector: {err}", EXIT_FAILED)
    summary = detect_folder(inputs, out_dir, cfg, detector=detector, progress=not no_progress)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(summary.status_counts.items()))
    console.print(f"{summary.images} radiographs, {summary.joints} joints ({counts}) -> {summary.joints_csv}")
    errors = summary.status_counts.get("error", 0)
    if errors:
        console.print(f"[yellow]{errors} file(s) could not be processed; see joints.csv[/]")
    raise typer.Exit(EXIT_SOME_REFUSED if errors else EXIT_OK)


def train_detector(
    out_dir: Annotated[Path, typer.Argument(help="Run folder (dataset, Ultralytics run, args.yaml).")],
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT_DIR.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
) -> None:
    """Train the knee-joint detector on composites of the OAI crops (offline, CPU)."""
    from kneepipe.detect.config import DetectConfig

    cfg = resolve_config(DetectConfig, config, overrides, {"train_epochs": epochs})
    from kneepipe.detect.train import train_detector as train

    try:
        best = train(cfg, out_dir, resume=resume)
    except FileNotFoundError as err:
        fail(str(err), EXIT_FAILED)
    console.print(f"trained detector: {best}")
