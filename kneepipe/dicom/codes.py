"""The coded concepts kneepipe's DICOM Structured Report uses, standard where a standard code fits.

SNOMED CT (``SCT``), DICOM (``DCM``) and UCUM codes are used where one names the concept.
The Kellgren-Lawrence grade, its five probabilities, the detector's confidence and the
review flag have no standard code, so they come from kneepipe's private coding scheme
``99KNEEPIPE``, which every report declares in its Coding Scheme Identification Sequence.
The README lists every code of this module.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from kneepipe import KL_GRADES

PRIVATE_SCHEME = "99KNEEPIPE"
PRIVATE_SCHEME_NAME = "kneepipe private codes"

# Standard codes.
PROCEDURE_REPORTED = Code("168537006", "SCT", "Plain radiography")
FINDING_TYPE = Code("396275006", "SCT", "Osteoarthritis")
KNEE_JOINT = Code("49076000", "SCT", "Knee joint")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
NO_UNITS = Code("1", "UCUM", "no units")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

# Private codes: no standard code names these.
KL_GRADE = Code("KLG", PRIVATE_SCHEME, "Kellgren-Lawrence grade")
KL_GRADE_VALUES = tuple(Code(f"KL{g}", PRIVATE_SCHEME, f"Kellgren-Lawrence grade {g}") for g in KL_GRADES)
KL_PROBABILITIES = tuple(
    Code(f"KLP{g}", PRIVATE_SCHEME, f"Probability of Kellgren-Lawrence grade {g}") for g in KL_GRADES
)
DETECTION_CONFIDENCE = Code("DETCONF", PRIVATE_SCHEME, "Knee joint detection confidence")
NEEDS_REVIEW = Code("REVIEW", PRIVATE_SCHEME, "Needs review")

SIDES = {"R": RIGHT, "L": LEFT}


def all_codes() -> list[Code]:
    """Every code a kneepipe report may hold, standard first (the README's table lists them).

    >>> len(all_codes())
    22
    """
    return [
        PROCEDURE_REPORTED,
        FINDING_TYPE,
        KNEE_JOINT,
        RIGHT,
        LEFT,
        YES,
        NO,
        NO_UNITS,
        PROCESSING_EQUIPMENT,
        KL_GRADE,
        *KL_GRADE_VALUES,
        *KL_PROBABILITIES,
        DETECTION_CONFIDENCE,
        NEEDS_REVIEW,
    ]


def private_scheme_declaration() -> Dataset:
    """The Coding Scheme Identification item that declares ``99KNEEPIPE`` in a report."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "kneepipe project"
    return item
