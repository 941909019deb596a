"""``kneepipe run``: every radiograph of a folder through both stages, resumable, with one results table.

For each radiograph: decode once (in a prefetch thread), find the joints with the detector,
grade their crops with the grader, write the crops, and journal the result. Both models
are loaded once; radiographs are detected ``batch`` at a time and their knees graded
together, in threads beside the detector, so throughput comes from batching and overlap
while memory holds only the radiographs in flight. At the end the grades are finalised
(temperature, then any prior adaptation over the whole batch), and ``results.csv``,
``summary.json``, with labels ``metrics.json`` and ``evaluation.csv``, and on request
``report.html`` are written in one piece each.

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

import json
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kneepipe import KL_GRADES, __version__
from kneepipe.config import save_config, to_dict
from kneepipe.files import output_keys, write_atomic, write_csv_atomic
from kneepipe.imaging import ImageReadError, Radiograph, list_inputs
from kneepipe.joints import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, Detection, Joint
from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.evaluate import EVALUATION_COLUMNS, end_to_end_metrics, match_labels, read_labels
from kneepipe.pipeline.state import (
    JOURNAL,
    append_journal,
    file_digest,
    fingerprint,
    fingerprint_parts,
    input_listing,
    prepare_output,
    read_journal,
    relative_name,
    repair_journal,
)
from kneepipe.pipeline.stream import decoded_radiographs

RESULTS_COLUMNS = [
    "image",
    "side",
    "x1",
    "y1",
    "x2",
    "y2",
    "det_confidence",
    "kl_grade",
    "p0",
    "p1",
    "p2",
    "p3",
    "p4",
    "crop",
    "status",
    "message",
]

Progress = Callable[[int, int], None]


@dataclass
class PipelineRun:
    """What a pipeline run produced.

    Attributes:
        out_dir: the run folder.
        rows: the rows of ``results.csv`` (one per knee, or one per file without a graded knee).
        images: the journal record of every input image, by name (status, size, knees).
        summary: the batch summary written to ``summary.json``.
        metrics: the end-to-end metrics (with labels), else None.
        evaluation: the outcome of each labelled knee (with labels).
        resumed: images taken over from an interrupted earlier call.
        processed: images processed by this call.
        seconds: wall time of this call's processing (decode to last grade).
        report: the report file, when one was written.
        skipped: the entries under the input folder that were not read, each with its
            ``image`` name, ``status`` (``skipped``), ``message`` (the reason) and ``hidden``.
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    images: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    metrics: dict[str, Any] | None = None
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    processed: int = 0
    seconds: float = 0.0
    report: Path | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def refused(self) -> list[dict[str, Any]]:
        """The images that were not graded, with their status and reason."""
        return [record for record in self.images.values() if record["status"] != STATUS_OK]


def load_models(detect_cfg, grade_cfg, detector: bool = True, grader: bool = True) -> tuple[Any, Any]:
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

        loaded_grader = Grader.load(grade_cfg.model, precision=grade_cfg.precision)
    return loaded_detector, loaded_grader


def run_pipeline(
    inputs: str | Path,
    out_dir: str | Path,
    pipeline_cfg: PipelineConfig,
    detect_cfg,
    grade_cfg,
    labels: str | Path | None = None,
    progress: Progress | None = None,
    detector=None,
    grader=None,
) -> PipelineRun:
    """Detect, crop and grade every radiograph under ``inputs``; write the run folder ``out_dir``.

    Args:
        inputs: a radiograph file or a folder searched recursively.
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

    Raises:
        FileNotFoundError: ``inputs`` does not exist or holds no image.
        ValueError: a bad labels file.
        kneepipe.pipeline.state.OutputConflictError: ``out_dir`` holds another run.
    """
    inputs, out_dir = Path(inputs), Path(out_dir)
    labelled = read_labels(labels) if labels else None
    root = inputs if inputs.is_dir() else inputs.parent
    listing = list_inputs(inputs, exclude=(out_dir,))
    files = [path for path in listing.files if not _is_inside(path, out_dir)]
    if not files:
        skipped = f" ({len(listing.skipped)} other entries skipped: not images, hidden or special)"
        raise FileNotFoundError(
            f"{inputs}: no radiographs found (PNG, JPEG, TIFF or DICOM){skipped if listing.skipped else ''}"
        )
    if detector is None or grader is None:
        loaded_detector, loaded_grader = load_models(detect_cfg, grade_cfg, detector is None, grader is None)
        detector, grader = detector or loaded_detector, grader or loaded_grader

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
            "input": str(inputs),
            "labels": str(labels) if labels else None,
            "detector": detector.version,
            "grader": grader.version,
            "kneepipe": __version__,
            "fingerprint": fingerprint(parts),
            "fingerprint_parts": parts,
            "detect": configs["detect"],
            "grade": configs["grade"],
        },
    )
    journal = out_dir / JOURNAL
    repair_journal(journal)
    done = read_journal(journal)
    names = {path: relative_name(path, root) for path in files}
    keys = output_keys([names[path] for path in files])
    outside = set(listing.outside_links)
    notes = {names[path]: "read through a link to a file outside the input folder" for path in files if path in outside}
    todo = [path for path in files if names[path] not in done]
    resumed = len(files) - len(todo)
    if progress:
        progress(resumed, len(files))

    started = time.perf_counter()
    completed, knees_processed = resumed, 0
    size = pipeline_cfg.thumbnail_size
    stream = decoded_radiographs(
        todo,
        detect_cfg.max_side,
        pipeline_cfg.prefetch,
        pipeline_cfg.decode_workers,
        prepare=(lambda radiograph: thumbnail_jpeg(radiograph, size)) if size else None,
        max_pixels=detect_cfg.max_pixels,
    )
    # Detection runs here while up to `grade_workers` earlier steps are graded and saved in
    # threads (both frameworks release the GIL while they compute). Steps are journaled in
    # input order as they finish, so an interrupted run loses only the steps in flight.
    grading = ThreadPoolExecutor(pipeline_cfg.grade_workers, thread_name_prefix="kneepipe-grade")
    in_flight: deque[Future] = deque()

    def settle(wait_for: int) -> None:
        nonlocal completed, knees_processed
        while len(in_flight) > wait_for or (in_flight and in_flight[0].done()):
            records = in_flight.popleft().result()
            append_journal(journal, records)
            completed += len(records)
            knees_processed += sum(len(record["knees"]) for record in records)
            if progress:
                progress(completed, len(files))

    try:
        for step in _steps(stream, pipeline_cfg.batch):
            detections = _detect_step(detector, step)
            in_flight.append(
                grading.submit(
                    _grade_step, step, detections, names, keys, out_dir, pipeline_cfg, grade_cfg, grader, notes
                )
            )
            settle(wait_for=pipeline_cfg.grade_workers)
        settle(wait_for=0)
    finally:
        grading.shutdown(wait=True, cancel_futures=True)
        stream.close()
    seconds = time.perf_counter() - started

    records = read_journal(journal)
    images = {names[path]: records[names[path]] for path in files}
    return finish_run(
        out_dir,
        images,
        pipeline_cfg,
        grade_cfg,
        grader,
        detector_version=detector.version,
        labelled=labelled,
        inputs=str(inputs),
        resumed=resumed,
        processed=len(todo),
        knees_processed=knees_processed,
        seconds=seconds,
        configs=configs,
        skipped=[
            {
                "image": relative_name(entry.path, root),
                "status": STATUS_SKIPPED,
                "message": entry.reason,
                "hidden": entry.hidden,
            }
            for entry in listing.skipped
        ],
        outside_links=sorted(names[path] for path in files if path in outside),
    )


def finish_run(
    out_dir: Path,
    images: dict[str, dict[str, Any]],
    pipeline_cfg: PipelineConfig,
    grade_cfg,
    grader,
    detector_version: str,
    labelled=None,
    inputs: str = "",
    resumed: int = 0,
    processed: int = 0,
    knees_processed: int = 0,
    seconds: float = 0.0,
    configs: dict[str, Any] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    outside_links: Sequence[str] = (),
) -> PipelineRun:
    """Final grades over the whole batch, then ``results.csv``, summaries, metrics and the report.

    ``skipped`` entries (not read: not images, hidden, special files) get a row each at
    the end of ``results.csv`` and a count in the summary; ``outside_links`` names the
    inputs read through a link that points out of the input folder.
    """
    from kneepipe.grade.folder import adjust_for_prior

    knees = [(name, knee) for name, record in images.items() for knee in record["knees"] if knee["status"] == STATUS_OK]
    if knees:
        logits = np.array([knee["logits"] for _, knee in knees], dtype=np.float64)
        probabilities = grader.probabilities(logits, calibrated=grade_cfg.calibrated)
    else:
        probabilities = np.empty((0, len(KL_GRADES)))
    train_prior = np.asarray(grader.preprocessing.train_prior, dtype=float)
    final, priors = adjust_for_prior(probabilities, train_prior, grade_cfg, grader.preprocessing.decision)
    for (_, knee), p, kl_grade in zip(knees, final, grader.decide(final), strict=True):
        knee["probabilities"] = [float(v) for v in p]
        knee["kl_grade"] = int(kl_grade)

    rows = _results_rows(images) + [
        {"image": entry["image"], "status": entry["status"], "message": entry["message"]} for entry in skipped
    ]
    write_csv_atomic(out_dir / "results.csv", RESULTS_COLUMNS, rows)
    summary = batch_summary(images, pipeline_cfg.group_pattern)
    summary.update(
        skipped=sum(not entry["hidden"] for entry in skipped),
        skipped_hidden=sum(bool(entry["hidden"]) for entry in skipped),
        skipped_entries=[{"image": e["image"], "message": e["message"]} for e in skipped if not e["hidden"]],
        links_outside_input=list(outside_links),
    )
    summary.update(
        input=inputs,
        detector=detector_version,
        grader=grader.version,
        priors=priors,
        resumed_images=resumed,
        processed_images=processed,
        seconds=round(seconds, 2),
        images_per_s=round(processed / seconds, 3) if seconds > 0 and processed else None,
        knees_per_s=round(knees_processed / seconds, 3) if seconds > 0 and processed else None,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    run = PipelineRun(
        out_dir, rows, images, summary, resumed=resumed, processed=processed, seconds=seconds, skipped=list(skipped)
    )

    if labelled is not None:
        graded = [
            {
                "image": name,
                "side": knee["side"],
                "box": knee["box"],
                "det_confidence": knee["det_confidence"],
                "probabilities": knee["probabilities"],
                "kl_grade": knee["kl_grade"],
            }
            for name, knee in knees
        ]
        outcomes, unknown, unclaimed = match_labels(labelled, graded, images, pipeline_cfg.match_iou)
        metrics = end_to_end_metrics(outcomes, unknown, unclaimed)
        metrics.update(
            grader=grader.version,
            detector=detector_version,
            temperature=grader.preprocessing.temperature if grade_cfg.calibrated else 1.0,
            refused_files=len(run.refused),
            **priors,
        )
        run.metrics, run.evaluation = metrics, outcomes
        write_csv_atomic(out_dir / "evaluation.csv", EVALUATION_COLUMNS, outcomes)
        _write_json(out_dir / "metrics.json", metrics)
    _write_json(out_dir / "summary.json", summary)

    if pipeline_cfg.report:
        from kneepipe.pipeline.report import write_report

        run.report = write_report(run, pipeline_cfg, grader, configs or {})
    return run


def _write_json(path: Path, content: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(content, indent=2))


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _write_png(path: Path, pixels: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    write_atomic(path, encoded.tobytes())


def _detect(detector, radiographs: Sequence[Radiograph]) -> list[Detection]:
    """Detect a step in the detector's batches; if a batch fails, one film at a time.

    Only the film that fails that way gets an error; the others are detected.
    """
    if not radiographs:
        return []
    try:
        detections = list(detector.detect(radiographs))
        if len(detections) == len(radiographs):
            return detections
    except Exception:  # isolate the file that failed below
        pass
    detections = []
    for radiograph in radiographs:
        try:
            detections.extend(detector.detect([radiograph]))
        except Exception as err:
            detections.append(
                Detection(radiograph.path, (), STATUS_ERROR, f"detection failed ({type(err).__name__}: {err})")
            )
    return detections


def _grade(grader, crops: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray | str]:
    """Logits per crop; a crop the grader fails on gets the reason instead."""
    if not crops:
        return []
    try:
        return list(grader.predict_logits(list(crops), batch_size=batch_size))
    except Exception:  # isolate the crop that failed below
        pass
    graded: list[np.ndarray | str] = []
    for crop in crops:
        try:
            graded.append(grader.predict_logits([crop], batch_size=1)[0])
        except Exception as err:
            graded.append(f"grading failed ({type(err).__name__}: {err})")
    return graded


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


def _detect_step(detector, step: Sequence[tuple[Path, Radiograph | ImageReadError, Any]]) -> dict[int, Detection]:
    """The detection of each radiograph of a step (files that could not be read are skipped), by ``id``."""
    radiographs = [item for _, item, _ in step if isinstance(item, Radiograph)]
    return {id(r): d for r, d in zip(radiographs, _detect(detector, radiographs), strict=True)}


def _grade_step(
    step: Sequence[tuple[Path, Radiograph | ImageReadError, Any]],
    detections: dict[int, Detection],
    names: dict[Path, str],
    keys: dict[str, str],
    out_dir: Path,
    pipeline_cfg: PipelineConfig,
    grade_cfg,
    grader,
    notes: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Grade and save one detected step of radiographs; returns their journal records.

    Whatever goes wrong with one file (a crop that cannot be written, a full disk for its
    thumbnail, anything unexpected) ends in that file's record, so the step is journaled
    and a rerun does not meet the same failure again.
    """
    joints = [joint for detection in detections.values() for joint in detection.joints]  # in step order
    graded = _grade(grader, [joint.crop for joint in joints], grade_cfg.batch)
    logits_by_joint = {id(joint): logits for joint, logits in zip(joints, graded, strict=True)}

    records = []
    for path, item, thumbnail in step:
        name = names[path]
        record: dict[str, Any] = {
            "image": name,
            "path": str(path),
            "status": STATUS_ERROR,
            "message": "",
            "original_size": None,
            "scale": None,
            "thumbnail": "",
            "thumbnail_scale": None,
            "knees": [],
        }
        if isinstance(item, ImageReadError):
            record["message"] = item.reason
            records.append(record)
            continue
        try:
            _fill_record(
                record, item, thumbnail, detections[id(item)], logits_by_joint, keys[name], out_dir, pipeline_cfg
            )
        except Exception as err:  # this file's problem only: its record says what happened
            record.update(status=STATUS_ERROR, message=f"processing failed ({type(err).__name__}: {err})", knees=[])
        file_notes = [
            note for note in ((notes or {}).get(name), *item.notes, record.pop("thumbnail_error", "")) if note
        ]
        if file_notes:
            _add_note(record, "; ".join(file_notes))
        records.append(record)
    return records


def _add_note(record: dict[str, Any], note: str) -> None:
    """Add a note to a record's message and to each of its knees' messages."""
    targets = record["knees"] or [record]
    for target in targets:
        target["message"] = f"{target['message']}; {note}" if target["message"] else note
    if record["knees"] and not record["message"]:
        record["message"] = note


def _fill_record(
    record: dict[str, Any],
    radiograph: Radiograph,
    thumbnail,
    detection: Detection,
    logits_by_joint: dict[int, np.ndarray | str],
    key: str,
    out_dir: Path,
    pipeline_cfg: PipelineConfig,
) -> None:
    """One radiograph's record: its detection, graded knees, written crops and thumbnail."""
    record.update(
        status=detection.status,
        message=detection.message,
        original_size=list(radiograph.original_size),
        scale=radiograph.scale,
    )
    if thumbnail is not None:
        jpeg, thumbnail_scale = thumbnail
        try:
            (out_dir / "thumbnails").mkdir(exist_ok=True)
            write_atomic(out_dir / f"thumbnails/{key}.jpg", jpeg)
            record.update(thumbnail=f"thumbnails/{key}.jpg", thumbnail_scale=thumbnail_scale)
        except OSError as err:  # the report goes without it; the grades do not depend on it
            record["thumbnail_error"] = f"thumbnail not saved ({err.strerror or err})"
    note = "; ".join(filter(None, [detection.message if detection.joints else "", _joint_notes(detection.joints)]))
    seen: Counter = Counter()
    for joint in detection.joints:
        logits = logits_by_joint[id(joint)]
        seen[joint.side] += 1
        knee: dict[str, Any] = {
            "side": joint.side,
            "box": [round(float(v), 1) for v in joint.box],
            "det_confidence": round(float(joint.confidence), 4),
            "crop": "",
            "status": STATUS_OK,
            "message": note,
            "logits": None,
        }
        if isinstance(logits, str):
            knee.update(status=STATUS_ERROR, message=logits)
        else:
            knee["logits"] = [round(float(v), 6) for v in logits]
        if pipeline_cfg.save_crops:
            suffix = "" if seen[joint.side] == 1 else str(seen[joint.side])
            crop_name = f"crops/{key}_{joint.side}{suffix}.png"
            try:
                (out_dir / "crops").mkdir(exist_ok=True)
                _write_png(out_dir / crop_name, joint.crop)
                knee["crop"] = crop_name
            except OSError as err:  # graded all the same; the row says the crop is missing
                problem = f"crop not saved ({err.strerror or err})"
                knee["message"] = f"{knee['message']}; {problem}" if knee["message"] else problem
        record["knees"].append(knee)
    if record["knees"] and all(knee["status"] != STATUS_OK for knee in record["knees"]):
        record.update(status=STATUS_ERROR, message=record["knees"][0]["message"])


def thumbnail_jpeg(radiograph: Radiograph, size: int) -> tuple[bytes, float]:
    """A JPEG of the radiograph no longer than ``size`` a side, and its scale to source pixels."""
    pixels = radiograph.pixels
    height, width = pixels.shape
    factor = min(1.0, size / max(height, width))
    if factor < 1.0:
        new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        pixels = cv2.resize(pixels, new_size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise OSError(f"cannot encode a thumbnail of {radiograph.path}")
    return encoded.tobytes(), pixels.shape[1] / radiograph.original_size[0]


def _results_rows(images: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, record in images.items():
        if not record["knees"]:
            rows.append({"image": name, "status": record["status"], "message": record["message"]})
            continue
        for knee in record["knees"]:
            row = {
                "image": name,
                "side": knee["side"],
                **dict(zip(("x1", "y1", "x2", "y2"), knee["box"], strict=True)),
                "det_confidence": knee["det_confidence"],
                "crop": knee["crop"],
                "status": knee["status"],
                "message": knee["message"],
            }
            if knee["status"] == STATUS_OK:
                row["kl_grade"] = knee["kl_grade"]
                row.update({f"p{g}": f"{knee['probabilities'][g]:.4f}" for g in KL_GRADES})
            rows.append(row)
    return rows


def batch_summary(images: dict[str, dict[str, Any]], group_pattern: str | None = None) -> dict[str, Any]:
    """Images read, knees graded, files refused and why, grade distribution (and per file-name group)."""

    def tally(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        grades = [knee["kl_grade"] for r in records for knee in r["knees"] if knee["status"] == STATUS_OK]
        refused = Counter(r["status"] for r in records if r["status"] != STATUS_OK)
        return {
            "images": len(records),
            "images_graded": sum(r["status"] == STATUS_OK for r in records),
            "knees_graded": len(grades),
            "grade_counts": np.bincount(np.asarray(grades, dtype=int), minlength=len(KL_GRADES)).tolist(),
            "refused": dict(sorted(refused.items())),
        }

    records = list(images.values())
    summary = tally(records)
    summary["images_read"] = sum(r["original_size"] is not None for r in records)
    summary["refused_files"] = [
        {"image": r["image"], "status": r["status"], "message": r["message"]}
        for r in records
        if r["status"] != STATUS_OK
    ]
    if group_pattern:
        pattern = re.compile(group_pattern)
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            match = pattern.search(Path(record["image"]).name)
            if match:
                groups.setdefault(match.group(1), []).append(record)
        summary["groups"] = {group: tally(members) for group, members in sorted(groups.items())}
        summary["group_pattern"] = group_pattern
    return summary
