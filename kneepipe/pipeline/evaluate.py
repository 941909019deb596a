"""End-to-end evaluation: the pipeline's knees joined to labelled knees, detection failures counted.

A labels CSV has the columns ``image,side,kl_grade`` (image by file name, or by its path
below the input folder; side ``R``/``L``) and optionally the joint box ``x1,y1,x2,y2``
in source pixels (the compositor's ``labels.csv`` has them). Each labelled knee ends as

* ``matched``: a detected joint of the right side (and, with boxes, overlapping the
  labelled box by at least ``match_iou``) was graded;
* ``misassigned``: the joint was found but given the other side (with boxes: the box
  matches, the side does not; without boxes: the side is absent and an unclaimed joint
  of the other side is there), so its grade would be reported for the wrong knee;
* ``missed``: no joint for it (the file was refused, no knee was found, or none matched).

Missed and misassigned knees are failures, never dropped. In the metrics they count as
wrong predictions with a uniform probability row (confidence 0.2, for the ECE) and, for
the ordinal scores (QWK, MAE), the grade farthest from the truth (KL4 for a true KL0-2,
KL0 for KL3-4): a detection failure can never look like an agreement. The confusion
matrix and the precision use real predictions only; the failures are listed per true
grade beside them. Labels naming a file that was not among the inputs are reported,
not scored.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe import KL_GRADES
from kneepipe.detect.evaluate import box_iou
from kneepipe.metrics import grading_metrics

MATCHED, MISSED, MISASSIGNED = "matched", "missed", "misassigned"
EVALUATION_COLUMNS = ["image", "side", "true_grade", "kl_grade", "outcome", "iou", "det_confidence", "message"]


@dataclass(frozen=True)
class LabelledKnee:
    """One knee of the labels CSV."""

    image: str
    side: str
    kl_grade: int
    box: tuple[float, float, float, float] | None = None


def read_labels(path: str | Path) -> list[LabelledKnee]:
    """Read a labels CSV (``image,side,kl_grade`` and optionally ``x1,y1,x2,y2``).

    Forgiving where the meaning is clear: a semicolon-delimited file (as spreadsheets in
    many locales save) is read as such, spaces around header names and values are
    stripped, and a grade written ``2.0`` is grade 2. Strict where it is not: every other
    problem names the file and the line.

    Raises:
        ValueError: the file is not UTF-8, a column is missing, a value is bad (a side,
            a grade that is no whole number 0-4, an inverted or non-finite box), or a knee
            is labelled twice; naming the file and the line.

    >>> read_labels("composites/labels.csv")[0]  # doctest: +SKIP
    LabelledKnee(image='composite_00000.jpg', side='R', kl_grade=2, box=(80.5, 95.1, 291.0, 305.6))
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the labels ({err.strerror or err})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        byte = data[err.start : err.start + 1].hex()
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{byte}); the file looks like Latin-1 or Windows-1252: "
            "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)"
        ) from None
    lines = text.splitlines()
    header = lines[0] if lines else ""
    delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    columns = [name.strip().lower() for name in next(reader, [])]
    missing = {"image", "side", "kl_grade"} - set(columns)
    if missing:
        absent = ", ".join(sorted(missing))
        raise ValueError(
            f"{path}:1: labels need the columns image,side,kl_grade (missing: {absent}; the header is {header!r})"
        )
    index = {name: columns.index(name) for name in columns}
    with_boxes = {"x1", "y1", "x2", "y2"} <= set(columns)
    labels: list[LabelledKnee] = []
    seen: dict[tuple[str, str, tuple | None], tuple[int, int]] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(columns):
            raise ValueError(f"{path}:{line}: {len(row)} fields, but the header has {len(columns)}")
        cell = {name: row[i].strip() for name, i in index.items()}
        side = cell["side"].upper()
        if side not in ("R", "L"):
            raise ValueError(f"{path}:{line}: side must be R or L, got {cell['side']!r}")
        grade = _whole_grade(cell["kl_grade"])
        if grade is None:
            raise ValueError(f"{path}:{line}: kl_grade must be 0-4 (a whole grade), got {cell['kl_grade']!r}")
        image = cell["image"]
        if not image:
            raise ValueError(f"{path}:{line}: empty image name")
        box: tuple[float, float, float, float] | None = None
        if with_boxes and all(cell[k] for k in ("x1", "y1", "x2", "y2")):
            try:
                x1, y1, x2, y2 = (float(cell[k]) for k in ("x1", "y1", "x2", "y2"))
                box = (x1, y1, x2, y2)
            except ValueError:
                raise ValueError(f"{path}:{line}: the box x1,y1,x2,y2 must be numbers") from None
            if not all(np.isfinite(box)):
                raise ValueError(f"{path}:{line}: the box x1,y1,x2,y2 must be finite numbers, got {box}")
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"{path}:{line}: the box is inverted or empty (need x1 < x2 and y1 < y2), got {box}")
        key = (image, side, box)
        if key in seen or (box is None and any(k[:2] == (image, side) for k in seen)):
            first_line, first_grade = seen.get(key) or next(v for k, v in seen.items() if k[:2] == (image, side))
            what = "with the same box" if box else "add boxes to tell two knees of one side apart"
            grades = f"KL{grade} here, KL{first_grade} on line {first_line}"
            differ = f"with different grades ({grades})" if first_grade != grade else f"(also line {first_line})"
            raise ValueError(f"{path}:{line}: {image} side {side} is labelled twice {differ}; {what}")
        seen[key] = (line, grade)
        labels.append(LabelledKnee(image, side, grade, box))
    return labels


def _whole_grade(text: str) -> int | None:
    """A KL grade from its text: ``2`` or ``2.0`` is 2; anything else (``2.5``, ``x``, ``5``) is None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not np.isfinite(value) or not value.is_integer() or int(value) not in KL_GRADES:
        return None
    return int(value)


def _image_keys(name: str) -> tuple[str, str]:
    return name, Path(name).name


def match_labels(
    labels: Sequence[LabelledKnee],
    knees: Sequence[Mapping[str, Any]],
    images: Mapping[str, Mapping[str, Any]],
    match_iou: float = 0.5,
) -> tuple[list[dict[str, Any]], list[LabelledKnee], list[Mapping[str, Any]]]:
    """Pair each labelled knee with a graded knee.

    Args:
        labels: the labelled knees.
        knees: graded knees (``image``, ``side``, ``box``, ``det_confidence``,
            ``probabilities``, ``kl_grade``).
        images: every input image by name (its ``status`` and ``message``).
        match_iou: the IoU a detected box needs when the labels carry boxes.

    Returns:
        The outcome of each labelled knee whose image was among the inputs, the labels
        whose image was not, and the graded knees no label claimed.
    """
    by_name: dict[str, str] = {}
    for name in images:
        for key in _image_keys(name):
            by_name.setdefault(key, name)
    knees_by_image: dict[str, list[int]] = {}
    for index, knee in enumerate(knees):
        knees_by_image.setdefault(knee["image"], []).append(index)

    outcomes: list[dict[str, Any]] = []
    unknown: list[LabelledKnee] = []
    claimed: set[int] = set()
    labels_by_image: dict[str, list[LabelledKnee]] = {}
    for label in labels:
        found = by_name.get(label.image) or by_name.get(Path(label.image).name)
        if found is None:
            unknown.append(label)
        else:
            labels_by_image.setdefault(found, []).append(label)

    for name, image_labels in labels_by_image.items():
        candidates = knees_by_image.get(name, [])
        image = images[name]
        pending: list[tuple[LabelledKnee, int | None, float | None]] = []  # (label, knee index or None, iou)
        boxes = [label.box for label in image_labels]
        if all(box is not None for box in boxes):
            # Greedy by IoU: the best-overlapping pairs first, each joint used once.
            pairs = sorted(
                (
                    (box_iou(box, knees[k]["box"]), li, k)
                    for li, box in enumerate(boxes)
                    if box is not None
                    for k in candidates
                ),
                reverse=True,
            )
            chosen: dict[int, tuple[int, float]] = {}
            for iou, li, k in pairs:
                if iou < match_iou or li in chosen or k in claimed:
                    continue
                chosen[li] = (k, iou)
                claimed.add(k)
            for li, label in enumerate(image_labels):
                match = chosen.get(li)
                pending.append((label, match[0], match[1]) if match else (label, None, 0.0))
        else:
            for label in image_labels:
                same_side = [k for k in candidates if knees[k]["side"] == label.side and k not in claimed]
                best = max(same_side, key=lambda i: knees[i]["det_confidence"]) if same_side else None
                if best is not None:
                    claimed.add(best)
                pending.append((label, best, None))
            # A side with no joint while an unclaimed joint of the other side is there.
            for position, (label, matched, _) in enumerate(pending):
                if matched is None:
                    others = [i for i in candidates if i not in claimed and knees[i]["side"] != label.side]
                    if others:
                        other = max(others, key=lambda i: knees[i]["det_confidence"])
                        claimed.add(other)
                        pending[position] = (label, other, None)

        for label, knee_index, overlap in pending:
            outcome = {
                "image": name,
                "side": label.side,
                "true_grade": label.kl_grade,
                "kl_grade": "",
                "iou": "" if overlap is None else round(overlap, 3),
                "det_confidence": "",
                "probabilities": None,
                "message": "",
            }
            if knee_index is None:
                reason = image.get("message") or image.get("status") or "no joint detected"
                outcome.update(
                    outcome=MISSED,
                    message=reason if image.get("status") != "ok" else f"no {label.side} joint matched",
                )
            else:
                knee = knees[knee_index]
                outcome.update(kl_grade=knee["kl_grade"], det_confidence=knee["det_confidence"])
                if knee["side"] != label.side:
                    outcome.update(outcome=MISASSIGNED, message=f"joint found but labelled {knee['side']}")
                else:
                    outcome.update(outcome=MATCHED, probabilities=knee["probabilities"])
            outcomes.append(outcome)
    unclaimed = [knees[knee_index] for knee_index in range(len(knees)) if knee_index not in claimed]
    return outcomes, unknown, unclaimed


def _farthest_grade(true_grade: int) -> int:
    return max(KL_GRADES) if true_grade <= 2 else min(KL_GRADES)


def end_to_end_metrics(
    outcomes: Sequence[Mapping[str, Any]],
    unknown: Sequence[LabelledKnee] = (),
    unclaimed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The grading metrics of :mod:`kneepipe.metrics` over every labelled knee, failures included.

    Adds ``matched``/``missed``/``misassigned`` counts, ``failures_by_true_grade``,
    ``graded_only`` (the same metrics over matched knees only: what the grader does on
    the crops the detector cut), the counts of labels without an input image and of
    detected joints without a label.
    """
    n_grades = len(KL_GRADES)
    uniform = np.full(n_grades, 1.0 / n_grades)
    true = np.array([o["true_grade"] for o in outcomes], dtype=int)
    matched = np.array([o["outcome"] == MATCHED for o in outcomes], dtype=bool)
    probabilities = np.array(
        [o["probabilities"] if o["outcome"] == MATCHED else uniform for o in outcomes], dtype=float
    ).reshape(-1, n_grades)
    predicted = np.array(
        [int(o["kl_grade"]) if o["outcome"] == MATCHED else _farthest_grade(o["true_grade"]) for o in outcomes],
        dtype=int,
    )
    metrics = grading_metrics(true, probabilities, predicted)
    graded_only = grading_metrics(true[matched], probabilities[matched], predicted[matched])

    # Confusion matrix, predicted counts and precision from real predictions only.
    for key in ("confusion_matrix", "predicted_counts", "precision"):
        metrics[key] = graded_only[key]
    failures = np.zeros(n_grades, dtype=int)
    for o in outcomes:
        if o["outcome"] != MATCHED:
            failures[o["true_grade"]] += 1
    metrics.update(
        labelled_knees=len(outcomes),
        matched=int(matched.sum()),
        missed=sum(o["outcome"] == MISSED for o in outcomes),
        misassigned=sum(o["outcome"] == MISASSIGNED for o in outcomes),
        failures_by_true_grade=failures.tolist(),
        failure_policy=(
            "missed and misassigned knees count as wrong: a uniform probability row (ECE) and the grade "
            "farthest from the truth (QWK, MAE); confusion matrix and precision use real predictions only"
        ),
        graded_only=graded_only,
        labels_without_image=len(unknown),
        detections_without_label=len(unclaimed),
    )
    return metrics
