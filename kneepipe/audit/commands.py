"""``kneepipe audit`` and ``kneepipe split``: thin wrappers over :mod:`kneepipe.audit`.

Only typer and pathlib load at import time; numpy, OpenCV and the audit load when a
command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kneepipe.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FILE_ERRORS,
    EXIT_LEAKAGE,
    EXIT_OK,
    ConfigOption,
    OverridesArgument,
    console,
    fail,
    resolve_config,
)

# How many pairs of each kind the summary lists before "... and N more".
_SHOWN_PER_KIND = 5


def audit(
    folder_a: Annotated[Path, typer.Argument(help="Reference folder (e.g. the training crops), searched recursively.")],
    folder_b: Annotated[Path, typer.Argument(help="Folder audited against it (e.g. val, test, a clinic's batch).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for leakage.csv and args.yaml.")],
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    copy_correlation: Annotated[
        float | None, typer.Option(help="Aligned band-pass correlation from which a pair is a copy (0-1).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0 or 1 = in this process).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Find images of FOLDER_B that copy images of FOLDER_A, and patients in both.

    Copies are found renamed, resized, re-encoded, re-contrasted (stretch, gamma,
    equalisation, CLAHE), slightly cropped or shifted, and mirrored; exact duplicates
    within one folder are reported too.

    Writes OUT/leakage.csv (file_a,file_b,kind,distance). Exit code 4 when the folders
    share an image or a patient (so a training script can stop), 0 when they do not,
    3 when they do not but some files could not be read, 1 or 2 when it could not run.
    """
    from kneepipe.audit.config import AuditConfig

    cfg = resolve_config(AuditConfig, config, overrides, {"copy_correlation": copy_correlation, "workers": workers})
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn

    from kneepipe.audit.leakage import LEAKAGE_KINDS, audit_leakage, write_leakage_csv
    from kneepipe.config import save_config

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=no_progress,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            report = audit_leakage(folder_a, folder_b, cfg, progress=progress)
        except FileNotFoundError as err:
            fail(str(err), EXIT_FAILED)
        except ValueError as err:
            fail(str(err), EXIT_CONFIG)

    csv_path = write_leakage_csv(report.pairs, out / "leakage.csv")
    save_config(cfg, out, extra={"folder_a": str(folder_a), "folder_b": str(folder_b)})
    counts = report.counts()
    console.print(
        f"audited {report.images_b} images of {folder_b} against {report.images_a} of {folder_a} "
        f"in {report.seconds:.1f} s ({report.search} candidate search, "
        f"{report.verified_pairs} candidate pairs verified)"
    )
    for kind, count in counts.items():
        shown = [pair for pair in report.pairs if pair.kind == kind][:_SHOWN_PER_KIND]
        colour = "red" if kind in LEAKAGE_KINDS else "yellow"
        console.print(f"[{colour}]{kind}: {count}[/]")
        for pair in shown:
            distance = "" if pair.distance is None else f"  (distance {pair.distance:.3f})"
            console.print(f"  {escape(str(pair.file_a))}  <->  {escape(str(pair.file_b))}{distance}", highlight=False)
        if count > len(shown):
            console.print(f"  ... and {count - len(shown)} more in {escape(str(csv_path))}", highlight=False)
    if report.shared_patients:
        console.print(f"[red]patients in both folders: {len(report.shared_patients)}[/]")
    for path, reason in report.unreadable:
        console.print(f"[yellow]unreadable: {escape(str(path))}: {escape(reason)}[/]", highlight=False)
    console.print(f"pairs -> {escape(str(csv_path))}", highlight=False)
    if report.has_leakage:
        console.print("[bold red]LEAKAGE: the folders share images or patients[/]")
        raise typer.Exit(EXIT_LEAKAGE)
    console.print("[green]no leakage found[/]")
    raise typer.Exit(EXIT_FILE_ERRORS if report.unreadable else EXIT_OK)


def split(
    data: Annotated[Path, typer.Argument(help="Folder of crops in <kl_grade>/ folders (any depth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New or empty folder for split.csv and the link tree.")],
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    fractions: Annotated[
        str | None, typer.Option(help="Shares of patients in train,val,test, e.g. 0.7,0.15,0.15.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed of the split.")] = None,
) -> None:
    """Split labelled crops by patient (no patient in two parts), stratified by grade.

    Writes OUT/split.csv (file,part,kl_grade,patient_id,side) and OUT/<part>/<kl_grade>/
    links to the crops, the layout `kneepipe train grader` reads; prints each part's
    grade distribution.
    """
    from kneepipe.audit.config import AuditConfig

    parsed_fractions = None
    if fractions is not None:
        try:
            parsed_fractions = [float(share) for share in fractions.split(",")]
        except ValueError:
            fail(f"--fractions {fractions!r}: expected three numbers such as 0.7,0.15,0.15", EXIT_CONFIG)
    cfg = resolve_config(AuditConfig, config, overrides, {"fractions": parsed_fractions, "seed": seed})
    from kneepipe import KL_GRADES
    from kneepipe.audit.split import split_dataset
    from kneepipe.config import save_config

    try:
        summary = split_dataset(
            data, out, fractions=cfg.fractions, seed=cfg.seed, link=cfg.link, patient_pattern=cfg.patient_pattern
        )
    except FileNotFoundError as err:
        fail(str(err), EXIT_FAILED)
    except ValueError as err:
        fail(str(err), EXIT_CONFIG)
    save_config(cfg, out, extra={"data": str(data)})
    console.print(f"{'part':<6} {'patients':>8} {'knees':>6} " + " ".join(f"{f'KL{g}':>9}" for g in KL_GRADES))
    for part, part_summary in summary.parts.items():
        cells = " ".join(
            f"{count:>5} {share:>3.0%}"
            for count, share in zip(part_summary.grade_counts, part_summary.grade_shares, strict=True)
        )
        console.print(f"{part:<6} {part_summary.patients:>8} {part_summary.knees:>6} {cells}")
    if summary.without_patient_id:
        console.print(
            f"[yellow]{summary.without_patient_id} crops carry no patient id in their name: "
            f"each counts as its own patient[/]"
        )
    if summary.skipped:
        console.print(
            f"[yellow]{len(summary.skipped)} images skipped (not in a <kl_grade>/ folder), "
            f"e.g. {summary.skipped[0][0]}[/]"
        )
    console.print(f"split -> {summary.split_csv}")
    raise typer.Exit(EXIT_OK)
