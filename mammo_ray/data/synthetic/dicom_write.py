"""Writing synthetic mammography DICOMs (full-field image, ROI mask, cropped ROI) with pydicom.

Files are Part-10 (preamble + file meta), Explicit VR Little Endian, Digital Mammography
X-Ray Image Storage, MONOCHROME2. Nothing is taken from the clock: every UID and date
comes from the caller, so the same inputs give byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from mammo_ray.constants import DISCLAIMER, Side, View

DIGITAL_MAMMOGRAPHY_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.2")  # ... For Presentation
SERIES_FULL = "full mammogram images"
SERIES_MASK = "ROI mask images"
SERIES_CROP = "cropped images"


@dataclass(frozen=True)
class DicomInfo:
    """What identifies one synthetic DICOM file."""

    patient_id: str  # "P_00001"
    side: Side
    view: View
    study_uid: str
    series_uid: str
    sop_uid: str
    series_description: str  # SERIES_FULL, SERIES_MASK or SERIES_CROP
    study_date: str  # "YYYYMMDD"
    spacing_mm: float  # square pixel spacing
    instance_number: int = 1


def patient_orientation(side: Side, view: View) -> list[str]:
    """PatientOrientation (row direction, column direction) for the canonical display.

    Left breasts are shown with the chest wall on the left, so columns run anterior;
    right breasts are mirrored (posterior). CC rows run towards the patient's other
    side, MLO rows run towards the feet.
    """
    row_dir = "A" if side is Side.LEFT else "P"
    col_dir = "F" if view is View.MLO else ("R" if side is Side.LEFT else "L")
    return [row_dir, col_dir]


def _dataset(path: Path, info: DicomInfo) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_MAMMOGRAPHY_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(info.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DIGITAL_MAMMOGRAPHY_STORAGE
    ds.SOPInstanceUID = info.sop_uid
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.Modality = "MG"
    ds.Manufacturer = "mammo-ray synthetic"
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_id
    ds.PatientID = info.patient_id
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.Laterality = ds.ImageLaterality = info.side.code
    ds.ViewPosition = info.view.value
    ds.PatientOrientation = patient_orientation(info.side, info.view)
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageComments = f"Synthetic image, not a patient. {DISCLAIMER}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = info.instance_number
    spacing = f"{info.spacing_mm:.6f}"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds


def _write(path: str | Path, pixels: np.ndarray, info: DicomInfo) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dataset(path, info)
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    if bits == 16:
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2" if bits == 16 else np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mammogram(path: str | Path, pixels: np.ndarray, info: DicomInfo) -> Path:
    """Write a full-field 16-bit mammogram (uint16, BitsStored 16)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError(f"{path}: mammogram pixels must be 2-D uint16, got {pixels.dtype} {pixels.shape}")
    return _write(path, pixels, info)


def write_crop(path: str | Path, pixels: np.ndarray, info: DicomInfo) -> Path:
    """Write a cropped ROI (the lesion's bounding box of the full image, uint16)."""
    return write_mammogram(path, pixels, info)


def write_mask(path: str | Path, mask: np.ndarray, info: DicomInfo) -> Path:
    """Write a binary ROI mask as 8-bit 0/255, the way CBIS-DDSM stores them."""
    if mask.ndim != 2:
        raise ValueError(f"{path}: mask must be 2-D, got shape {mask.shape}")
    return _write(path, np.where(mask, 255, 0).astype(np.uint8), info)
