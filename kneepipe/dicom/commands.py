"""``kneepipe listen`` and ``kneepipe send``: parse, resolve the configs, call the DICOM node or sender, print.

Only typer loads at import time; pynetdicom, the models and their frameworks load when a
command runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from kneepipe.cli_common import (
    EXIT_CONFIG,
    ConfigOption,
    OverridesArgument,
    VerboseOption,
    console,
    fail,
    resolve_config,
    route_overrides,
)


def listen(
    config: ConfigOption = None,
    verbose: VerboseOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Be a DICOM node: receive knee films (C-STORE), grade each once, send its SR and Secondary Capture on.

    The node's keys (configs/pacs.yaml: AE title, port, allowed callers, destination) as
    key=value; the pipeline's and the stages' keys prefixed, e.g. detect.conf=0.3. Stops on
    Ctrl-C or SIGTERM; films not yet graded are graded at the next start.
    """
    import logging
    import signal
    import threading

    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.config import DetectConfig
    from kneepipe.dicom.config import PacsConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig

    routed = route_overrides(overrides, "pacs")
    pacs_cfg = resolve_config(PacsConfig, config, routed["pacs"])
    pipeline_cfg = resolve_config(PipelineConfig, None, routed["pipeline"], prefix="pipeline.")
    detect_cfg = resolve_config(DetectConfig, None, routed["detect"], prefix="detect.")
    grade_cfg = resolve_config(GradeConfig, None, routed["grade"], prefix="grade.")
    if not pacs_cfg.allowed_callers:
        fail("allowed_callers is empty: name the AE titles of the PACS or modalities that send films", EXIT_CONFIG)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("pynetdicom", "highdicom"):  # their INFO lines are per element copied, not per instance
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from kneepipe.dicom.node import DicomNode
    from kneepipe.pipeline.run import load_models

    try:
        with native_logs_hidden():
            detector, grader = load_models(detect_cfg, grade_cfg)
    except (OSError, ValueError, RuntimeError) as err:
        fail(f"cannot load the models: {err}")
    node = DicomNode(pacs_cfg, pipeline_cfg, detect_cfg, grade_cfg, detector=detector, grader=grader)
    try:
        node.start()
    except OSError as err:
        fail(f"cannot listen on {pacs_cfg.host}:{pacs_cfg.port}: {err.strerror or err}")
    destination = pacs_cfg.target or f"kept in {pacs_cfg.data}"
    console.print(
        f"[bold]{pacs_cfg.ae_title}[/] listening on {pacs_cfg.host}:{node.port}; films from "
        f"{', '.join(pacs_cfg.allowed_callers)}; results to {destination}",
        highlight=False,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    node.stop()
    tally = ", ".join(f"{count} {status}" for status, count in sorted(node.final_counts.items()))
    console.print(f"stopped; instances in the journal: {tally or 'none'}", highlight=False)


def send(
    files: Annotated[list[Path], typer.Argument(help="DICOM files, or folders of them, to send.")],
    to: Annotated[str, typer.Option("--to", help="AE@host:port (C-STORE) or a DICOMweb base URL (STOW-RS).")],
    ae_title: Annotated[str, typer.Option("--ae", help="This side's AE title.")] = "KNEEPIPE",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the destination.")] = 30.0,
) -> None:
    """Send DICOM files (e.g. a run's dicom/ folder) to a PACS: C-STORE, or STOW-RS for a URL."""
    from kneepipe.config import ConfigError
    from kneepipe.dicom.config import Destination
    from kneepipe.dicom.network import SendError, read_instances, send_instances

    try:
        destination = Destination.parse(to)
    except ConfigError as err:
        fail(f"--to: {err}", EXIT_CONFIG)
    paths: list[Path] = []
    for item in files:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item.is_file():
            paths.append(item)
        else:
            fail(f"{item}: no such file or folder")
    if not paths:
        fail("no files to send")
    try:
        send_instances(read_instances(paths), destination, ae_title, timeout)
    except SendError as err:
        fail(str(err))
    console.print(f"sent {len(paths)} instance(s) to {destination}", highlight=False)
