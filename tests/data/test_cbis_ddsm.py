"""CBIS-DDSM CSV parsing (the four real files) and path resolution on tiny synthetic trees."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_ray.data import cbis_ddsm
from mammo_ray.data.cbis_ddsm import CbisCsvError, parse_cbis_csvs, read_cbis_csvs, resolve_paths
from mammo_ray.data.index import index_dataset
from mammo_ray.data.synthetic import REAL_CBIS_CSVS
from mammo_ray.data.synthetic.cbis import MASS_COLUMNS

REAL = REAL_CBIS_CSVS  # the real CSVs
HEADER = list(MASS_COLUMNS)  # the mass CSVs' columns, in the real files' order
MASS_TRAIN = "mass_case_description_train_set.csv"
FULL, CROP = (64, 48), (10, 12)
BOX = (10, 20, 22, 30)  # x0, y0, x1, y1 of the default mask


def write_dcm(path: Path, array: np.ndarray) -> Path:
    """A minimal valid DICOM (explicit VR little endian) holding ``array`` (uint8 or uint16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P_TEST", "MG"
    ds.Rows, ds.Columns = array.shape
    bits = array.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def image(seed: int = 0, shape=FULL) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, size=shape, dtype=np.uint16)


def mask(box=BOX, shape=FULL) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = np.zeros(shape, np.uint8)
    out[y0:y1, x0:x1] = 255
    return out


def uid(n: int) -> str:
    return f"1.3.6.1.4.1.9590.100.1.2.{n:040d}"


def case_row(
    patient: str, side: str = "LEFT", view: str = "CC", abn: int = 1, pathology: str = "MALIGNANT", n: int = 1
) -> dict:
    """A CSV row with CBIS-style paths: image uid n/n+1, crop and mask in series n+2/n+3."""
    case = f"Mass-Training_{patient}_{side}_{view}"
    roi = f"{case}_{abn}/{uid(n + 2)}/{uid(n + 3)}"
    return {
        "patient_id": patient,
        "breast_density": "3",
        "left or right breast": side,
        "image view": view,
        "abnormality id": str(abn),
        "abnormality type": "mass",
        "mass shape": "OVAL",
        "mass margins": "CIRCUMSCRIBED",
        "assessment": "4",
        "pathology": pathology,
        "subtlety": "4",
        "image file path": f"{case}/{uid(n)}/{uid(n + 1)}/000000.dcm",
        "cropped image file path": f"{roi}/000000.dcm",
        "ROI mask file path": f"{roi}/000001.dcm\n",
    }


def write_csv(folder: Path, rows: list[dict], name: str = MASS_TRAIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER, quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(rows)
    return folder / name


# ---------------------------------------------------------------------------- the real CSVs


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    frame, invalid = parse_cbis_csvs(REAL)
    assert invalid == []
    return frame


def test_real_csvs_parse_with_exact_row_counts(real):
    counts = real.groupby("source_file").size().to_dict()
    assert counts == {
        "mass_case_description_train_set.csv": 1318,
        "mass_case_description_test_set.csv": 378,
        "calc_case_description_train_set.csv": 1546,
        "calc_case_description_test_set.csv": 326,
    }
    assert real["lesion_id"].is_unique
    for column in ("csv_image_path", "csv_crop_path", "csv_mask_path"):
        assert not real[column].str.contains(r"\s$", regex=True).any(), column
        assert real[column].str.endswith(".dcm").all()
    # both density spellings were read: no row lacks a density
    assert real["breast_density"].notna().all()
    assert set(real["breast_density"]) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert set(real.loc[real.abnormality_type == "MASS", "calc_type"].fillna("")) == {""}
    assert real.loc[real.abnormality_type == "CALCIFICATION", "calc_type"].ne("").all()


def _one(frame, **where) -> pd.Series:
    sel = frame
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, where
    return sel.iloc[0]


def test_real_known_rows(real):
    row = _one(real, patient_id="P_00001", side="LEFT", view="CC", abnormality_type="MASS")
    assert (row.pathology, row.label, row.source_split, row.source_row) == ("MALIGNANT", 1, "train", 1)
    assert (row.breast_density, row.mass_shape, row.mass_margins) == (
        3.0,
        "IRREGULAR-ARCHITECTURAL_DISTORTION",
        "SPICULATED",
    )
    assert row.lesion_id == "P_00001_LEFT_CC_MASS_1" and row.exam_key == "P_00001_LEFT_MASS_1"
    assert row.csv_mask_path.endswith("/000001.dcm")
    row = _one(real, patient_id="P_00038", side="LEFT", view="CC", abnormality_type="CALCIFICATION")
    assert (row.pathology, row.label, row.source_split, row.breast_density) == ("BENIGN", 0, "test", 2.0)
    assert (row.calc_type, row.calc_distribution) == ("PUNCTATE-PLEOMORPHIC", "CLUSTERED")
    row = _one(real, patient_id="P_00038", side="RIGHT", view="CC", abnormality_type="CALCIFICATION", abnormality_id=1)
    assert (row.pathology, row.label) == ("BENIGN_WITHOUT_CALLBACK", 0)
    assert row.source_file == "calc_case_description_test_set.csv"


def test_parse_only_index_reports_every_row_unresolved():
    manifest, report = index_dataset(csv_dir=REAL)
    assert report.rows == 3568 and report.resolved == 0 and report.invalid == []
    assert report.unresolved_by_reason == {"no image root given": 3568}
    assert report.by_type == {"CALCIFICATION": 1872, "MASS": 1696}
    assert report.by_pathology == {"BENIGN": 1429, "BENIGN_WITHOUT_CALLBACK": 682, "MALIGNANT": 1457}
    assert report.by_label == {"0": 2111, "1": 1457}
    assert report.patients_in_both_source_splits == 31
    json.dumps(report.to_dict())
    assert list(manifest["image_path"].unique()) == [""]


def test_bad_rows_are_reported_with_file_row_and_field(tmp_path):
    rows = [
        case_row("P_00001"),
        case_row("P_00002", side="MIDDLE"),
        case_row("", n=10),
        case_row("P_00004", pathology="UNSURE", n=20),
    ]
    write_csv(tmp_path, rows)
    frame, invalid = parse_cbis_csvs(tmp_path)
    assert list(frame["patient_id"]) == ["P_00001"]
    assert [(i["source_row"], i["field"]) for i in invalid] == [(2, "side"), (3, "patient_id"), (4, "pathology")]
    assert all(i["source_file"] == MASS_TRAIN for i in invalid)
    assert invalid[0]["value"] == "MIDDLE" and "MIDDLE" in invalid[0]["reason"]
    with pytest.raises(CbisCsvError, match=rf"{MASS_TRAIN}: row 2: field 'side'"):
        read_cbis_csvs(tmp_path)
    _, report = index_dataset(csv_dir=tmp_path)
    assert report.rows == 1 and len(report.invalid) == 3
    with pytest.raises(CbisCsvError, match="none of the CBIS-DDSM CSVs"):
        read_cbis_csvs(tmp_path / "empty")


# ---------------------------------------------------------------------------- CSV layout


def _place(
    root: Path, row: dict, *, crop_name=None, mask_name=None, mask_dir=None, img=None, mask_array=None, crop_array=None
) -> None:
    """Write the image, crop and mask of ``row`` under root (optionally renamed/moved)."""
    write_dcm(root / row["image file path"], image(1) if img is None else img)
    crop_rel = Path(row["cropped image file path"].strip())
    mask_rel = Path(row["ROI mask file path"].strip())
    write_dcm(
        root / crop_rel.parent / (crop_name or crop_rel.name), image(2, CROP) if crop_array is None else crop_array
    )
    write_dcm(
        root / (mask_dir or mask_rel.parent) / (mask_name or mask_rel.name),
        mask() if mask_array is None else mask_array,
    )


@pytest.fixture()
def csv_tree(tmp_path):
    root = tmp_path / "root"
    rows = {}
    rows["exact"] = case_row("P_00001", n=100)
    _place(root, rows["exact"])
    rows["swapped"] = case_row("P_00002", n=200)  # disk: 000000 is the mask, 000001 the crop
    _place(root, rows["swapped"], crop_name="000001.dcm", mask_name="000000.dcm")
    rows["other_series"] = case_row("P_00003", side="RIGHT", view="MLO", n=300)
    other = f"Mass-Training_P_00003_RIGHT_MLO_1/{uid(390)}/{uid(391)}"
    rows["other_series"]["ROI mask file path"] = f"{other}/000000.dcm\n"
    _place(root, rows["other_series"])
    for name in ("shared_1", "shared_2"):  # two abnormalities on one image
        abn = int(name[-1])
        rows[name] = case_row("P_00004", view="MLO", abn=abn, n=400)
        rows[name]["cropped image file path"] = rows[name]["cropped image file path"].replace("_1/", f"_{abn}/")
        crop = rows[name]["cropped image file path"]
        rows[name]["cropped image file path"] = crop.replace(uid(402), uid(402 + 10 * abn))
        rows[name]["ROI mask file path"] = rows[name]["cropped image file path"][:-10] + "000001.dcm\n"
        _place(root, rows[name], mask_array=mask((5 * abn, 5 * abn, 5 * abn + 4, 5 * abn + 6)))
    rows["new_uids"] = case_row("P_00005", side="RIGHT", n=500)  # download has other UID folders
    moved = {
        k: v.replace(uid(500), uid(550)).replace(uid(502), uid(552)).replace(uid(503), uid(553))
        for k, v in rows["new_uids"].items()
    }
    _place(root, moved)
    rows["by_pixels"] = case_row("P_00008", n=800)  # the crop is image-sized: only pixels tell
    _place(root, rows["by_pixels"], crop_array=image(8))
    rows["twins"] = case_row("P_00009", n=900)  # both binary and image-sized
    _place(root, rows["twins"], crop_array=mask((1, 1, 5, 5)))
    rows["odd_mask"] = case_row("P_00011", n=1100)  # mask binary but not image-sized (seen in CBIS-DDSM)
    _place(root, rows["odd_mask"], mask_array=mask(shape=(60, 40)))
    rows["no_image"] = case_row("P_00006", n=600)
    rows["no_roi"] = case_row("P_00010", n=1000)
    write_dcm(root / rows["no_roi"]["image file path"], image(10))
    rows["garbage"] = case_row("P_00007", n=700)
    (root / rows["garbage"]["image file path"]).parent.mkdir(parents=True)
    (root / rows["garbage"]["image file path"]).write_text("not a DICOM file\n")
    write_csv(tmp_path / "csv", list(rows.values()))
    return root, tmp_path / "csv", rows


def test_processes_resolve_every_quirk_as_one_process_does(csv_tree, monkeypatch):
    root, csv_dir, _ = csv_tree
    serial, serial_report = index_dataset(root=root, csv_dir=csv_dir, workers=1)
    monkeypatch.setattr(cbis_ddsm, "ROWS_PER_WORKER", 1)  # two processes ...
    monkeypatch.setattr(cbis_ddsm, "ROWS_PER_CHUNK", 3)  # ... on runs of three rows
    parallel, parallel_report = index_dataset(root=root, csv_dir=csv_dir, workers=2)
    pd.testing.assert_frame_equal(parallel, serial)
    assert parallel_report == serial_report
    assert serial_report.unreadable and serial_report.warnings and serial_report.unresolved  # the quirks are there


def test_csv_layout_resolves_every_quirk(csv_tree):
    root, csv_dir, rows = csv_tree
    manifest, report = index_dataset(root=root, csv_dir=csv_dir)
    by_patient = {r.lesion_id: r for r in manifest.itertuples()}

    def get(name):
        row = rows[name]
        return by_patient[
            f"{row['patient_id']}_{row['left or right breast']}_{row['image view']}_MASS_{row['abnormality id']}"
        ]

    exact = get("exact")
    assert exact.resolved and exact.unresolved_reason == ""
    assert exact.image_path == str(root / rows["exact"]["image file path"])
    assert exact.roi_mask_path == str(root / rows["exact"]["ROI mask file path"].strip())
    assert exact.crop_path == str(root / rows["exact"]["cropped image file path"])
    assert (exact.bbox_x0, exact.bbox_y0, exact.bbox_x1, exact.bbox_y1) == BOX
    assert (exact.seed_x, exact.seed_y) == (16.0, 25.0)
    swapped = get("swapped")
    assert swapped.resolved and swapped.roi_mask_path.endswith("/000000.dcm")
    assert swapped.crop_path.endswith("/000001.dcm") and swapped.bbox_x1 == BOX[2]
    other = get("other_series")
    assert other.resolved and uid(390) in other.roi_mask_path and uid(302) in other.crop_path
    s1, s2 = get("shared_1"), get("shared_2")
    assert s1.resolved and s2.resolved and s1.image_path == s2.image_path
    assert s1.roi_mask_path != s2.roi_mask_path
    assert (s1.bbox_x0, s1.bbox_y1, s2.bbox_x0, s2.bbox_y1) == (5, 11, 10, 16)
    new = get("new_uids")
    assert new.resolved and uid(550) in new.image_path and new.roi_mask_path.endswith("000001.dcm")
    assert uid(552) in new.crop_path
    pixels = get("by_pixels")
    assert pixels.resolved and pixels.roi_mask_path.endswith("000001.dcm") and pixels.bbox_y0 == BOX[1]
    assert get("twins").unresolved_reason.startswith("mask and crop indistinguishable")
    odd = get("odd_mask")
    assert odd.resolved and odd.roi_mask_path.endswith("000001.dcm") and np.isnan(odd.bbox_x0)
    assert odd.mask_dropped and not odd.mask_resampled  # 60x40 has another aspect ratio than 64x48
    assert report.warnings == [
        {
            "lesion_id": odd.lesion_id,
            "path": odd.roi_mask_path,
            "reason": "ROI mask 60x40 has another aspect ratio than its image 64x48: cannot be placed, dropped",
        }
    ]
    assert report.quirks["dropped_masks"] == 1 and report.quirks["resampled_masks"] == 0
    assert get("no_image").unresolved_reason == f"image folder not found: Mass-Training_P_00006_LEFT_CC under {root}"
    assert get("no_roi").unresolved_reason == (f"ROI folder not found: Mass-Training_P_00010_LEFT_CC_1 under {root}")
    assert get("garbage").unresolved_reason.startswith("image unreadable: ")
    assert [u["path"] for u in report.unreadable] == [str(root / rows["garbage"]["image file path"])]
    assert "not a DICOM" in report.unreadable[0]["reason"]
    assert report.rows == len(rows) and report.resolved == len(rows) - 4
    assert {u["lesion_id"] for u in report.unresolved} == {
        get(n).lesion_id for n in ("twins", "no_image", "no_roi", "garbage")
    }
    assert all(u["source_file"] == MASS_TRAIN and u["source_row"] >= 1 for u in report.unresolved)
    json.dumps(report.to_dict())


def test_without_boxes_masks_are_still_told_apart_by_size(csv_tree):
    root, csv_dir, rows = csv_tree
    frame, problems = resolve_paths(read_cbis_csvs(csv_dir), root, with_boxes=False)
    swapped = frame[frame.patient_id == "P_00002"].iloc[0]
    assert swapped.resolved and swapped.roi_mask_path.endswith("/000000.dcm")
    assert "bbox_x0" not in frame or frame["bbox_x0"].isna().all()
    assert problems.unreadable[0]["path"].endswith("000000.dcm")


def test_index_finds_csvs_in_root(csv_tree, tmp_path):
    root, csv_dir, rows = csv_tree
    for name in csv_dir.iterdir():
        (root / name.name).write_bytes(name.read_bytes())
    manifest, report = index_dataset(root=root)
    assert report.rows == len(rows) and report.resolved == len(rows) - 4
    with pytest.raises(CbisCsvError, match="no CBIS-DDSM CSVs"):
        index_dataset(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        index_dataset(root=tmp_path / "nowhere", csv_dir=csv_dir)


# ---------------------------------------------------------------------------- TCIA layout


def _tcia(base: Path, row: dict, roi_files: dict[str, np.ndarray], *, prefix="1.000000", decoy=False) -> None:
    """Lay ``row`` out as a TCIA download: roi_files maps 'series name/file' → array."""
    img_parts = row["image file path"].split("/")
    crop_parts = row["cropped image file path"].split("/")
    folder = base / img_parts[0] / f"07-20-2016-DDSM-NA-{img_parts[1][-5:]}"
    write_dcm(folder / f"{prefix}-full mammogram images-{img_parts[2][-5:]}" / "1-1.dcm", image(3))
    if decoy:  # a second, non-matching series in the same case folder
        write_dcm(folder / f"{prefix}-full mammogram images-99999" / "1-1.dcm", image(4, (40, 40)))
    roi = base / crop_parts[0] / f"08-07-2016-DDSM-{crop_parts[1][-5:]}"
    for name, array in roi_files.items():
        write_dcm(roi / name.format(s=crop_parts[2][-5:]), array)


@pytest.mark.parametrize("point_at", ["root", "CBIS-DDSM"])
def test_tcia_layout_tells_mask_from_crop_by_content(tmp_path, point_at):
    base = tmp_path / "download" / "CBIS-DDSM"
    rows = [case_row("P_00001", n=100), case_row("P_00002", n=200), case_row("P_00003", n=300)]
    _tcia(
        base,
        rows[0],
        {"1.000000-ROI mask images-{s}/1-1.dcm": mask(), "1.000000-ROI mask images-{s}/1-2.dcm": image(5, CROP)},
        decoy=True,
    )
    _tcia(
        base,
        rows[1],
        {"1.000000-ROI mask images-{s}/1-1.dcm": image(6, CROP), "1.000000-ROI mask images-{s}/1-2.dcm": mask()},
    )
    _tcia(
        base,
        rows[2],
        {"2.000000-cropped images-{s}/1-1.dcm": image(7, CROP), "3.000000-ROI mask images-11111/1-1.dcm": mask()},
        prefix="2.000000",
    )
    write_csv(tmp_path / "csv", rows)
    root = base.parent if point_at == "root" else base
    manifest, report = index_dataset(root=root, csv_dir=tmp_path / "csv")
    assert report.resolved == 3 and report.unresolved == [] and report.unreadable == []
    first, second, third = manifest.itertuples()
    assert first.image_path.endswith(f"full mammogram images-{uid(101)[-5:]}/1-1.dcm")
    assert first.roi_mask_path.endswith("ROI mask images-" + uid(103)[-5:] + "/1-1.dcm")
    assert first.crop_path.endswith("/1-2.dcm")
    assert second.roi_mask_path.endswith("/1-2.dcm") and second.crop_path.endswith("/1-1.dcm")
    assert "3.000000-ROI mask images-11111" in third.roi_mask_path and "cropped images" in third.crop_path
    assert all((r.bbox_x0, r.bbox_y0, r.bbox_x1, r.bbox_y1) == BOX for r in manifest.itertuples())
    assert all(Path(p).is_absolute() for p in manifest["image_path"])


def test_tcia_empty_case_folder_is_reported(tmp_path):
    base = tmp_path / "CBIS-DDSM"
    row = case_row("P_00001", n=100)
    (base / "Mass-Training_P_00001_LEFT_CC" / "07-20-2016-DDSM-NA-00101").mkdir(parents=True)
    write_csv(tmp_path / "csv", [row])
    manifest, report = index_dataset(root=tmp_path, csv_dir=tmp_path / "csv")
    assert report.unresolved[0]["reason"] == f"no DICOM in image folder: {base / 'Mass-Training_P_00001_LEFT_CC'}"
    assert report.unresolved[0]["source_row"] == 1
    assert report.unresolved_by_reason == {"no DICOM in image folder": 1}
