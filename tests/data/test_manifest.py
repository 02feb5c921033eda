"""Manifest schema round trip, the generic manifest CSV, and the index report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_ray.data.index import index_dataset
from mammo_ray.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    build_index_report,
    conform,
    read_generic_csv,
    read_manifest,
    write_manifest,
)


def write_dcm(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = array.shape
    bits = array.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


GOOD = """patient_id,image_path,side,view,label,roi_mask_path,bbox,abnormality_type,split
A1,img/a1_l_cc.dcm,L,CC,1,img/a1_l_cc_mask.dcm,,MASS,train
A1,img/a1_l_cc.dcm,L,CC,BENIGN_WITHOUT_CALLBACK,,"5,6,15,26",calcification,train
A2,/abs/a2.dcm,RIGHT,MLO,0,,,,test
"""


def test_generic_csv_parses_values(tmp_path):
    (tmp_path / "export.csv").write_text(GOOD)
    frame = read_generic_csv(tmp_path / "export.csv")
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert list(frame["lesion_id"]) == ["A1_LEFT_CC_MASS_1", "A1_LEFT_CC_CALCIFICATION_2", "A2_RIGHT_MLO_MASS_1"]
    assert list(frame["exam_key"]) == ["A1_LEFT_MASS_1", "A1_LEFT_CALCIFICATION_2", "A2_RIGHT_MASS_1"]
    assert list(frame["label"]) == [1, 0, 0]
    assert list(frame["pathology"]) == ["MALIGNANT", "BENIGN_WITHOUT_CALLBACK", "BENIGN"]
    assert list(frame["abnormality_id"]) == [1, 2, 1]  # running number per image
    assert frame["image_path"][0] == str(tmp_path / "img" / "a1_l_cc.dcm")
    assert frame["roi_mask_path"][0] == str(tmp_path / "img" / "a1_l_cc_mask.dcm")
    assert frame["image_path"][2] == "/abs/a2.dcm"
    assert frame.loc[1, ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "seed_x", "seed_y"]].tolist() == [
        5,
        6,
        15,
        26,
        10,
        16,
    ]
    assert frame["bbox_x0"][[0, 2]].isna().all()
    assert list(frame["source_split"]) == ["train", "train", "test"]
    assert list(frame["source_row"]) == [1, 2, 3] and set(frame["source"]) == {"generic"}
    assert not frame["resolved"].any()
    assert frame["unresolved_reason"][0] == f"image not found: {tmp_path / 'img' / 'a1_l_cc.dcm'}"


def test_generic_csv_paths_resolve_against_root(tmp_path):
    csv = tmp_path / "meta" / "export.csv"
    csv.parent.mkdir()
    csv.write_text(
        "patient_id,image_path,side,view,label,bbox_x0,bbox_y0,bbox_x1,bbox_y1,seed_x,seed_y\n"
        "B7,x.dcm,LEFT,MLO,MALIGNANT,1,2,3,4,2.5,3.5\n"
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.dcm").write_bytes(b"")
    frame = read_generic_csv(csv, root=tmp_path / "images")
    assert frame["image_path"][0] == str(tmp_path / "images" / "x.dcm")
    assert bool(frame["resolved"][0]) and frame["unresolved_reason"][0] == ""
    assert frame.loc[0, ["bbox_x0", "bbox_y1", "seed_x", "seed_y"]].tolist() == [1, 4, 2.5, 3.5]


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ("C1,a.dcm,UP,CC,1", "side", "cannot parse 'UP'"),
        ("C1,a.dcm,L,AP,1", "view", "cannot parse 'AP'"),
        ("C1,a.dcm,L,CC,maybe", "label", "cannot parse 'maybe'"),
        (",a.dcm,L,CC,1", "patient_id", "empty"),
        ("C1,,L,CC,1", "image_path", "empty"),
        ('C1,a.dcm,L,CC,1,"1,2,3"', "bbox", "expected 'x0,y0,x1,y1'"),
        ('C1,a.dcm,L,CC,1,"9,2,3,4"', "bbox", "0 <= x0 < x1"),
        ("C1,a.dcm,L,CC,1,,x", "seed_x", "not a number"),
        ("C1,a.dcm,L,CC,1,,5", "seed_y", "give both"),
    ],
)
def test_generic_csv_errors_name_file_row_and_field(tmp_path, row, field, reason):
    csv = tmp_path / "bad.csv"
    csv.write_text("patient_id,image_path,side,view,label,bbox,seed_x,seed_y\nC0,ok.dcm,L,CC,0\n" + row + "\n")
    with pytest.raises(ManifestError) as info:
        read_generic_csv(csv)
    message = str(info.value)
    assert f"{csv}: row 2: field {field!r}: " in message and reason in message
    assert "row 1" not in message


def test_generic_csv_rejects_unknown_columns_and_duplicate_lesions(tmp_path):
    csv = tmp_path / "typo.csv"
    csv.write_text("patient_id,image_path,side,view,label,roi_mask\nC1,a.dcm,L,CC,1,m.dcm\n")
    with pytest.raises(ManifestError, match=r"unknown columns \['roi_mask'\]"):
        read_generic_csv(csv)
    csv.write_text("patient_id,image_path,side,view,label,abnormality_id\nC1,a.dcm,L,CC,1,1\nC1,b.dcm,L,CC,0,1\n")
    with pytest.raises(ManifestError, match=r"row 2: field 'abnormality_id': lesion C1_LEFT_CC_MASS_1 repeats row 1"):
        read_generic_csv(csv)
    csv.write_text("patient_id,image_path,side,view,label,pathology\nC1,a.dcm,L,CC,1,BENIGN\n")
    with pytest.raises(ManifestError, match=r"row 1: field 'pathology': BENIGN disagrees with label 1"):
        read_generic_csv(csv)


def test_index_generic_csv_reads_dicoms_and_boxes(tmp_path):
    image = np.random.default_rng(0).integers(0, 4000, (64, 48), dtype=np.uint16)
    mask = np.zeros((64, 48), np.uint8)
    mask[3:9, 30:40] = 1
    write_dcm(tmp_path / "d" / "img.dcm", image)
    write_dcm(tmp_path / "d" / "mask.dcm", mask)
    (tmp_path / "d" / "junk.dcm").write_text("junk")
    (tmp_path / "m.csv").write_text(
        "patient_id,image_path,side,view,label,roi_mask_path\n"
        "G1,d/img.dcm,R,CC,1,d/mask.dcm\n"
        "G2,d/junk.dcm,L,CC,0,\n"
        "G3,d/missing.dcm,L,CC,0,\n"
    )
    manifest, report = index_dataset(generic_csv=tmp_path / "m.csv")
    first = manifest.iloc[0]
    assert first.resolved and (first.bbox_x0, first.bbox_y0, first.bbox_x1, first.bbox_y1) == (30, 3, 40, 9)
    assert (first.seed_x, first.seed_y) == (35.0, 6.0)
    assert report.rows == 3 and report.resolved == 1
    assert [u["reason"].split(":")[0] for u in report.unresolved] == ["image unreadable", "image not found"]
    assert [u["path"] for u in report.unreadable] == [str(tmp_path / "d" / "junk.dcm")]
    assert report.by_label == {"0": 2, "1": 1}
    json.dumps(report.to_dict())


def test_manifest_round_trip_and_report(tmp_path):
    frame = conform(
        pd.DataFrame(
            {
                "lesion_id": ["P1_LEFT_CC_MASS_1", "P2_LEFT_CC_MASS_1"],
                "exam_key": ["P1_LEFT_MASS_1", "P2_LEFT_MASS_1"],
                "patient_id": ["P1", "P2"],
                "side": ["LEFT", "LEFT"],
                "view": ["CC", "CC"],
                "abnormality_id": [1, 1],
                "abnormality_type": ["MASS", "MASS"],
                "pathology": ["MALIGNANT", "BENIGN"],
                "label": [1, 0],
                "source_split": ["train", "test"],
                "source_file": ["x.csv", "x.csv"],
                "source_row": [1, 2],
                "resolved": [True, False],
                "unresolved_reason": ["", "image not found: /x"],
            }
        )
    )
    back = read_manifest(write_manifest(frame, tmp_path / "m.parquet"))
    pd.testing.assert_frame_equal(back, frame)
    report = build_index_report(
        frame, invalid=[{"source_file": "x.csv", "source_row": 3, "field": "side", "value": "UP", "reason": "bad"}]
    )
    assert report["unresolved"] == [
        {"lesion_id": "P2_LEFT_CC_MASS_1", "source_file": "x.csv", "source_row": 2, "reason": "image not found: /x"}
    ]
    assert report["unresolved_by_reason"] == {"image not found": 1}
    assert report["invalid"][0]["source_row"] == 3 and report["patients"] == 2
    assert report["resolved_by_type"] == {"MASS": 1}
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.parquet")
