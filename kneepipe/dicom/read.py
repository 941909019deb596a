"""Read a kneepipe Structured Report back: the knees it records, as plain dicts.

>>> from kneepipe.dicom.read import read_report
>>> read_report("run/dicom/knees_sr.dcm")[0]["kl_grade"]  # doctest: +SKIP
2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kneepipe.dicom import codes


def _same(code: Any, expected: codes.Code) -> bool:
    return code.value == expected.value and code.scheme_designator == expected.scheme_designator


def read_report(path: str | Path) -> list[dict[str, Any]]:
    """The knees of a kneepipe SR: side, KL grade, probabilities, detector confidence, box, review flag.

    Each knee also names the SOP Instance UID of the image its box is drawn on.

    Raises:
        ValueError: the file is not an SR with kneepipe's content, naming the file.
    """
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
    except Exception as err:
        raise ValueError(f"{path}: not a DICOM Structured Report ({err})") from err
    sides = {(c.value, c.scheme_designator): side for side, c in codes.SIDES.items()}
    grades = {(c.value, c.scheme_designator): grade for grade, c in enumerate(codes.KL_GRADE_VALUES)}
    knees = []
    content: Any = sr.content  # a MeasurementReport for an SR with TID 1500 content
    for group in content.get_planar_roi_measurement_groups():
        knee: dict[str, Any] = {"side": "", "kl_grade": None, "probabilities": [None] * len(codes.KL_PROBABILITIES)}
        for site in group.finding_sites:
            if site.laterality is not None:
                knee["side"] = sides.get((site.laterality.value, site.laterality.scheme_designator), "")
        for evaluation in group.get_qualitative_evaluations():
            if _same(evaluation.name, codes.KL_GRADE):
                knee["kl_grade"] = grades.get((evaluation.value.value, evaluation.value.scheme_designator))
            elif _same(evaluation.name, codes.NEEDS_REVIEW):
                knee["needs_review"] = _same(evaluation.value, codes.YES)
        for measurement in group.get_measurements():
            for grade, code in enumerate(codes.KL_PROBABILITIES):
                if _same(measurement.name, code):
                    knee["probabilities"][grade] = float(measurement.value)
            if _same(measurement.name, codes.DETECTION_CONFIDENCE):
                knee["det_confidence"] = float(measurement.value)
        region = group.roi
        if region is not None:
            points = region.value
            knee["box"] = [float(points[:, 0].min()), float(points[:, 1].min())]
            knee["box"] += [float(points[:, 0].max()), float(points[:, 1].max())]
            knee["source_sop_instance_uid"] = str(
                region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            )
        if knee["kl_grade"] is None:
            raise ValueError(f"{path}: a measurement group without a kneepipe KL grade")
        knees.append(knee)
    return knees


def codes_used(dataset: Any) -> set[tuple[str, str, str]]:
    """Every coded concept in an SR's content tree, as ``(value, scheme, meaning)`` (for the docs' table)."""
    found: set[tuple[str, str, str]] = set()
    for item in dataset.get("ContentSequence", []):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
            for code in item.get(keyword, []):
                found.add((str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
        for measured in item.get("MeasuredValueSequence", []):
            for code in measured.get("MeasurementUnitsCodeSequence", []):
                found.add((str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
        found |= codes_used(item)
    for code in dataset.get("ConceptNameCodeSequence", []):
        found.add((str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
    return found
