"""``kneepipe run``: every radiograph of a folder through both stages, resumable, with one results table.

For each radiograph: decode once (in a prefetch thread), find the joints with the detector,
grade their crops with the grader, write the crops, and journal the result. Both models
are loaded once; radiographs are detected ``batch`` at a time and their knees graded
together, in threads beside the detector, so throughput comes from batching and overlap
while memory holds only the radiographs in flight. At the end the grades are finalised
(temperature, then any prior adaptation over the whole batch), and ``results.csv``,
``summary.json``, with labels ``metrics.json`` and ``evaluation.csv``, and on request
``report.html`` are written in one piece each.

The run is built of parts that the Ray engine (:mod:`kneepipe.pipeline.ray_engine`) shares:
:func:`find_run_inputs` and :func:`open_run` list the inputs and open the run folder,
:func:`graded_steps` grades films step by step with loaded models, a :class:`RunJournal`
journals the records as they come back, and :func:`close_run` writes the outputs.

The input is a radiograph, a folder, or a text file listing radiographs (``.txt``: one path
or ``file://`` URI a line, relative paths from the list's folder; ``#`` starts a comment).

A file that cannot be read, shows no knee or a view that cannot be graded gets one row
with its status and reason; nothing about one file stops the batch. Every other entry
under the input folder (a text file, a hidden file, a FIFO, a broken link) gets a
``skipped`` row with the reason it was not read.

>>> from kneepipe.config import load_config
>>> run = run_pipeline("raw/", "out/", load_config(PipelineConfig), load_config(DetectConfig),
...                    load_config(GradeConfig))  # doctest: +SKIP
>>> run.summary["knees_graded"], run.summary["refused"]  # doctest: +SKIP
(41, {'not_gradable_view': 11, 'no_knee': 2})
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import numpy as np

from kneepipe import __version__
from kneepipe.config import save_config, to_dict
from kneepipe.decoding import decoded_radiographs
from kneepipe.detect.predict import Detector, FilmChecks, JointDetector, detect_radiographs
from kneepipe.files import file_digest, output_keys, write_atomic
from kneepipe.imaging import ImageReadError, InputListing, Radiograph, list_inputs, read_radiograph
from kneepipe.joints import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, Detection, Joint
from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.evaluate import LabelledKnee, read_labels
from kneepipe.pipeline.outputs import (
    RESULTS_COLUMNS,
    PipelineRun,
    batch_summary,
    finish_run,
    thumbnail_jpeg,
    write_png,
)
from kneepipe.pipeline.records import ImageRecord, KneeRecord, SkippedEntry, image_record
from kneepipe.pipeline.state import (
    JOURNAL,
    append_journal,
    fingerprint,
    fingerprint_parts,
    input_listing,
    prepare_output,
    read_journal,
    relative_name,
    repair_journal,
)

if TYPE_CHECKING:
    from kneepipe.detect.config import DetectConfig
    from kneepipe.detect.predict import JointDetector
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.predict import Grader

# The outputs' names stay importable from here, where the pipeline's users found them.
__all__ = [
    "RESULTS_COLUMNS",
    "Film",
    "FilmWork",
    "PipelineRun",
    "RunJournal",
    "RunPlan",
    "batch_summary",
    "close_run",
    "find_run_inputs",
    "finish_run",
    "graded_steps",
    "load_models",
    "open_run",
    "run_pipeline",
    "thumbnail_jpeg",
]
Progress = Callable[[int, int], None]


@overload
def load_models(
    detect_cfg: DetectConfig, grade_cfg: GradeConfig, detector: Literal[True] = ..., grader: Literal[True] = ...
) -> tuple[JointDetector, Grader]: ...


@overload
def load_models(
    detect_cfg: DetectConfig, grade_cfg: GradeConfig, detector: bool = ..., grader: bool = ...
) -> tuple[JointDetector | None, Grader | None]: ...


def load_models(
    detect_cfg: DetectConfig, grade_cfg: GradeConfig, detector: bool = True, grader: bool = True
) -> tuple[JointDetector | None, Grader | None]:
    """Load the detector and the grader (once each), the frameworks in the order that cannot crash.

    Returns ``(JointDetector | None, Grader | None)``; a model not asked for is None.
    """
    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    loaded_detector = loaded_grader = None
    if detector:
        from kneepipe.detect.predict import JointDetector

        loaded_detector = JointDetector.load(detect_cfg)
    if grader:
        from kneepipe.grade.predict import Grader

        loaded_grader = Grader.from_config(grade_cfg)
    if loaded_detector is not None and loaded_grader is not None:
        check_models(loaded_detector, loaded_grader)
    return loaded_detector, loaded_grader


def check_models(detector: Detector, grader: Grader) -> None:
    """Refuse a detector and a grader that disagree on how a crop is framed.

    The grader file records the framing it learnt from; the detector cuts its own. A
    grader trained on crops cut another way would grade every knee off its training.

    Raises:
        ValueError: naming both framings.
    """
    framing = getattr(detector, "framing", None)
    if framing is not None and grader.preprocessing.framing != framing:
        raise ValueError(
            f"{grader.version} expects crops framed as {grader.preprocessing.framing!r}, "
            f"but the detector cuts {framing!r}"
        )


LIST_SUFFIXES = (".txt",)
"""Suffixes of a text file listing the radiographs to read (one path or ``file://`` URI a line)."""


class Film(NamedTuple):
    """One input radiograph as the per-film work sees it: where to read it and how to name its outputs.

    ``name`` is its name in the outputs (its path below the input folder), ``key`` the stem of
    its crop and thumbnail files, ``note`` a remark every row of it carries ("" for none).
    """

    path: Path
    name: str
    key: str
    note: str = ""


@dataclass(frozen=True)
class FilmWork:
    """What grading a film needs besides the models and the film: the run folder and the configs."""

    out_dir: Path
    pipeline_cfg: PipelineConfig
    detect_cfg: DetectConfig
    grade_cfg: GradeConfig


@dataclass
class RunInputs:
    """What :func:`find_run_inputs` found: the files to read, what was skipped, and the names' root."""

    inputs: Path
    root: Path
    files: list[Path]
    listing: InputListing


@dataclass
class RunPlan:
    """A run folder opened by :func:`open_run`: every input as a :class:`Film`, and what is left to do."""

    found: RunInputs
    out_dir: Path
    films: list[Film]
    todo: list[Film]
    configs: dict[str, Any]
    labels: Path | None
    labelled: list[LabelledKnee] | None

    @property
    def journal(self) -> Path:
        return self.out_dir / JOURNAL

    @property
    def resumed(self) -> int:
        """Films journaled by earlier calls on this run folder."""
        return len(self.films) - len(self.todo)


class RunJournal:
    """The run's journal as results come back: each film written once, counted, and reported to ``progress``.

    A record of a film the journal already holds (a retried step that had come back
    before) is dropped, so every film has one line whatever the engine retried.
    """

    def __init__(self, plan: RunPlan, progress: Progress | None = None) -> None:
        self.path = plan.journal
        self.total = len(plan.films)
        self.completed = plan.resumed
        self.knees_processed = 0
        self.progress = progress
        self._written = {film.name for film in plan.films} - {film.name for film in plan.todo}
        if progress:
            progress(self.completed, self.total)

    def write(self, records: Sequence[ImageRecord]) -> int:
        """Append the records of films not yet journaled; returns how many were written."""
        new = []
        for record in records:
            if record["image"] not in self._written:
                self._written.add(record["image"])
                new.append(record)
        append_journal(self.path, new)
        self.completed += len(new)
        self.knees_processed += sum(len(record["knees"]) for record in new)
        if self.progress:
            self.progress(self.completed, self.total)
        return len(new)


def run_pipeline(
    inputs: str | Path,
    out_dir: str | Path,
    pipeline_cfg: PipelineConfig,
    detect_cfg: DetectConfig,
    grade_cfg: GradeConfig,
    labels: str | Path | None = None,
    progress: Progress | None = None,
    detector: Detector | None = None,
    grader: Grader | None = None,
    extra: dict[str, Any] | None = None,
) -> PipelineRun:
    """Detect, crop and grade every radiograph under ``inputs``; write the run folder ``out_dir``.

    Args:
        inputs: a radiograph file, a folder searched recursively, or a ``.txt`` list of radiographs.
        out_dir: the run folder; an interrupted run with the same inputs, models and
            config is resumed, a different run's folder is refused unless
            ``pipeline_cfg.overwrite``.
        pipeline_cfg: streaming, output and report options.
        detect_cfg: the detector's config (``configs/detect.yaml`` resolved).
        grade_cfg: the grader's config (``configs/grade.yaml`` resolved), including
            ``adapt_prior`` and ``prior``.
        labels: a labels CSV (``image,side,kl_grade`` [``,x1,y1,x2,y2``]) to evaluate against.
        progress: ``callable(images_done, images_total)``, called after every step.
        detector: an already loaded ``JointDetector`` (loaded from ``detect_cfg`` if None).
        grader: an already loaded ``Grader`` (loaded from ``grade_cfg`` if None).
        extra: more facts for ``args.yaml`` (the CLI records the engine there).

    Raises:
        FileNotFoundError: ``inputs`` does not exist or holds no image.
        ValueError: a bad labels file or input list.
        kneepipe.pipeline.state.OutputConflictError: ``out_dir`` holds another run.
    """
    found = find_run_inputs(inputs, out_dir)
    if detector is None or grader is None:
        loaded_detector, loaded_grader = load_models(detect_cfg, grade_cfg, detector is None, grader is None)
        detector, grader = detector or loaded_detector, grader or loaded_grader
    assert detector is not None and grader is not None  # loaded above when not given
    plan = open_run(found, out_dir, pipeline_cfg, detect_cfg, grade_cfg, detector, grader, labels, extra)
    journal = RunJournal(plan, progress)

    started = time.perf_counter()
    features: list[np.ndarray] = []  # pooled features of the knees graded now, for the shift score
    work = FilmWork(plan.out_dir, pipeline_cfg, detect_cfg, grade_cfg)
    with closing(graded_steps(plan.todo, detector, grader, work)) as steps:
        for records, pooled in steps:
            journal.write(records)
            features.extend(pooled)
    seconds = time.perf_counter() - started
    return close_run(plan, pipeline_cfg, grade_cfg, grader, detector.version, features, journal, seconds)


def find_run_inputs(inputs: str | Path, out_dir: str | Path) -> RunInputs:
    """The radiographs a run reads: a file, every file under a folder, or the files a ``.txt`` list names.

    Raises:
        FileNotFoundError: ``inputs`` does not exist or holds no radiograph.
        ValueError: a list naming storage that cannot be read as files (``s3://`` and the like).
    """
    inputs, out_dir = Path(inputs), Path(out_dir)
    if inputs.is_file() and inputs.suffix.lower() in LIST_SUFFIXES:
        listing = read_input_list(inputs)
    else:
        listing = list_inputs(inputs, exclude=(out_dir,))
    root = inputs if inputs.is_dir() else inputs.parent
    files = [path for path in listing.files if not _is_inside(path, out_dir)]
    if not files:
        skipped = f" ({len(listing.skipped)} other entries skipped: not images, hidden or special)"
        raise FileNotFoundError(
            f"{inputs}: no radiographs found (PNG, JPEG, TIFF or DICOM){skipped if listing.skipped else ''}"
        )
    return RunInputs(inputs, root, files, listing)


def read_input_list(list_file: Path) -> InputListing:
    """The radiographs a text file lists, each once, in its order.

    One path or ``file://`` URI a line; a relative path is taken from the list's folder;
    blank lines and lines starting with ``#`` are ignored. A listed file that is missing
    is still listed: reading it gives its row the reason. Storage reached through other
    URIs (``s3://``, ``gs://``, ``http://``) is read where it is mounted as files.

    Raises:
        ValueError: a line with another URI scheme, naming the line.
    """
    from urllib.parse import unquote, urlparse

    listing, seen = InputListing(), set()
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        scheme = urlparse(entry).scheme
        if scheme == "file":
            entry = unquote(urlparse(entry).path)
        elif len(scheme) > 1:  # one letter is a Windows drive
            raise ValueError(
                f"{list_file}:{number}: {entry}: {scheme}:// storage cannot be read directly; "
                "list the paths where it is mounted on every node (NFS, s3fs, gcsfuse)"
            )
        path = Path(os.path.normpath(Path(entry) if Path(entry).is_absolute() else list_file.parent / entry))
        if path not in seen:
            seen.add(path)
            listing.files.append(path)
    return listing


def open_run(
    found: RunInputs,
    out_dir: str | Path,
    pipeline_cfg: PipelineConfig,
    detect_cfg: DetectConfig,
    grade_cfg: GradeConfig,
    detector: Detector,
    grader: Grader,
    labels: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> RunPlan:
    """Open the run folder: refuse another run's, write ``args.yaml``, and read what the journal has done.

    Raises:
        ValueError: a bad labels file, or models that disagree on the crop framing.
        kneepipe.pipeline.state.OutputConflictError: ``out_dir`` holds another run.
    """
    out_dir = Path(out_dir)
    labelled = read_labels(labels) if labels else None
    check_models(detector, grader)
    files, root = found.files, found.root
    configs = {"pipeline": to_dict(pipeline_cfg), "detect": to_dict(detect_cfg), "grade": to_dict(grade_cfg)}
    parts = fingerprint_parts(
        input_listing(files, root),
        detector.version,
        grader.version,
        configs,
        file_digest(Path(labels)) if labels else None,
    )
    prepare_output(out_dir, parts, pipeline_cfg.overwrite)
    save_config(
        pipeline_cfg,
        out_dir,
        extra={
            "input": str(found.inputs),
            "labels": str(labels) if labels else None,
            "detector": detector.version,
            "grader": grader.version,
            "detector_runtime": getattr(detector, "runtime", "torch"),
            "grader_runtime": grader.runtime,
            "kneepipe": __version__,
            **(extra or {}),
            "fingerprint": fingerprint(parts),
            "fingerprint_parts": parts,
            "detect": configs["detect"],
            "grade": configs["grade"],
        },
    )
    journal = out_dir / JOURNAL
    repair_journal(journal)
    done = read_journal(journal)
    names = {path: _input_name(path, root) for path in files}
    keys = output_keys([names[path] for path in files])
    outside = set(found.listing.outside_links)
    outside_note = "read through a link to a file outside the input folder"
    films = [Film(path, names[path], keys[names[path]], outside_note if path in outside else "") for path in files]
    todo = [film for film in films if film.name not in done]
    return RunPlan(found, out_dir, films, todo, configs, Path(labels) if labels else None, labelled)


def close_run(
    plan: RunPlan,
    pipeline_cfg: PipelineConfig,
    grade_cfg: GradeConfig,
    grader: Grader,
    detector_version: str,
    features: list[np.ndarray],
    journal: RunJournal,
    seconds: float,
) -> PipelineRun:
    """Read the journal back and write the run's outputs (:func:`finish_run`), with the batch's shift score."""
    records = read_journal(plan.journal)
    images = {film.name: records[film.name] for film in plan.films}
    graded_now = {film.name for film in plan.todo}
    shift = batch_shift_of_run(grader, grade_cfg, features, images, graded_now, plan.out_dir)
    found, outside = plan.found, set(plan.found.listing.outside_links)
    return finish_run(
        plan.out_dir,
        images,
        pipeline_cfg,
        grade_cfg,
        grader,
        detector_version=detector_version,
        labelled=plan.labelled,
        inputs=str(found.inputs),
        resumed=plan.resumed,
        processed=len(plan.todo),
        knees_processed=journal.knees_processed,
        seconds=seconds,
        configs=plan.configs,
        skipped=[
            SkippedEntry(
                image=relative_name(entry.path, found.root),
                status=STATUS_SKIPPED,
                message=entry.reason,
                hidden=entry.hidden,
            )
            for entry in found.listing.skipped
        ],
        outside_links=sorted(film.name for film in plan.films if film.path in outside),
        shift=shift,
    )


def graded_steps(
    films: Sequence[Film], detector: Detector, grader: Grader, work: FilmWork
) -> Generator[tuple[list[ImageRecord], list[np.ndarray]], None, None]:
    """Decode, detect, grade and save ``films`` step by step; yields each step's results in input order.

    A step's results are its journal records and the pooled features of its graded knees
    (for the batch's shift score).

    Films are decoded ahead in threads and detected ``pipeline_cfg.batch`` at a time, while
    up to ``grade_workers`` earlier steps are graded and saved in threads (both frameworks
    release the GIL while they compute). A step is yielded when it is done, so a consumer
    that journals it loses only the steps in flight when it is stopped. Close the generator
    (``contextlib.closing``) to stop the threads when the consumer stops early.
    """
    pipeline_cfg, detect_cfg = work.pipeline_cfg, work.detect_cfg
    size = pipeline_cfg.thumbnail_size
    check = detector.check_film if isinstance(detector, JointDetector) else None
    stream = decoded_radiographs(
        [film.path for film in films],
        detect_cfg.max_side,
        pipeline_cfg.prefetch,
        pipeline_cfg.decode_workers,
        prepare=(lambda radiograph: _prepare_film(radiograph, size, check)) if size or check else None,
        max_pixels=detect_cfg.max_pixels,
    )
    grading = ThreadPoolExecutor(pipeline_cfg.grade_workers, thread_name_prefix="kneepipe-grade")
    in_flight: deque[Future] = deque()
    try:
        decoded = ((film, item, prepared) for film, (_, item, prepared) in zip(films, stream, strict=False))
        for step in _steps(decoded, pipeline_cfg.batch):
            detections = _detect_step(detector, step)
            in_flight.append(grading.submit(_grade_step, step, detections, work, grader))
            while len(in_flight) > pipeline_cfg.grade_workers or (in_flight and in_flight[0].done()):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        grading.shutdown(wait=True, cancel_futures=True)
        stream.close()


def batch_shift_of_run(
    grader: Grader,
    grade_cfg: GradeConfig,
    features: list[np.ndarray],
    images: dict[str, ImageRecord],
    graded_now: set[str],
    out_dir: Path,
) -> dict[str, Any]:
    """The run's shift score over all its graded knees; regrades them when it warns and ``batch_norm`` says so.

    Knees graded by this call brought their features; those of a resumed run's earlier calls
    are read back from their saved crops. When the score warns (``batch_norm: auto``) or
    always (``batch_norm: batch``), every knee is graded again from its crop with the batch's
    own batch-norm statistics, as ``kneepipe grade`` does; the new logits replace the
    journaled ones in ``images`` (the journal keeps what the network gave as trained).
    """
    from kneepipe.grade.folder import batch_shift, grade_with_batch_statistics, use_batch_statistics

    knees = [(name, knee) for name, record in images.items() for knee in record["knees"] if knee["status"] == STATUS_OK]
    earlier = [knee for name, knee in knees if name not in graded_now]
    earlier_crops, unreadable = _saved_crops(earlier, out_dir)
    parts = list(features)
    if earlier_crops:
        parts.append(grader.predict_with_features(earlier_crops, grade_cfg.batch)[1])
    pooled = np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
    shift = batch_shift(grader, pooled, grade_cfg)
    shift["shift_knees"] = len(pooled)
    shift["batch_norm"] = "as trained"
    if not use_batch_statistics(shift, len(knees), grade_cfg):
        return shift
    crops, unreadable = _saved_crops([knee for _, knee in knees], out_dir)
    if unreadable:
        shift["batch_norm"] = f"as trained: {unreadable} crops were not saved, so the knees cannot be graded again"
        return shift
    logits, shift["batch_norm"] = grade_with_batch_statistics(grader, crops, grade_cfg)
    for (_, knee), row in zip(knees, logits, strict=True):
        knee["logits"] = [round(float(v), 6) for v in row]
    return shift


def _saved_crops(knees: list[KneeRecord], out_dir: Path) -> tuple[list[np.ndarray], int]:
    """The saved crops of ``knees`` and how many could not be read."""
    crops, missing = [], 0
    for knee in knees:
        try:
            crops.append(read_radiograph(out_dir / knee["crop"]).pixels if knee["crop"] else None)
        except ImageReadError:
            crops.append(None)
        missing += crops[-1] is None
    return [c for c in crops if c is not None], missing


def _input_name(path: Path, root: Path) -> str:
    """An input's name in the outputs: its path below ``root``, or the whole path for a listed file outside it.

    Two listed files outside the list's folder (``/a/IM0001``, ``/b/IM0001``) keep two names.

    >>> _input_name(Path("raw/knees/a.png"), Path("raw")), _input_name(Path("/mnt/b/a.png"), Path("raw"))
    ('knees/a.png', '/mnt/b/a.png')
    """
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _joint_notes(joints: Sequence[Joint]) -> str:
    """A warning for films where the count or the sides of the joints are unusual."""
    sides = Counter(joint.side for joint in joints)
    if len(joints) > 2 or max(sides.values(), default=0) > 1:
        detail = ", ".join(f"{count} {side}" for side, count in sorted(sides.items()))
        return f"{len(joints)} knee-like objects found on this radiograph ({detail}); check the sides"
    return ""


def _steps(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in consecutive lists of ``size`` (the last may be shorter)."""
    step: list[Any] = []
    for item in items:
        step.append(item)
        if len(step) == size:
            yield step
            step = []
    if step:
        yield step


def _prepare_film(
    radiograph: Radiograph, thumbnail_size: int, check: Callable[[Radiograph], FilmChecks] | None
) -> tuple[tuple[bytes, float] | None, FilmChecks | None]:
    """A film's work done in the decoding thread: its report thumbnail and the detector's pixel checks.

    Either may be missing (not asked for, or it failed: the detector then checks the film itself,
    and a failure there becomes the film's error detection).
    """
    thumbnail = checks = None
    if thumbnail_size:
        with suppress(Exception):
            thumbnail = thumbnail_jpeg(radiograph, thumbnail_size)
    if check is not None:
        with suppress(Exception):
            checks = check(radiograph)
    return thumbnail, checks


def _detect_step(
    detector: Detector, step: Sequence[tuple[Film, Radiograph | ImageReadError, Any]]
) -> dict[int, Detection]:
    """The detection of each radiograph of a step (files that could not be read are skipped), by ``id``."""
    read = [(item, prepared) for _, item, prepared in step if isinstance(item, Radiograph)]
    radiographs = [item for item, _ in read]
    checks = [prepared[1] if prepared else None for _, prepared in read]
    return {id(r): d for r, d in zip(radiographs, detect_radiographs(detector, radiographs, checks), strict=True)}


def _grade_step(
    step: Sequence[tuple[Film, Radiograph | ImageReadError, Any]],
    detections: dict[int, Detection],
    work: FilmWork,
    grader: Grader,
) -> tuple[list[ImageRecord], list[np.ndarray]]:
    """Grade and save one detected step of radiographs; returns their journal records and the knees' features.

    Whatever goes wrong with one file (a crop that cannot be written, a full disk for its
    thumbnail, anything unexpected) ends in that file's record, so the step is journaled
    and a rerun does not meet the same failure again.
    """
    # In step order; a knee a quality check refused (a prosthesis, cut by the edge) is not graded.
    joints = [joint for detection in detections.values() for joint in detection.joints if joint.status == STATUS_OK]
    features: list[np.ndarray] = []
    graded = grader.grade_each([joint.crop for joint in joints], work.grade_cfg.batch, features)
    logits_by_joint = {id(joint): logits for joint, logits in zip(joints, graded, strict=True)}

    records = []
    for film, item, prepared in step:
        thumbnail = prepared[0] if prepared else None
        record = image_record(film.name, film.path)
        if isinstance(item, ImageReadError):
            record["message"] = item.reason
            records.append(record)
            continue
        thumbnail_note = ""
        try:
            thumbnail_note = _fill_record(
                record,
                item,
                thumbnail,
                detections[id(item)],
                logits_by_joint,
                film.key,
                work.out_dir,
                work.pipeline_cfg,
            )
        except Exception as err:  # this file's problem only: its record says what happened
            record.update(
                {"status": STATUS_ERROR, "message": f"processing failed ({type(err).__name__}: {err})", "knees": []}
            )
        file_notes = [note for note in (film.note, *item.notes, thumbnail_note) if note]
        if file_notes:
            _add_note(record, "; ".join(file_notes))
        records.append(record)
    return records, features


def _add_note(record: ImageRecord, note: str) -> None:
    """Add a note to a record's message and to each of its knees' messages."""
    targets: list[ImageRecord] | list[KneeRecord] = record["knees"] or [record]
    for target in targets:
        target["message"] = f"{target['message']}; {note}" if target["message"] else note
    if record["knees"] and not record["message"]:
        record["message"] = note


def _fill_record(
    record: ImageRecord,
    radiograph: Radiograph,
    thumbnail,
    detection: Detection,
    logits_by_joint: dict[int, np.ndarray | str],
    key: str,
    out_dir: Path,
    pipeline_cfg: PipelineConfig,
) -> str:
    """Fill one radiograph's record: its detection, graded knees, written crops and thumbnail.

    Returns a note when the thumbnail could not be saved (the grades do not depend on it).
    """
    record.update(
        {
            "status": detection.status,
            "message": detection.message,
            "original_size": list(radiograph.original_size),
            "scale": radiograph.scale,
        }
    )
    thumbnail_note = ""
    if thumbnail is not None:
        jpeg, thumbnail_scale = thumbnail
        try:
            (out_dir / "thumbnails").mkdir(exist_ok=True)
            write_atomic(out_dir / f"thumbnails/{key}.jpg", jpeg)
            record.update({"thumbnail": f"thumbnails/{key}.jpg", "thumbnail_scale": thumbnail_scale})
        except OSError as err:  # the report goes without it; the grades do not depend on it
            thumbnail_note = f"thumbnail not saved ({err.strerror or err})"
    note = "; ".join(filter(None, [detection.message if detection.joints else "", _joint_notes(detection.joints)]))
    seen: Counter = Counter()
    for joint in detection.joints:
        logits = logits_by_joint.get(id(joint), joint.message)
        seen[joint.side] += 1
        knee: KneeRecord = {
            "side": joint.side,
            "box": [round(float(v), 1) for v in joint.box],
            "det_confidence": round(float(joint.confidence), 4),
            "crop": "",
            "status": STATUS_OK,
            "message": note,
            "logits": None,
            "needs_review": joint.needs_review,
            "review_reason": joint.review_reason,
        }
        if joint.status != STATUS_OK:
            knee.update({"status": joint.status, "message": "; ".join(filter(None, [joint.message, note]))})
        elif isinstance(logits, str):
            knee.update({"status": STATUS_ERROR, "message": logits})
        else:
            knee["logits"] = [round(float(v), 6) for v in logits]
        if pipeline_cfg.save_crops:
            suffix = "" if seen[joint.side] == 1 else str(seen[joint.side])
            crop_name = f"crops/{key}_{joint.side}{suffix}.png"
            try:
                (out_dir / "crops").mkdir(exist_ok=True)
                write_png(out_dir / crop_name, joint.crop)
                knee["crop"] = crop_name
            except OSError as err:  # graded all the same; the row says the crop is missing
                problem = f"crop not saved ({err.strerror or err})"
                knee["message"] = f"{knee['message']}; {problem}" if knee["message"] else problem
        record["knees"].append(knee)
    if detection.status != STATUS_OK:  # every knee refused by a quality check: the film says why
        record.update({"status": detection.status, "message": detection.message})
    elif record["knees"] and all(knee["status"] != STATUS_OK for knee in record["knees"]):
        record.update({"status": STATUS_ERROR, "message": record["knees"][0]["message"]})
    return thumbnail_note
