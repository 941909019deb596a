"""``kneepipe grade``: parse, resolve config, call the library, print (training: :mod:`kneepipe.training.commands`)."""

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


def grade(
    crops: Annotated[Path, typer.Argument(help="A crop file or a folder of crops (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for grades.csv, metrics.json, args.yaml.")],
    model: Annotated[str | None, typer.Option("--model", help="Grader file; default: the shipped model.")] = None,
    precision: Annotated[str | None, typer.Option(help="Inference precision: float32 or bfloat16.")] = None,
    adapt_prior: Annotated[
        bool | None, typer.Option("--adapt-prior/--no-adapt-prior", help="Re-estimate the batch's grade prior by EM.")
    ] = None,
    prior: Annotated[str | None, typer.Option(help="A known grade prior p0,p1,p2,p3,p4 to regrade with.")] = None,
    config: ConfigOption = None,
    strict: StrictOption = False,
    verbose: VerboseOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Grade knee crops with the KL grade 0-4 and its probabilities; evaluate labelled folders.

    Exit code 0 when every file got a result (graded, or skipped with a reason), 3 when some
    could not be read or graded, 5 with --strict when some were skipped, 1 cannot run, 2 bad config.
    """
    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(verbose)
    from kneepipe.grade.config import GradeConfig

    cfg = resolve_config(
        GradeConfig,
        config,
        overrides,
        {"model": model, "precision": precision, "adapt_prior": adapt_prior, "prior": prior},
    )
    if not crops.exists():
        fail(f"{crops}: no such file or folder")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from kneepipe.grade.folder import grade_folder, prior_summary
    from kneepipe.grade.predict import Grader
    from kneepipe.metrics import format_metrics

    try:
        with native_logs_hidden():
            grader = Grader.load(cfg.model, precision=cfg.precision)
    except (OSError, ValueError) as err:
        fail(f"cannot load the grader: {err}")
    with Progress("grading", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("grading", total=None)
        try:
            run = grade_folder(
                crops,
                out,
                cfg,
                grader=grader,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except ValueError as err:
            fail(str(err))
        except OSError as err:  # the output folder cannot be written: a full disk, no permission
            fail(f"cannot write to {out}: {err.strerror or err}")
    graded = len(run.rows) - len(run.refused) - len(run.skipped)
    console.print(f"graded {graded} crops with {grader.version} -> {escape(str(out / 'grades.csv'))}", highlight=False)
    for row in run.refused:
        console.print(f"[yellow]error[/] {escape(row['crop'])}: {escape(row['message'])}", highlight=False)
    hidden = sum(bool(row.get("hidden")) for row in run.skipped)
    if run.skipped:
        console.print(f"{len(run.skipped)} entries skipped ({hidden} hidden); each has a row in grades.csv")
    summary = prior_summary(run.priors)
    if summary:
        console.print(f"grade prior: {escape(summary)}", highlight=False)
    if run.metrics:
        m = run.metrics
        console.print(f"[bold]true vs predicted grade counts (KL0-4): {m['true_counts']} vs {m['predicted_counts']}[/]")
        console.print(format_metrics(m))
        console.print(
            f"ECE before / after temperature scaling (T={m['temperature']:.3f}): "
            f"{m['ece_uncalibrated']} / {m['ece_calibrated']}"
        )
    if len(run.rows) == len(run.skipped):
        fail(f"{crops}: no images found ({len(run.skipped)} other entries skipped)", EXIT_FAILED)
    raise typer.Exit(batch_exit_code([row["status"] for row in run.rows], strict, hidden))
