"""``mammo-ray localize --dicom-out``: the boxes as a TID 1500 SR and the map as a FRACTIONAL SEG, read back.

Both objects are read back with highdicom (``srread``, ``segread``) and pydicom, and compared with the
CLI's own ``--json`` output (boxes, image score) and with the heatmap ``mammo_ray.load(...).localize``
gives for the same file (the same code path). Box corners: a box's exclusive x1 / y1 are written as
they are, because DICOM's image coordinates put (c, r) at the bottom-right corner of pixel
(c - 1, r - 1): the polyline (x0, y0) -> (x1, y0) -> (x1, y1) -> (x0, y1) -> (x0, y0) encloses exactly
``image[y0:y1, x0:x1]``.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.sr.codedict import codes

import mammo_ray
from mammo_ray.cli import main
from mammo_ray.constants import DISCLAIMER, Side, View
from mammo_ray.data.synthetic.dicom_write import DicomInfo, write_mammogram
from mammo_ray.localize.dicom_out import MAX_FRACTIONAL_VALUE, DicomSourceError, write_dicom_outputs
from mammo_ray.localize.findings import Finding
from mammo_ray.localize.whole_image import read_mammogram
from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.runtime import ServeSettings

pytestmark = pytest.mark.slow  # the fixtures train a patch model


def _localize(capfd, patch_model, image: str, tmp_path, *extra: str) -> tuple[int, dict]:
    """(exit code, the JSON printed) of ``localize --threshold 0.25 --dicom-out <tmp>/dicom --json``."""
    capfd.readouterr()
    code = main(
        ["localize", "--model", str(patch_model[0]), "--image", image, "--out", str(tmp_path / "out"),
         "--dicom-out", str(tmp_path / "dicom"), "--workdir", str(tmp_path), "--threshold", "0.25", *extra, "--json"]
    )  # fmt: skip
    captured = capfd.readouterr()
    return code, json.loads(captured.out or "{}") | ({"stderr": captured.err[-2000:]} if code else {})


@pytest.fixture
def localized(patch_model, mass_image, tmp_path, capfd):
    """(the CLI's JSON, the source's header) of ``localize --dicom-out`` on the mass image."""
    code, out = _localize(capfd, patch_model, mass_image[0], tmp_path)
    assert code == 0, out
    assert out["boxes"], "no box at threshold 0.25: nothing for the SR to hold"
    return out, pydicom.dcmread(mass_image[0], stop_before_pixels=True)


def _corners(box: dict) -> list[list[float]]:
    x0, y0, x1, y1 = (float(box[k]) for k in ("x0", "y0", "x1", "y1"))
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_sr_holds_the_json_boxes_as_planar_rois_of_the_source(localized):
    out, source = localized
    report = hd.sr.srread(out["dicom"]["sr"])
    assert isinstance(report, hd.sr.Comprehensive3DSR) and report.Modality == "SR"
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID  # a series of its own in the source's study
    assert report.SeriesDescription == DISCLAIMER
    [evidence] = report.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence] == [source.SOPInstanceUID]
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"  # TID 1500 Measurement Report
    [observer] = report.content.get_observer_contexts()
    assert observer.observer_type == codes.cid270.Device
    assert observer.observer_identifying_attributes.name == "mammo-ray"

    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(out["boxes"])
    for group, box in zip(groups, out["boxes"], strict=True):  # same order: by score, highest first
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert group.roi.value.tolist() == _corners(box)  # closed: the first corner again at the end
        [image] = group.roi.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        [score] = group.get_measurements()
        assert score.value == pytest.approx(box["score"], abs=1e-9)
        assert score.name.meaning == "mass probability" and score.unit.value == "1"
    [whole] = report.content.get_image_measurement_groups()
    [image_score] = whole.get_measurements()
    assert image_score.value == pytest.approx(out["image_score"], abs=1e-9)
    assert out["dicom"]["sr"].endswith("_sr.dcm") and out["dicom"]["seg"].endswith("_seg.dcm")


def test_seg_is_the_heatmap_as_a_fractional_segmentation_of_the_source(localized, patch_model, mass_image, tmp_path):
    out, source = localized
    seg = hd.seg.segread(out["dicom"]["seg"])
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == MAX_FRACTIONAL_VALUE
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    assert seg.SeriesDescription == DISCLAIMER and seg.ContentDescription == DISCLAIMER
    [segment] = seg.SegmentSequence
    assert segment.SegmentLabel == "mass probability" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert pydicom.dcmread(out["dicom"]["seg"]).Modality == "SEG"

    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1], rescale_fractional=True)
    assert pixels.shape == (1, source.Rows, source.Columns, 1) and pixels.dtype.kind == "f"
    # the same map as mammo_ray.load's localize (the CLI's code path), in the file's stored orientation
    heat = mammo_ray.load(patch_model[0], workdir=tmp_path).localize(mass_image[0], threshold=0.25)["heatmap"]
    assert heat.shape == (source.Rows, source.Columns)
    np.testing.assert_allclose(pixels[0, :, :, 0], np.clip(heat, 0, 1), atol=1 / MAX_FRACTIONAL_VALUE)
    box = out["boxes"][0]  # the SR's top box sits where the SEG is bright (the two agree on orientation)
    inside = pixels[0, box["y0"] : box["y1"], box["x0"] : box["x1"], 0]
    assert inside.max() >= 0.25 - 1 / MAX_FRACTIONAL_VALUE and inside.mean() > pixels.mean()


def test_png_input_is_refused_before_anything_is_written(patch_model, mass_image, tmp_path, capfd):
    image, _ = read_mammogram(mass_image[0])
    png = tmp_path / "mass.png"
    Image.fromarray((255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)).save(png)
    code, out = _localize(capfd, patch_model, str(png), tmp_path)
    assert code == 1, out
    assert out["error"].startswith("--dicom-out: DICOM output needs a DICOM input") and str(png) in out["error"]
    assert "PNG" in out["error"]
    assert not (tmp_path / "dicom").exists() and not (tmp_path / "out").exists()


def _tiny_dicom(path) -> str:
    info = DicomInfo("P_00001", Side.LEFT, View.CC, "1.2.3.1", "1.2.3.2", "1.2.3.3", "full", "20240101", 0.1)
    return str(write_mammogram(path, np.full((12, 8), 1000, dtype=np.uint16), info))


def test_writer_without_boxes_still_reports_the_image_and_its_map(tmp_path):
    source = _tiny_dicom(tmp_path / "tiny.dcm")
    heat = np.linspace(0, 1, 96, dtype=np.float32).reshape(12, 8)
    paths = write_dicom_outputs(source, heat, [], tmp_path / "dicom", label="mass probability", method="dense",
                                image_score=1.0)  # fmt: skip
    report = hd.sr.srread(paths["sr"])
    assert report.content.get_planar_roi_measurement_groups() == []
    [whole] = report.content.get_image_measurement_groups()
    assert whole.get_measurements()[0].value == 1.0
    pixels = hd.seg.segread(paths["seg"]).get_pixels_by_source_instance(["1.2.3.3"], rescale_fractional=True)
    np.testing.assert_allclose(pixels[0, :, :, 0], heat, atol=0.5 / MAX_FRACTIONAL_VALUE)  # rounded, not cut


def test_writer_names_a_source_that_is_no_dicom_and_a_map_of_another_size(tmp_path):
    png = tmp_path / "not-dicom.png"
    Image.fromarray(np.zeros((12, 8), dtype=np.uint8)).save(png)
    box = [Finding(1, 1, 4, 4, 0.9, 9.0)]
    with pytest.raises(DicomSourceError, match="not-dicom.png") as error:
        write_dicom_outputs(png, np.zeros((12, 8)), box, tmp_path / "dicom", label="x", method="dense", image_score=0.9)
    assert isinstance(error.value, ValueError)
    source = _tiny_dicom(tmp_path / "tiny.dcm")
    with pytest.raises(ValueError, match=r"heatmap: shape \(8, 12\)"):
        write_dicom_outputs(source, np.zeros((8, 12)), box, tmp_path / "dicom", label="x", method="dense",
                            image_score=0.9)  # fmt: skip
    assert not (tmp_path / "dicom").exists()


def _http_dicom(patch_model, tmp_path, name: str, data: bytes):
    """The reply of POST /v1/localize?format=dicom (threshold 0.25) from the in-process app."""
    settings = ServeSettings(model=str(patch_model[0]), workdir=str(tmp_path), execution="loop")
    backend = RuntimeBackend(settings)
    asyncio.run(backend.load())
    client = TestClient(build_api(backend, settings))
    return client.post("/v1/localize?format=dicom", files={"file": (name, data)}, data={"threshold": "0.25"})


def test_http_localize_format_dicom_zips_the_same_sr_and_seg(localized, patch_model, mass_image, tmp_path):
    out, source = localized
    reply = _http_dicom(patch_model, tmp_path, "mass.dcm", Path(mass_image[0]).read_bytes())
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/zip" and reply.headers["x-disclaimer"] == DISCLAIMER
    assert 'filename="mass_dicom.zip"' in reply.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(reply.content))
    assert sorted(archive.namelist()) == ["mass_boxes.json", "mass_seg.dcm", "mass_sr.dcm"]
    archive.extractall(tmp_path / "zip")
    summary = json.loads(archive.read("mass_boxes.json"))
    assert summary["boxes"] == out["boxes"] and summary["disclaimer"] == DISCLAIMER  # the CLI's boxes
    report = hd.sr.srread(tmp_path / "zip" / "mass_sr.dcm")
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.roi.value.tolist() for g in groups] == [_corners(b) for b in summary["boxes"]]
    [evidence] = report.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    seg = hd.seg.segread(tmp_path / "zip" / "mass_seg.dcm")
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)  # the source's frame geometry
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], rescale_fractional=True)
    cli = hd.seg.segread(out["dicom"]["seg"]).get_pixels_by_source_instance(
        [source.SOPInstanceUID], rescale_fractional=True
    )
    np.testing.assert_array_equal(pixels, cli)  # one code path: the HTTP zip holds the CLI's map


def test_http_localize_format_dicom_refuses_a_png_with_a_422_naming_the_file(patch_model, mass_image, tmp_path):
    image, _ = read_mammogram(mass_image[0])
    buffer = io.BytesIO()
    Image.fromarray((255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)).save(buffer, format="PNG")
    reply = _http_dicom(patch_model, tmp_path, "mass.png", buffer.getvalue())
    assert reply.status_code == 422 and reply.json()["field"] == "file"
    assert reply.json()["reason"].startswith("DICOM output needs a DICOM input; mass.png is a PNG image")
