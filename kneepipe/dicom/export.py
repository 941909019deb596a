"""DICOM results of a run: a Structured Report and a Secondary Capture overlay per graded DICOM film.

For every DICOM input with at least one graded knee, :func:`write_dicom_results` writes
into ``<run>/dicom/``:

* ``<film>_sr.dcm``: a Comprehensive 3D SR whose root is TID 1500 (Measurement Report),
  as IHE AI Results recommends, with one TID 1410 planar ROI group per knee: the finding
  site (knee joint) with its coded laterality, the KL grade as a coded qualitative
  evaluation, the five grade probabilities and the detector's confidence as
  measurements, the joint box as an SCOORD polyline on the source image (referenced by
  its SOP Instance UID) and the review flag. The algorithm (name, version, the detector's
  and grader's content digests) is identified in each group and in the Contributing
  Equipment Sequence; Verification Flag is UNVERIFIED.
* ``<film>_sc.dcm``: a Secondary Capture of the film with each box, side and grade drawn
  and the words "automatic grades, not a diagnosis".

Both sit in the source film's study, each in a new series of its own, and carry the
source's patient and study identity, as DICOM requires; nothing else kneepipe writes
does. Their UIDs derive from the source instance and the models, so writing them again
gives the same instances (a PACS replaces rather than duplicates them).

>>> from kneepipe.dicom.export import write_dicom_results
>>> write_dicom_results(run, detector.version, grader.version)["written"]  # doctest: +SKIP
[{'image': 'knees.dcm', 'sr': 'dicom/knees_sr.dcm', 'sc': 'dicom/knees_sc.dcm', 'knees': 2}]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kneepipe import __version__
from kneepipe.files import output_keys, write_atomic
from kneepipe.joints import STATUS_OK

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from kneepipe.imaging import Radiograph
    from kneepipe.pipeline.outputs import PipelineRun
    from kneepipe.pipeline.records import KneeRecord

MANUFACTURER = "kneepipe project"
ALGORITHM_NAME = "kneepipe KL grading"
SR_SERIES_NUMBER = 9701
SC_SERIES_NUMBER = 9702
SC_MAX_SIDE = 2048  # the overlay is for reading the grades, not for diagnosis: a screen-sized film
DISCLAIMER = "automatic grades, not a diagnosis"
SIDE_COLOURS = {"R": (255, 170, 0), "L": (0, 200, 255)}  # RGB


@dataclass(frozen=True)
class Algorithm:
    """What graded the knees: kneepipe's version and the two models' names and content digests."""

    detector_version: str
    grader_version: str
    version: str = __version__

    @property
    def parameters(self) -> list[str]:
        return [f"detector={self.detector_version}", f"grader={self.grader_version}"]

    def uid(self, *parts: str) -> str:
        """A UID that depends only on ``parts`` and the algorithm, so a rerun makes the same instance."""
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=[*parts, self.version, self.detector_version, self.grader_version])

    def contributing_equipment(self) -> Any:
        import highdicom as hd

        from kneepipe.dicom.codes import PROCESSING_EQUIPMENT

        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=[f"kneepipe {self.version}", *self.parameters],
            contribution_description="Kellgren-Lawrence grades computed automatically, not verified by a reader",
        )


def needs_review(knee: KneeRecord) -> bool:
    """A graded knee needs a reader's look when the run flagged it or noted anything about it."""
    return bool(knee.get("needs_review")) or bool(knee["message"])


def graded_knees(knees: Sequence[KneeRecord]) -> list[KneeRecord]:
    """The knees of a film that carry a final grade."""
    return [knee for knee in knees if knee["status"] == STATUS_OK and "kl_grade" in knee]


def build_report(source: Dataset, knees: Sequence[KneeRecord], algorithm: Algorithm) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) of a film's graded knees, in the film's study.

    Args:
        source: the source film's dataset (pixel data not needed).
        knees: its graded knees (boxes in the source's pixels).
        algorithm: what graded them.
    """
    import highdicom as hd

    from kneepipe.dicom import codes

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.uid("device"),
            name="kneepipe",
            manufacturer_name=MANUFACTURER,
            model_name=ALGORITHM_NAME,
        ),
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=algorithm.version, parameters=algorithm.parameters
    )
    source_image = hd.sr.SourceImageForRegion.from_source_image(source)
    width, height = int(source.Columns), int(source.Rows)
    groups = []
    for number, knee in enumerate(knees, start=1):
        x1, y1, x2, y2 = (float(v) for v in knee["box"])
        x1, x2 = float(np.clip(x1, 0, width)), float(np.clip(x2, 0, width))
        y1, y2 = float(np.clip(y1, 0, height)), float(np.clip(y2, 0, height))
        laterality = codes.SIDES.get(knee["side"])
        grade = codes.KL_GRADE_VALUES[int(knee["kl_grade"])]
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)
        measurements = [
            hd.sr.Measurement(name=code, value=round(float(p), 6), unit=codes.NO_UNITS)
            for code, p in zip(codes.KL_PROBABILITIES, knee["probabilities"], strict=True)
        ]
        measurements.append(
            hd.sr.Measurement(
                name=codes.DETECTION_CONFIDENCE, value=round(float(knee["det_confidence"]), 6), unit=codes.NO_UNITS
            )
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=algorithm.uid(str(source.SOPInstanceUID), "knee", str(number)),
                    identifier=f"{knee['side']} knee {number}",
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners, source_image=source_image
                ),
                finding_type=codes.FINDING_TYPE,
                algorithm_id=algorithm_id,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.KNEE_JOINT, laterality=laterality)],
                measurements=measurements,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=codes.KL_GRADE, value=grade),
                    hd.sr.QualitativeEvaluation(
                        name=codes.NEEDS_REVIEW, value=codes.YES if needs_review(knee) else codes.NO
                    ),
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=algorithm.uid(str(source.SOPInstanceUID), "sr series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=algorithm.uid(str(source.SOPInstanceUID), "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm.contributing_equipment()],
        series_description="kneepipe KL grades (automatic, unverified)",
    )
    sr.CodingSchemeIdentificationSequence = [
        *sr.get("CodingSchemeIdentificationSequence", []),
        codes.private_scheme_declaration(),
    ]
    return sr


def overlay_pixels(radiograph: Radiograph, knees: Sequence[KneeRecord], version: str = __version__) -> np.ndarray:
    """The film in RGB with each knee's box, side and grade drawn, and the disclaimer along the bottom.

    Boxes are in source pixels; ``radiograph.scale`` maps them onto its pixels.
    """
    import cv2

    pixels = np.repeat(radiograph.pixels[:, :, None], 3, axis=2).copy()
    height, width = pixels.shape[:2]
    unit = max(max(width, height) / 1000.0, 0.6)  # legible on a small film too
    thickness = max(1, round(2 * unit))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for knee in knees:
        x1, y1, x2, y2 = (round(float(v) * radiograph.scale) for v in knee["box"])
        colour = SIDE_COLOURS.get(knee["side"], (255, 255, 0))
        cv2.rectangle(pixels, (x1, y1), (x2, y2), colour, thickness)
        review = " review" if needs_review(knee) else ""
        label = f"{knee['side']} KL{knee['kl_grade']} p={max(knee['probabilities']):.2f}{review}"
        scale = 0.8 * unit
        (text_w, text_h), base = cv2.getTextSize(label, font, scale, thickness)
        top = y1 - text_h - base - thickness if y1 - text_h - base - thickness > 0 else y2 + thickness
        cv2.rectangle(pixels, (x1, top), (x1 + text_w, top + text_h + base), (0, 0, 0), -1)
        cv2.putText(pixels, label, (x1, top + text_h), font, scale, colour, thickness, cv2.LINE_AA)
    footer = f"kneepipe {version}: {DISCLAIMER}"
    scale = 0.7 * unit
    (text_w, text_h), base = cv2.getTextSize(footer, font, scale, thickness)
    while text_w > width - 8 and scale > 0.2:  # a narrow film: the words shrink, never get cut
        scale *= 0.9
        (text_w, text_h), base = cv2.getTextSize(footer, font, scale, thickness)
    band = text_h + base + 2 * thickness + 4
    pixels[height - band :, :] = 0
    cv2.putText(pixels, footer, (4, height - base - thickness), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return pixels


def build_overlay(source: Dataset, radiograph: Radiograph, knees: Sequence[KneeRecord], algorithm: Algorithm) -> Any:
    """The Secondary Capture of the film with its grades drawn, in the film's study, in a new series."""
    import highdicom as hd

    orientation = [str(v) for v in source.get("PatientOrientation") or []]
    known = len(orientation) == 2 and all(orientation)  # shrinking the film keeps its rows' and columns' directions
    laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_pixels(radiograph, knees, algorithm.version),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=algorithm.uid(str(source.SOPInstanceUID), "sc series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=algorithm.uid(str(source.SOPInstanceUID), "sc"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        laterality=laterality if laterality in ("R", "L") else None,
        patient_orientation=(orientation[0], orientation[1]) if known else ("L", "F"),
        contributing_equipment=[algorithm.contributing_equipment()],
        series_description="kneepipe KL grades overlay (automatic, not a diagnosis)",
    )
    if not known:
        sc["PatientOrientation"].value = None  # the source does not say: present and empty, as DICOM writes "unknown"
    if "Laterality" not in sc:
        sc.Laterality = ""  # a paired part: present, empty when the film shows both knees or does not say
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"kneepipe {algorithm.version}: {DISCLAIMER}"
    return sc


def read_source(path: str | Path) -> Dataset | None:
    """The film's DICOM header, or None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None


def write_film(
    path: Path, knees: Sequence[KneeRecord], algorithm: Algorithm, folder: Path, key: str, max_side: int = SC_MAX_SIDE
) -> tuple[Path, Path] | None:
    """Write one DICOM film's SR and Secondary Capture into ``folder``; None when the file is not DICOM.

    Raises:
        ValueError, OSError, AttributeError: the source lacks what an SR needs, or the files
            cannot be written; the caller names the film.
    """
    from kneepipe.imaging import read_radiograph

    source = read_source(path)
    if source is None:
        return None
    sr = build_report(source, knees, algorithm)
    sc = build_overlay(source, read_radiograph(path, max_side=max_side), knees, algorithm)
    folder.mkdir(parents=True, exist_ok=True)
    sr_path, sc_path = folder / f"{key}_sr.dcm", folder / f"{key}_sc.dcm"
    for dataset, target in ((sr, sr_path), (sc, sc_path)):
        partial = target.with_name(target.name + ".partial")
        dataset.save_as(partial, enforce_file_format=True)
        partial.replace(target)
    return sr_path, sc_path


def write_dicom_results(run: PipelineRun, detector_version: str, grader_version: str) -> dict[str, Any]:
    """Write the SR and Secondary Capture of every graded DICOM film of ``run`` into ``<run>/dicom/``.

    Returns the ``dicom`` part of the run's summary, also written into ``summary.json``:
    the films written, those that are not DICOM (no DICOM output), those without a graded
    knee, and those whose DICOM could not be written, each with the reason. One film's
    failure never stops the others.
    """
    algorithm = Algorithm(detector_version, grader_version)
    folder = run.out_dir / "dicom"
    keys = output_keys(list(run.images))
    result: dict[str, Any] = {"folder": "dicom", "written": [], "not_dicom": [], "no_graded_knee": [], "failed": []}
    for name, record in run.images.items():
        knees = graded_knees(record["knees"])
        try:
            if read_source(record["path"]) is None:
                result["not_dicom"].append(name)
                continue
            if not knees:
                result["no_graded_knee"].append(name)
                continue
            written = write_film(Path(record["path"]), knees, algorithm, folder, keys[name])
        except Exception as err:  # this film's problem only; the others are written
            result["failed"].append({"image": name, "reason": f"{type(err).__name__}: {err}"})
            continue
        if written is not None:
            sr_path, sc_path = written
            result["written"].append(
                {
                    "image": name,
                    "sr": sr_path.relative_to(run.out_dir).as_posix(),
                    "sc": sc_path.relative_to(run.out_dir).as_posix(),
                    "knees": len(knees),
                }
            )
    if result["not_dicom"]:
        result["note"] = f"{len(result['not_dicom'])} input(s) are not DICOM: no DICOM output for them"
    run.summary["dicom"] = result
    write_atomic(run.out_dir / "summary.json", json.dumps(run.summary, indent=2, default=str))
    return result


def describe_dicom_results(dicom: dict[str, Any]) -> str:
    """The end-of-run lines about DICOM outputs.

    >>> print(describe_dicom_results({"written": [{}], "not_dicom": ["a.png"], "no_graded_knee": [], "failed": []}))
    DICOM: 1 SR and 1 Secondary Capture in dicom/; 1 input(s) not DICOM (no DICOM output)
    """
    parts = [f"DICOM: {len(dicom['written'])} SR and {len(dicom['written'])} Secondary Capture in dicom/"]
    if dicom["not_dicom"]:
        parts.append(f"{len(dicom['not_dicom'])} input(s) not DICOM (no DICOM output)")
    if dicom["no_graded_knee"]:
        parts.append(f"{len(dicom['no_graded_knee'])} DICOM film(s) without a graded knee")
    lines = ["; ".join(parts)]
    lines += [f"  DICOM not written for {entry['image']}: {entry['reason']}" for entry in dicom["failed"]]
    return "\n".join(lines)
