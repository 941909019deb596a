"""The one object the detector hands to the grader: a knee joint found on a radiograph.

Framework-free on purpose: stage 1 produces :class:`Joint`, stage 2 and the pipeline
consume it; neither sees an Ultralytics ``Results`` or a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Side = Literal["R", "L"]
SIDES: tuple[Side, Side] = ("R", "L")
"""The detector's class order: class 0 is the patient's right knee, class 1 the left."""
CROP_FRAMING = "oai-kl224: square crop centred on the tibiofemoral joint space, 224 px, natural side"
"""How a joint crop is framed: the detector cuts this square (kneepipe.detect.framing), the OAI-KL224 crops
the grader learnt from were cut the same way, and a grader file records the framing it expects."""

# Status values of a row in joints.csv / results.csv.
STATUS_OK = "ok"
STATUS_NO_KNEE = "no_knee"
STATUS_NOT_GRADABLE_VIEW = "not_gradable_view"
STATUS_ERROR = "error"
STATUS_ROTATED = "rotated"  # the film lies sideways and no knee was found on it turned upright
STATUS_SKIPPED = "skipped"  # an entry under the input folder that is not read (not an image, hidden, ...)
# Quality checks (kneepipe.detect.quality): film-level ones refuse the whole film ...
STATUS_LATERAL_VIEW = "lateral_view"  # a lateral knee view (DICOM ViewPosition tag, else the view classifier)
STATUS_OVEREXPOSED = "overexposed"  # much of the film saturated white
STATUS_UNDEREXPOSED = "underexposed"  # nothing on the film bright enough to be bone
# ... knee-level ones refuse one knee of a film (the other knee of a bilateral film is still graded).
STATUS_KNEE_PROSTHESIS = "knee_prosthesis"  # a metal implant in or around the joint
STATUS_PARTIAL = "partial"  # the joint is cut by the film's edge
KNEE_REFUSALS = frozenset({STATUS_KNEE_PROSTHESIS, STATUS_PARTIAL})
"""Statuses a single knee can get while other knees of its film are graded."""


@dataclass(frozen=True)
class Joint:
    """One knee joint on one radiograph.

    Attributes:
        image: the radiograph file it was found on.
        side: the patient's side, ``"R"`` or ``"L"``.
        box: ``(x1, y1, x2, y2)`` of the crop region, in the source image's pixels.
        confidence: the detector's confidence for this joint, 0-1.
        crop: the joint crop, 2-D ``uint8`` (224x224 by default), framed like the
            OAI training crops.
        review: why a reader should check this knee before trusting its grade (a low
            detector confidence, a side conflict, a turned film...); empty when nothing is
            doubtful. Any check may add a reason with
            ``dataclasses.replace(joint, review=(*joint.review, reason))``.
        status: ``ok``, or why this knee is not graded (one of :data:`KNEE_REFUSALS`):
            it is found, boxed and cropped, but its grade would not mean anything.
        message: the reason for a status other than ``ok``.
    """

    image: Path
    side: Side
    box: tuple[float, float, float, float]
    confidence: float
    crop: np.ndarray = field(repr=False)
    review: tuple[str, ...] = ()
    status: str = STATUS_OK
    message: str = ""

    @property
    def needs_review(self) -> bool:
        """Whether any check asked for a reader's look at this knee."""
        return bool(self.review)

    @property
    def review_reason(self) -> str:
        """The review reasons as one line, ``"; "``-separated (``""`` when none)."""
        return "; ".join(self.review)


@dataclass(frozen=True)
class Detection:
    """What the detector concluded about one radiograph: its joints, or why none.

    ``status`` is ``ok`` when at least one joint is graded; a film refused as a whole
    (``no_knee``, ``lateral_view``, ``overexposed``, ``underexposed``, ``rotated``,
    ``not_gradable_view``, ``error``) has no joints and ``message`` says why; a film whose
    every knee a quality check refused (``knee_prosthesis``, ``partial``) keeps its joints
    and takes the first one's status, each joint carrying its own reason.
    """

    image: Path
    joints: tuple[Joint, ...]
    status: str = STATUS_OK
    message: str = ""
