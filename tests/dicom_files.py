"""DICOM files the tests write themselves (from real pixels), shared by several test modules."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage, for presentation


def make_dicom(pixels: np.ndarray, photometric: str, bits_stored: int, **elements) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    dataset.SOPClassUID = DX_STORAGE
    dataset.Modality = "DX"
    dataset.set_pixel_data(pixels, photometric, bits_stored)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


def save_dicom(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path
