"""What a finished pipeline run writes: final grades, ``results.csv``, summaries, metrics, the report.

:func:`finish_run` turns the journal records of a run (:mod:`kneepipe.pipeline.records`)
into its outputs, each written in one piece; the encoders of the crops and thumbnails a
run writes as it goes are here too. The orchestration lives in :mod:`kneepipe.pipeline.run`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kneepipe import KL_GRADES
from kneepipe.files import write_atomic, write_csv_atomic
from kneepipe.imaging import Radiograph, area_resize
from kneepipe.joints import STATUS_OK
from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.evaluate import EVALUATION_COLUMNS, end_to_end_metrics, match_labels
from kneepipe.pipeline.explain import report_heat_maps
from kneepipe.pipeline.records import ImageRecord, SkippedEntry

if TYPE_CHECKING:
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.predict import Grader
    from kneepipe.pipeline.evaluate import LabelledKnee

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
    "needs_review",
    "review_reason",
]


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
        heat_maps: the Grad-CAM map of each knee the report shows, by crop name (or why
            there is none), computed before the report is written.
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    images: dict[str, ImageRecord]
    summary: dict[str, Any]
    metrics: dict[str, Any] | None = None
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    processed: int = 0
    seconds: float = 0.0
    report: Path | None = None
    skipped: list[SkippedEntry] = field(default_factory=list)
    heat_maps: dict[str, np.ndarray | str] = field(default_factory=dict, repr=False)

    @property
    def refused(self) -> list[ImageRecord]:
        """The images that were not graded, with their status and reason."""
        return [record for record in self.images.values() if record["status"] != STATUS_OK]


def finish_run(
    out_dir: Path,
    images: dict[str, ImageRecord],
    pipeline_cfg: PipelineConfig,
    grade_cfg: GradeConfig,
    grader: Grader,
    detector_version: str,
    labelled: Sequence[LabelledKnee] | None = None,
    inputs: str = "",
    resumed: int = 0,
    processed: int = 0,
    knees_processed: int = 0,
    seconds: float = 0.0,
    configs: dict[str, Any] | None = None,
    skipped: Sequence[SkippedEntry] = (),
    outside_links: Sequence[str] = (),
    shift: dict[str, Any] | None = None,
) -> PipelineRun:
    """Final grades over the whole batch, then ``results.csv``, summaries, metrics and the report.

    ``skipped`` entries (not read: not images, hidden, special files) get a row each at
    the end of ``results.csv`` and a count in the summary; ``outside_links`` names the
    inputs read through a link that points out of the input folder; ``shift`` is the
    batch's shift score (:func:`kneepipe.pipeline.run.batch_shift_of_run`).
    """
    from kneepipe.grade.folder import adjust_for_prior

    knees = [(name, knee) for name, record in images.items() for knee in record["knees"] if knee["status"] == STATUS_OK]
    if knees:
        logits = np.array([knee["logits"] for _, knee in knees], dtype=np.float64)
        probabilities = grader.probabilities(logits, calibrated=grade_cfg.calibrated)
    else:
        probabilities = np.empty((0, len(KL_GRADES)))
    train_prior = np.asarray(grader.preprocessing.train_prior, dtype=float)
    final, priors = adjust_for_prior(probabilities, train_prior, grade_cfg, grader.preprocessing.decision, shift)
    for (_, knee), p, kl_grade in zip(knees, final, grader.decide(final), strict=True):
        knee["probabilities"] = [float(v) for v in p]
        knee["kl_grade"] = int(kl_grade)

    rows = results_rows(images) + [
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
        site_grader=grader.is_site_grader,
        shift=shift or {},
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
            **(shift or {}),
        )
        run.metrics, run.evaluation = metrics, outcomes
        write_csv_atomic(out_dir / "evaluation.csv", EVALUATION_COLUMNS, outcomes)
        write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "summary.json", summary)

    if pipeline_cfg.report:
        from kneepipe.pipeline.report import write_report

        if pipeline_cfg.report_gradcam:
            run.heat_maps = report_heat_maps(
                images, out_dir, grader, pipeline_cfg.report_max_radiographs, pipeline_cfg.report_max_gradcam
            )
        run.report = write_report(run, pipeline_cfg, grader, configs or {})
    return run


def write_json(path: Path, content: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(content, indent=2))


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Encode a crop as PNG and write it in one piece."""
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    write_atomic(path, encoded.tobytes())


def thumbnail_jpeg(radiograph: Radiograph, size: int) -> tuple[bytes, float]:
    """A JPEG of the radiograph no longer than ``size`` a side, and its scale to source pixels."""
    pixels = radiograph.pixels
    height, width = pixels.shape
    factor = min(1.0, size / max(height, width))
    if factor < 1.0:
        new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        pixels = area_resize(pixels, new_size)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise OSError(f"cannot encode a thumbnail of {radiograph.path}")
    return encoded.tobytes(), pixels.shape[1] / radiograph.original_size[0]


def results_rows(images: dict[str, ImageRecord]) -> list[dict[str, Any]]:
    """The rows of ``results.csv``: one per knee, or one per radiograph without knees."""
    rows: list[dict[str, Any]] = []
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
                "needs_review": str(knee.get("needs_review", False)).lower(),
                "review_reason": knee.get("review_reason", ""),
            }
            if knee["status"] == STATUS_OK:
                row["kl_grade"] = knee["kl_grade"]
                row.update({f"p{g}": f"{knee['probabilities'][g]:.4f}" for g in KL_GRADES})
            rows.append(row)
    return rows


def batch_summary(images: dict[str, ImageRecord], group_pattern: str | None = None) -> dict[str, Any]:
    """Images read, knees graded, files refused and why, grade distribution (and per file-name group)."""

    def tally(records: Sequence[ImageRecord]) -> dict[str, Any]:
        grades = [knee["kl_grade"] for r in records for knee in r["knees"] if knee["status"] == STATUS_OK]
        refused = Counter(r["status"] for r in records if r["status"] != STATUS_OK)
        knees_refused = Counter(k["status"] for r in records for k in r["knees"] if k["status"] != STATUS_OK)
        return {
            "images": len(records),
            "images_graded": sum(r["status"] == STATUS_OK for r in records),
            "knees_graded": len(grades),
            "grade_counts": np.bincount(np.asarray(grades, dtype=int), minlength=len(KL_GRADES)).tolist(),
            "refused": dict(sorted(refused.items())),
            "knees_needing_review": sum(knee.get("needs_review", False) for r in records for knee in r["knees"]),
            "knees_refused": dict(sorted(knees_refused.items())),  # found, not graded: a prosthesis, a cut joint
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
        groups: dict[str, list[ImageRecord]] = {}
        for record in records:
            match = pattern.search(Path(record["image"]).name)
            if match:
                groups.setdefault(match.group(1), []).append(record)
        summary["groups"] = {group: tally(members) for group, members in sorted(groups.items())}
        summary["group_pattern"] = group_pattern
    return summary
