"""``kneepipe run``: parse, resolve the three configs, call :func:`kneepipe.pipeline.run.run_pipeline`, print.

Only typer and pathlib load at import time; the models and their frameworks load when the
command runs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kneepipe.cli_common import (
    EXIT_CONFIG,
    ConfigOption,
    OverridesArgument,
    StrictOption,
    VerboseOption,
    batch_exit_code,
    console,
    fail,
    resolve_config,
    route_overrides,
)

MAX_LISTED = 30  # refused files named in the summary; all of them are in results.csv


class Engine(StrEnum):
    """Where ``kneepipe run`` grades: in this process, or on a Ray cluster's model-holding actors."""

    local = "local"
    ray = "ray"


def split_overrides(overrides: list[str] | None) -> dict[str, list[str]]:
    """Route ``key=value`` overrides to their stage: ``detect.conf=0.3`` -> detect, ``batch=8`` -> pipeline.

    >>> split_overrides(["batch=8", "detect.conf=0.3"])
    {'pipeline': ['batch=8'], 'detect': ['conf=0.3'], 'grade': []}
    """
    return route_overrides(overrides, "pipeline")


def run(
    inputs: Annotated[
        Path,
        typer.Argument(
            help="A radiograph, a folder of radiographs (searched recursively), "
            "or a .txt list of paths or file:// URIs."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: results.csv, crops, args.yaml (resumed if interrupted).")
    ],
    report: Annotated[
        bool | None, typer.Option("--report/--no-report", help="Write report.html (self-contained, offline).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV image,side,kl_grade[,x1,y1,x2,y2]: evaluate end to end, write metrics.json."),
    ] = None,
    detector_model: Annotated[
        str | None, typer.Option("--detector", help="Detector weights (.pt); default: the shipped model.")
    ] = None,
    grader_model: Annotated[
        str | None, typer.Option("--grader", help="Grader file (.npz); default: the shipped model.")
    ] = None,
    adapt_prior: Annotated[
        bool | None,
        typer.Option(
            "--adapt-prior/--no-adapt-prior",
            help="Re-estimate the batch's grade prior by EM (MAP, held towards the training mix).",
        ),
    ] = None,
    prior: Annotated[str | None, typer.Option(help="A known grade prior p0,p1,p2,p3,p4 to regrade with.")] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite", help="Start afresh: remove an earlier run's outputs from --out.")
    ] = None,
    dicom: Annotated[
        bool,
        typer.Option("--dicom", help="Write a DICOM SR and Secondary Capture per graded DICOM film into OUT/dicom/."),
    ] = False,
    config: ConfigOption = None,
    detect_config: Annotated[
        Path | None, typer.Option("--detect-config", help="YAML overriding configs/detect.yaml.")
    ] = None,
    grade_config: Annotated[
        Path | None, typer.Option("--grade-config", help="YAML overriding configs/grade.yaml.")
    ] = None,
    engine: Annotated[
        Engine, typer.Option(help="local: this process; ray: model-holding actors on a Ray cluster (Ray Data).")
    ] = Engine.local,
    address: Annotated[
        str | None,
        typer.Option(
            help="With --engine ray: the cluster to join ('auto': the one `ray start` set up on this node); "
            "default: a Ray instance started on this machine."
        ),
    ] = None,
    actor_cpus: Annotated[
        float, typer.Option(help="With --engine ray: CPUs each actor (one detector and one grader) reserves.", min=0.5)
    ] = 2.0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    strict: StrictOption = False,
    verbose: VerboseOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Find, crop and grade every knee of every radiograph; evaluate with --labels; report with --report.

    Overrides: pipeline keys as key=value; the stages' keys prefixed, e.g. detect.conf=0.3 grade.batch=16.

    Exit code: 0 every file got a result (graded, or not gradable / skipped with a reason); 3 some files
    could not be read or processed; 5 with --strict when some were not graded; 1 cannot run; 2 bad config.
    """
    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig

    routed = split_overrides(overrides)
    pipeline_cfg = resolve_config(
        PipelineConfig, config, routed["pipeline"], {"report": report, "overwrite": overwrite}
    )
    detect_cfg = resolve_config(
        DetectConfig, detect_config, routed["detect"], {"model": detector_model}, prefix="detect."
    )
    grade_cfg = resolve_config(
        GradeConfig,
        grade_config,
        routed["grade"],
        {"model": grader_model, "adapt_prior": adapt_prior, "prior": prior},
        prefix="grade.",
    )
    if not inputs.exists():
        fail(f"{inputs}: no such file or folder")
    if engine is Engine.local and address is not None:
        fail("--address names a Ray cluster: pass --engine ray too", EXIT_CONFIG)
    if labels is not None:
        from kneepipe.pipeline.evaluate import read_labels

        if not labels.is_file():
            fail(f"{labels}: labels file not found")
        try:
            read_labels(labels)  # checked before the models load: a bad line costs seconds, not minutes
        except ValueError as err:
            fail(str(err))

    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kneepipe.pipeline.run import load_models, run_pipeline
    from kneepipe.pipeline.state import OutputConflictError

    if engine is Engine.ray:
        try:
            from ray.exceptions import RayError
        except ImportError:
            fail("--engine ray needs Ray: pip install 'kneepipe[ray]'")
        from kneepipe.pipeline.ray_engine import run_pipeline_ray

        def run_on_engine(*args, **kwargs):
            return run_pipeline_ray(*args, address=address, actor_cpus=actor_cpus, **kwargs)

        engine_errors: tuple[type[Exception], ...] = (RayError, ConnectionError)
    else:
        run_on_engine, engine_errors = run_pipeline, ()

    try:
        with native_logs_hidden():
            detector, grader = load_models(detect_cfg, grade_cfg)
    except (OSError, ValueError, RuntimeError) as err:
        fail(f"cannot load the models: {err}")

    speed: dict[str, Any] = {"start": None, "first": 0}

    def on_progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if speed["start"] is None:
            speed["start"], speed["first"] = now, done
        elapsed = now - speed["start"]
        rate = f"{(done - speed['first']) / elapsed:.2f} images/s" if done > speed["first"] and elapsed > 0 else ""
        bar.update(task, completed=done, total=total, rate=rate)

    with Progress(
        "grading radiographs",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=no_progress,
    ) as bar:
        task = bar.add_task("run", total=None, rate="")
        try:
            result = run_on_engine(
                inputs,
                out,
                pipeline_cfg,
                detect_cfg,
                grade_cfg,
                labels=labels,
                progress=on_progress,
                detector=detector,
                grader=grader,
                extra={"engine": engine.value},
            )
        except OutputConflictError as err:
            fail(str(err), EXIT_CONFIG)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail(f"interrupted; the same command continues where it stopped (journal in {out})")
        except engine_errors as err:  # the cluster cannot be reached, or a step failed on every retry
            fail(f"the Ray run stopped: {err}; the same command continues where it stopped (journal in {out})")
        except OSError as err:  # the run folder cannot be written: a full disk, no permission
            fail(f"cannot write the run folder {out}: {err.strerror or err}; the same command resumes once it can")
    if dicom:
        from kneepipe.dicom.export import write_dicom_results

        write_dicom_results(result, detector.version, grader.version)
    print_summary(result)
    hidden = sum(bool(entry["hidden"]) for entry in result.skipped)
    raise typer.Exit(batch_exit_code([row["status"] for row in result.rows], strict, hidden))


def print_summary(result) -> None:
    """The end-of-run summary: what was read, graded and refused, the grades, and the metrics."""
    from kneepipe import KL_GRADES
    from kneepipe.grade.commands import print_shift
    from kneepipe.grade.folder import prior_summary
    from kneepipe.metrics import format_metrics

    s = result.summary
    resumed = f" ({result.resumed} done before in this folder)" if result.resumed else ""
    rate = f"; {s['images_per_s']} radiographs/s, {s['knees_per_s']} knees/s" if s.get("images_per_s") else ""
    console.print(
        f"[bold]{s['images']} radiographs{resumed}: {s['images_read']} read, {s['knees_graded']} knees graded, "
        f"{len(s['refused_files'])} refused[/]{rate}",
        highlight=False,
    )
    counts = "  ".join(f"KL{g} {c}" for g, c in zip(KL_GRADES, s["grade_counts"], strict=True))
    console.print(f"grades: {counts}")
    for group, tally in (s.get("groups") or {}).items():
        group_counts = "  ".join(f"KL{g} {c}" for g, c in zip(KL_GRADES, tally["grade_counts"], strict=True))
        console.print(
            f"  {escape(group)}: {tally['images']} radiographs, {tally['knees_graded']} knees: {group_counts}",
            highlight=False,
        )
    if s["refused"]:
        console.print("refused: " + ", ".join(f"{status} {n}" for status, n in s["refused"].items()))
        for row in s["refused_files"][:MAX_LISTED]:
            console.print(
                f"  [yellow]{row['status']}[/] {escape(row['image'])}: {escape(row['message'])}", highlight=False
            )
        if len(s["refused_files"]) > MAX_LISTED:
            console.print(f"  ... and {len(s['refused_files']) - MAX_LISTED} more (see results.csv)")
    if s.get("skipped") or s.get("skipped_hidden"):
        console.print(
            f"skipped: {s['skipped']} entries that are not radiographs, and {s['skipped_hidden']} hidden "
            "(each has a row in results.csv)"
        )
        for row in s["skipped_entries"][:MAX_LISTED]:
            console.print(f"  [dim]skipped[/] {escape(row['image'])}: {escape(row['message'])}", highlight=False)
        if len(s["skipped_entries"]) > MAX_LISTED:
            console.print(f"  ... and {len(s['skipped_entries']) - MAX_LISTED} more (see results.csv)")
    if s.get("links_outside_input"):
        console.print(
            f"{len(s['links_outside_input'])} file(s) read through links pointing outside the input folder "
            "(links to files are followed; see their messages)"
        )
    prior_line = prior_summary(s.get("priors", {}))
    if prior_line:
        console.print(f"grade prior: {escape(prior_line)}", highlight=False)
    print_shift(s.get("shift", {}))
    if result.metrics:
        m = result.metrics
        console.print(
            f"[bold]end to end against the labels: {m['labelled_knees']} knees, {m['matched']} matched, "
            f"{m['missed']} missed, {m['misassigned']} on the wrong side[/]"
        )
        console.print(format_metrics(m))
        console.print(f"graded knees only: accuracy {m['graded_only']['accuracy']}, QWK {m['graded_only']['qwk']}")
    if "dicom" in s:
        from kneepipe.dicom.export import describe_dicom_results

        console.print(escape(describe_dicom_results(s["dicom"])), highlight=False)
    written = ["results.csv", "summary.json"] + (["metrics.json"] if result.metrics else [])
    written += ["report.html"] if result.report else []
    console.print(f"-> {escape(str(result.out_dir))}/: {', '.join(written)}", highlight=False)
