"""The records a pipeline run keeps per radiograph and per knee: one journal line, one results row.

They are plain JSON objects (a journal line is ``json.dumps`` of an :class:`ImageRecord`),
so they are typed as ``TypedDict``: the keys are checked by a type checker and the journal
format does not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, TypedDict

from kneepipe.joints import STATUS_ERROR


class KneeRecord(TypedDict):
    """One detected knee of a radiograph, graded or with the reason it was not.

    ``logits`` are the grader's raw outputs (None when grading failed); ``probabilities``
    and ``kl_grade`` are added when the run finishes, after calibration and any prior
    adaptation over the whole batch.
    """

    side: str
    box: list[float]  # x1, y1, x2, y2 in the source file's pixels
    det_confidence: float
    crop: str  # the crop's path in the run folder, "" when not saved
    status: str
    message: str
    logits: list[float] | None
    needs_review: NotRequired[bool]  # a reader should check this knee (absent in journals of older versions)
    review_reason: NotRequired[str]  # why, "; "-separated: low detector confidence, side conflict, ...
    probabilities: NotRequired[list[float]]
    kl_grade: NotRequired[int]


class ImageRecord(TypedDict):
    """One input radiograph: how it was read and its knees (one journal line)."""

    image: str  # the name below the input folder
    path: str
    status: str
    message: str
    original_size: list[int] | None  # width, height; None when the file could not be read
    scale: float | None  # decoded pixels per source pixel
    thumbnail: str
    thumbnail_scale: float | None
    knees: list[KneeRecord]


class SkippedEntry(TypedDict):
    """An entry under the input folder that was not read (not an image, hidden, special)."""

    image: str
    status: str
    message: str
    hidden: bool


def image_record(name: str, path: Path) -> ImageRecord:
    """A radiograph's record before anything is known: an error until it is filled in.

    >>> image_record("a.png", Path("in/a.png"))["status"]
    'error'
    """
    return {
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
