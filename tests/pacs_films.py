"""Knee films as a modality sends them: DICOM files the tests write from the shared real radiographs.

Each film gets a patient and a study of its own, as a PACS holds them, so the tests can check
where that identity goes. Nothing here is kept in the repository: the files are written under
the tests' temporary folders.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from dicom_files import make_dicom, save_dicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

# name -> (shared radiograph, photometric, view position, what the pipeline should make of it)
FILMS = {
    "bilateral_m1": ("bilateral_0.png", "MONOCHROME1", "AP", "graded"),
    "single_m2": ("arthritis_7.jpg", "MONOCHROME2", "AP", "graded"),
    "lateral": ("arthritis_3.jpg", "MONOCHROME2", "LL", "lateral_view"),
}
PATIENT_NAME = "Testpatient^Kneepipe"


def film_pixels(radiograph: Path, max_side: int = 1000) -> np.ndarray:
    """A radiograph's grey pixels, shrunk to ``max_side`` so the tests grade in seconds."""
    pixels = cv2.imread(str(radiograph), cv2.IMREAD_GRAYSCALE)
    scale = min(1.0, max_side / max(pixels.shape))
    if scale < 1.0:
        size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return pixels


def knee_film(radiograph: Path, photometric: str, view: str, patient_id: str, max_side: int = 1000) -> Dataset:
    """A DX film of ``radiograph`` with a patient, a study and a series of its own."""
    pixels = film_pixels(radiograph, max_side)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    dataset = make_dicom(
        pixels,
        photometric,
        8,
        PatientName=PATIENT_NAME,
        PatientID=patient_id,
        PatientBirthDate="19540302",
        PatientSex="F",
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        StudyDate="20240115",
        StudyTime="093000",
        AccessionNumber=f"ACC{patient_id}",
        StudyID="1",
        ReferringPhysicianName="",
        SeriesNumber=1,
        InstanceNumber=1,
        PatientOrientation=["L", "F"] if view != "LL" else ["A", "F"],
        ViewPosition=view,
        BodyPartExamined="KNEE",
        ImageType=["ORIGINAL", "PRIMARY"],
        PresentationIntentType="FOR PRESENTATION",
    )
    return dataset


def write_films(folder: Path, radiographs_dir: Path, names=tuple(FILMS)) -> dict[str, Dataset]:
    """Write the films ``names`` as ``folder/<name>.dcm``; returns their datasets by name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for number, name in enumerate(names):
        source, photometric, view, _ = FILMS[name]
        dataset = knee_film(
            radiograph=radiographs_dir / source, photometric=photometric, view=view, patient_id=f"KP{number:04d}"
        )
        save_dicom(dataset, folder / f"{name}.dcm")
        written[name] = dataset
    return written
