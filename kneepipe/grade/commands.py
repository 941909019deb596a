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
        bool | None,
        typer.Option(
            "--adapt-prior/--no-adapt-prior",
            help="Re-estimate the batch's grade prior by EM (MAP, held towards the training mix).",
        ),
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
            grader = Grader.from_config(cfg)
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
    print_shift(run.shift)
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


def print_shift(shift: dict) -> None:
    """One line on the batch's shift score, and a warning when it is high."""
    if not shift:
        return
    if shift.get("shift_score") is None:
        console.print(f"shift score: {escape(shift.get('shift_note', 'not computed'))}", highlight=False)
        return
    console.print(
        f"shift score {shift['shift_score']:.2f} (warns above {shift['shift_warn_above']}); "
        f"batch-norm statistics {shift.get('batch_norm', 'as trained')}",
        highlight=False,
    )
    if shift["shift_warning"]:
        console.print(f"[bold yellow]warning[/] {escape(shift['shift_note'])}", highlight=False)


def adapt(
    labelled: Annotated[
        Path, typer.Argument(help="The site's labelled knee crops: folders 0/..4/, or a CSV with image,kl_grade.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The site grader file to write (.npz); a card goes beside.")],
    model: Annotated[str | None, typer.Option("--model", help="The grader to adapt; default: the shipped one.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the measured figures.", min=2, max=20)] = 5,
    repeats: Annotated[
        int, typer.Option(help="Fold splits the cross-validation is repeated over (their mean is reported).", min=1)
    ] = 3,
    batch_norm: Annotated[
        bool, typer.Option("--batch-norm/--no-batch-norm", help="Also re-estimate batch-norm statistics on the site.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the folds and the bootstrap.")] = 0,
    verbose: VerboseOption = False,
) -> None:
    """Fit a site grader from a small labelled sample of a clinic's own knees, with cross-validated figures.

    Writes OUT (use it with `kneepipe grade/run --model OUT`) and OUT's model card (.md).
    Exit code 0 when written, 1 when the sample is refused (too small, grades missing) or unreadable.
    """
    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from kneepipe.grade.adapt import AdaptSettings, SampleError, adapt_grader, load_sample
    from kneepipe.grade.predict import Grader

    if out.suffix != ".npz":
        fail(f"{out}: a grader file is an .npz")
    try:  # before minutes of work: the output folder must take the file
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        fail(f"cannot write {out}: {err.strerror or err}")
    try:
        with native_logs_hidden():
            grader = Grader.load(model)
    except (OSError, ValueError) as err:
        fail(f"cannot load the grader: {err}")
    if grader.is_site_grader:
        fail(f"{grader.path}: already a site grader; adapt the grader it was made from")
    settings = AdaptSettings(folds=folds, repeats=repeats, adapt_batch_norm=batch_norm, seed=seed)
    try:
        sample = load_sample(labelled, grader.preprocessing.crop_size, folds)
    except SampleError as err:
        fail(str(err))
    for path, reason in sample.unreadable:
        console.print(f"[yellow]left out[/] {escape(str(path))}: {escape(reason)}", highlight=False)
    console.print(f"site sample: {len(sample.grades)} knees, KL0-4 counts {sample.counts}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        try:
            with native_logs_hidden():
                facts = adapt_grader(grader, sample, out, settings, progress)
        except OSError as err:
            fail(f"cannot write {out}: {err.strerror or err}")
    cv = facts["cross_validation"]
    console.print(f"{folds}-fold cross-validation on the sample (out-of-fold grades, bootstrap 95% intervals):")
    for name in ("before", "after"):
        f = cv[name]
        console.print(
            f"  {name:6s} accuracy {f['accuracy']:.3f} [{f['accuracy_ci95'][0]:.3f}, {f['accuracy_ci95'][1]:.3f}]  "
            f"QWK {f['qwk']:.3f} [{f['qwk_ci95'][0]:.3f}, {f['qwk_ci95'][1]:.3f}]  MAE {f['mae']:.3f}  "
            f"predicted KL0-4 {f['predicted_counts']} (true {f['true_counts']})"
        )
    splits = cv["splits"]
    if len(splits["seeds"]) > 1:
        console.print(
            f"  after, over {len(splits['seeds'])} fold splits: accuracy {splits['accuracy']} "
            f"(mean {splits['accuracy_mean']:.3f}), QWK {splits['qwk']} (mean {splits['qwk_mean']:.3f})"
        )
    console.print(
        f"site grader -> {escape(str(out))}, card -> {escape(str(out.with_suffix('.md')))} ({facts['minutes']} min)",
        highlight=False,
    )


def export_grader(
    calibration: Annotated[
        Path | None,
        typer.Option(help="Training crops <grade>/<crop>.png to calibrate INT8 on (never val)."),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Grader file; default: the shipped model.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Compiled format: openvino.")] = "openvino",
    int8: Annotated[bool, typer.Option("--int8/--float32", help="INT8 post-training quantisation.")] = True,
    crops: Annotated[int, typer.Option(help="Calibration crops drawn from --calibration.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the calibration draw.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The .xml; default: beside the grader.")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Compile a grader for the CPU (OpenVINO IR, INT8 by default) beside its grader file.

    The grader file stays the float32 reference; `grade.runtime=openvino` grades with the
    compiled network found beside it, which a record of checksums ties to that file.
    """
    from kneepipe.runtime import native_logs_hidden, prepare_frameworks, set_verbosity

    set_verbosity(verbose)
    prepare_frameworks()
    from kneepipe.grade.compiled import export_grader as export

    try:
        with native_logs_hidden():
            xml_path = export(model, calibration, fmt, int8, crops, seed, out)
    except (OSError, ValueError) as err:
        fail(f"cannot export the grader: {err}")
    size = sum(p.stat().st_size for p in (xml_path, xml_path.with_suffix(".bin"))) / 1e6
    console.print(f"wrote {escape(str(xml_path))} (+ .bin, {size:.1f} MB) and its record {xml_path.stem}.json")
