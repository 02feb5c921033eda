"""A localization as DICOM objects that PACS viewers open: a TID 1500 SR of the boxes, a SEG of the heatmap.

Both are built with highdicom and reference the source image (its Study, Series and SOP Instance UIDs):

``<stem>_sr.dcm``
    Comprehensive 3D SR, TID 1500 Measurement Report by a device observer named mammo-ray. Each box is
    a planar ROI (TID 1410): a closed POLYLINE of its corners (x0, y0), (x1, y0), (x1, y1), (x0, y1),
    (x0, y0) in the source's pixels (column, row), with its score as a measurement. DICOM's image
    coordinates put (0, 0) at the top-left corner of the top-left pixel and (c, r) at the bottom-right
    corner of pixel (c - 1, r - 1), so a box's exclusive x1 / y1 are its edges as written: the polyline
    encloses exactly ``image[y0:y1, x0:x1]``. The image score is one more measurement on the whole image.
``<stem>_seg.dcm``
    Segmentation, FRACTIONAL (probability), one segment, on the source's pixel grid (same Rows and
    Columns, stored orientation). Values are the map clipped to [0, 1], 255 steps. For cam/gradcam they
    are relative activations, not probabilities: the segment label says so ("... (relative)").

Both carry the research-use disclaimer as their SeriesDescription (and the SEG's ContentDescription).

The source is read with pydicom, header only, and only what references it passes on (``reference_copy``):
its Study, Series and SOP Instance UIDs, SOP Class, and pixel grid. highdicom copies the patient and study
modules from that copy, whose Type 2 attributes (PatientName, PatientID, PatientBirthDate, AccessionNumber,
...) are present and empty, which is how DICOM says "unknown": the outputs carry no patient identifier. The SEG's
copy also drops PixelSpacing: for a 2-D image without a frame of reference (mammograms: no
ImagePositionPatient) highdicom 0.28 then writes a Pixel Measures item without SliceThickness (valid:
it is Type 1C on a frame of reference), which its own ``segread`` rejects. Without it the SEG has no
Pixel Measures, as for a mammogram with only ImagerPixelSpacing; it maps to the source pixel for pixel.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom import sr
from highdicom.seg import Segmentation, SegmentDescription
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from mammo_ray.constants import DISCLAIMER
from mammo_ray.localize.findings import Finding

__all__ = ["DicomSourceError", "dicom_zip", "write_dicom_outputs"]

DEVICE_NAME = "mammo-ray"
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9001, 9002  # after the acquisition series in a viewer's list
MAX_FRACTIONAL_VALUE = 255  # 8-bit fractional pixels: a value is within 0.5 / 255 of the map
# A private coding scheme ("99" prefix, PS3.16 section 8) for what no standard code names: a map score.
_SCHEME = "99MAMMORAY"
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")
# What a reference and the SEG's pixel grid need from the source (``reference_copy``); no identifier.
_KEPT = (*_REQUIRED, "Modality", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
         "HighBit", "PixelRepresentation", "NumberOfFrames", "ImagerPixelSpacing", "PixelSpacing",
         "FrameOfReferenceUID", "ImageLaterality", "Laterality", "ViewPosition", "PatientOrientation",
         "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices",
         "ImageType")  # fmt: skip
# Type 2 attributes highdicom reads from the source as present (an empty value means "unknown").
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


class DicomSourceError(ValueError):
    """The source of a DICOM output is no DICOM image that can be referenced: names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[DicomSourceError], tuple[str, str]]:
        return type(self), (self.path, self.reason)


def _software_version() -> str:
    try:
        return version("mammo-ray")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def read_source(path: str | Path, data: bytes | None = None) -> Dataset:
    """The source's header (no pixels), with every attribute the references need; ``DicomSourceError`` if not.
    ``data``: the file's bytes (an upload), ``path`` then only names it."""
    try:
        try:
            ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, stop_before_pixels=True)
        except InvalidDicomError:  # no preamble: an old export, read as a bare data set
            ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, stop_before_pixels=True, force=True)
    except (OSError, EOFError, InvalidDicomError, ValueError, TypeError) as exc:
        raise DicomSourceError(path, f"not a readable DICOM file ({exc})") from None
    missing = [name for name in _REQUIRED if name not in ds]
    if missing:
        raise DicomSourceError(path, f"not a DICOM image that can be referenced: no {', '.join(missing)}")
    return reference_copy(ds)


def reference_copy(ds: Dataset) -> Dataset:
    """What the outputs may take from their source: the UIDs that reference it and its pixel grid.

    Everything else is left behind, patient and study identifiers above all: the Type 2 attributes
    highdicom copies into the patient and study modules (``_TYPE2``: the name, ID, birth date, sex,
    accession number, study ID, date and time, referring physician) are present and empty, which is
    how DICOM says "unknown". The outputs then carry no identifier the source's UIDs do not already
    imply; a site that files them in its PACS can have its gateway fill the patient from the study.
    """
    out = Dataset()
    out.file_meta = copy.deepcopy(ds.file_meta) if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
    for name in _KEPT:
        if name in ds:
            setattr(out, name, copy.deepcopy(ds[name].value))
    for name in _TYPE2:
        setattr(out, name, None)
    return out


def _algorithm(method: str) -> tuple[str, str]:
    return f"{DEVICE_NAME} {method}", _software_version()


def _box_polyline(box: Finding) -> np.ndarray:
    """The closed outline of ``image[y0:y1, x0:x1]`` in DICOM (column, row) coordinates."""
    x0, y0, x1, y1 = (float(v) for v in box.box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def build_sr(
    source: Dataset, boxes: Sequence[Finding], *, label: str, method: str, image_score: float
) -> sr.Comprehensive3DSR:
    """The TID 1500 measurement report: one planar ROI per box (score measured), one image-score group."""
    name, software = _algorithm(method)
    algorithm = sr.AlgorithmIdentification(name=name, version=software)
    unit = codes.UCUM.NoUnits
    box_score = sr.CodedConcept("box-score", _SCHEME, label[:64])
    device = sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[DEVICE_NAME]),  # one device, one UID
        name=DEVICE_NAME,
        manufacturer_name=DEVICE_NAME,
        model_name=name,
    )
    context = sr.ObservationContext(observer_device_context=sr.ObserverContext(codes.cid270.Device, device))
    region_source = sr.SourceImageForRegion.from_source_image(source)
    groups: list[sr.PlanarROIMeasurementsAndQualitativeEvaluations | sr.MeasurementsAndQualitativeEvaluations] = [
        sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(uid=hd.UID(), identifier=f"box {i}: {label} {box.score:.3f}"),
            referenced_region=sr.ImageRegion(sr.GraphicTypeValues.POLYLINE, _box_polyline(box), region_source),
            finding_type=codes.SCT.Lesion,
            algorithm_id=algorithm,
            measurements=[sr.Measurement(name=box_score, value=float(box.score), unit=unit, algorithm_id=algorithm)],
        )
        for i, box in enumerate(boxes, start=1)
    ]
    groups.append(  # the whole image's score, so that an image without boxes still reports one
        sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(uid=hd.UID(), identifier=f"image score {image_score:.3f}"),
            algorithm_id=algorithm,
            source_images=[sr.SourceImageForMeasurementGroup.from_source_image(source)],
            measurements=[
                sr.Measurement(
                    name=sr.CodedConcept("image-score", _SCHEME, f"{DEVICE_NAME} image score"),
                    value=float(image_score),
                    unit=unit,
                    algorithm_id=algorithm,
                )
            ],
        )
    )
    report = sr.MeasurementReport(context, codes.SCT.Mammography, groups, referenced_images=[source])
    return sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=DEVICE_NAME,
        is_complete=True,  # everything the algorithm found; unverified and preliminary (research use)
        series_description=DISCLAIMER,
    )


def build_seg(source: Dataset, heatmap: np.ndarray, *, label: str, method: str) -> Segmentation:
    """The heatmap as a one-segment FRACTIONAL (probability) segmentation of ``source``."""
    name, software = _algorithm(method)
    segment = SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type="AUTOMATIC",
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=name, family=codes.cid7162.ArtificialIntelligence, version=software
        ),
    )
    grid = copy.deepcopy(source)
    if "PixelSpacing" in grid:  # see the module docstring: highdicom 0.28 could not read its SEG back
        del grid.PixelSpacing
    return Segmentation(
        source_images=[grid],
        pixel_array=np.clip(heatmap, 0.0, 1.0).astype(np.float32),
        segmentation_type="FRACTIONAL",
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=DEVICE_NAME,
        manufacturer_model_name=name,
        software_versions=software,
        device_serial_number="none",  # software: no serial number
        fractional_type="PROBABILITY",
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label="HEATMAP",
        content_description=DISCLAIMER,
        omit_empty_frames=False,  # an all-zero map is still the map
        series_description=DISCLAIMER,
    )


def dicom_outputs(
    source: str | Path,
    heatmap: np.ndarray,
    boxes: Sequence[Finding],
    *,
    label: str,
    method: str,
    image_score: float,
    data: bytes | None = None,
) -> tuple[sr.Comprehensive3DSR, Segmentation]:
    """The SR of ``boxes`` and the SEG of ``heatmap`` for one localized DICOM image (``write_dicom_outputs``'s
    arguments; ``data``: the source's bytes when it is an upload, ``source`` then only names it)."""
    ds = read_source(source, data)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"heatmap: shape {heat.shape}, but {source} has {ds.Rows} rows and {ds.Columns} columns")
    if not np.isfinite(heat).all():
        raise ValueError(f"heatmap of {source}: NaN or infinite values")
    report = build_sr(ds, boxes, label=label, method=method, image_score=image_score)
    seg = build_seg(ds, heat, label=label, method=method)
    return report, seg


def write_dicom_outputs(
    source: str | Path,
    heatmap: np.ndarray,
    boxes: Sequence[Finding],
    out_dir: Path,
    *,
    label: str,
    method: str,
    image_score: float,
) -> dict[str, str]:
    """Write ``<stem>_sr.dcm`` and ``<stem>_seg.dcm`` for one localized DICOM image.

    Args:
        source: the DICOM file that was localized.
        heatmap: (Rows, Columns) map in the file's stored orientation, values in [0, 1].
        boxes: findings in the file's pixel coordinates (x1, y1 exclusive), as the CLI's JSON gives them.
        out_dir: folder to write to (created).
        label: what the map's values are ("mass probability"): the segment label and measurement name.
        method: "dense", "cam" or "gradcam": named in the algorithm identification.
        image_score: the image-level score, reported as a measurement on the whole image.

    Returns:
        ``{"sr": path, "seg": path}``.

    Raises:
        DicomSourceError: ``source`` is not a readable DICOM image that can be referenced.
        ValueError: the heatmap is not finite or not of the source's size.
    """
    report, seg = dicom_outputs(source, heatmap, boxes, label=label, method=method, image_score=image_score)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(source).stem
    paths = {"sr": out_dir / f"{stem}_sr.dcm", "seg": out_dir / f"{stem}_seg.dcm"}
    report.save_as(paths["sr"], enforce_file_format=True)
    seg.save_as(paths["seg"], enforce_file_format=True)
    return {kind: str(path) for kind, path in paths.items()}


def dicom_zip(
    name: str,
    data: bytes,
    heatmap: np.ndarray,
    boxes: Sequence[Finding],
    *,
    label: str,
    method: str,
    image_score: float,
    summary: dict | None = None,
) -> bytes:
    """``write_dicom_outputs`` for an upload (``data``, called ``name``), as one zip archive in memory:
    ``<stem>_sr.dcm``, ``<stem>_seg.dcm`` and, when ``summary`` is given, ``<stem>_boxes.json``."""
    report, seg = dicom_outputs(name, heatmap, boxes, label=label, method=method, image_score=image_score, data=data)
    stem = Path(name).stem or "image"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for kind, obj in (("sr", report), ("seg", seg)):
            buffer = io.BytesIO()
            obj.save_as(buffer, enforce_file_format=True)
            zf.writestr(f"{stem}_{kind}.dcm", buffer.getvalue())
        if summary is not None:
            zf.writestr(f"{stem}_boxes.json", json.dumps(summary, indent=2))
    return archive.getvalue()
