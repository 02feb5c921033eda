"""Tests for the synthetic CBIS-DDSM generator (mammo_ray.data.synthetic: cbis, phantom, dicom_write)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mammo_ray.data.synthetic import REAL_CBIS_CSVS, cbis
from mammo_ray.data.synthetic.cbis import CALC_COLUMNS, CSV_NAMES, MASS_COLUMNS, SynthSummary, synthesize

REAL_CSV_DIR = REAL_CBIS_CSVS  # the real CSVs
SMALL = (256, 160)


def read_rows(root: Path) -> list[dict[str, str]]:
    """All CSV rows of a dataset, with the file they came from and stripped values."""
    rows = []
    for name in CSV_NAMES.values():
        with open(root / name, newline="") as f:
            for rec in csv.DictReader(f):
                rows.append({"file": name, **{k: v.strip() for k, v in rec.items()}})
    return rows


def digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("synth")
    return root, synthesize(root, patients=20, seed=3, progress=False)


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", patients=4, seed=7, size=SMALL, progress=False)
    synthesize(tmp_path / "b", patients=4, seed=7, size=SMALL, progress=False)
    synthesize(tmp_path / "c", patients=4, seed=8, size=SMALL, progress=False)
    da, db, dc = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(da) == 4 + a.images + 2 * a.abnormalities
    assert da == db
    assert not {k for k in da if k.endswith(".dcm")} & set(dc)  # other UIDs, so other paths
    assert [da[k] != dc[k] for k in CSV_NAMES.values()].count(True) >= 2


def test_any_number_of_processes_writes_the_same_files(tmp_path, monkeypatch):
    one = synthesize(tmp_path / "one", patients=6, seed=7, size=SMALL, progress=False, workers=1)
    monkeypatch.setattr(cbis, "PATIENTS_PER_WORKER", 2)  # 6 patients: 2 processes (3 allowed, 2 asked for) ...
    monkeypatch.setattr(cbis, "PATIENTS_PER_CHUNK", 1)  # ... taking one patient per task, in any order
    two = synthesize(tmp_path / "two", patients=6, seed=7, size=SMALL, progress=False, workers=2)
    assert two == dataclasses.replace(one, out_dir=str(tmp_path / "two"), csv_dir=str(tmp_path / "two"))
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_summary_counts_match_csvs(dataset):
    root, summary = dataset
    rows = read_rows(root)
    assert summary.csv_dir == str(root) and summary.layout == "csv" and summary.size == (832, 512)
    assert summary.patients == 20 == len({r["patient_id"] for r in rows})
    assert summary.abnormalities == len(rows)
    assert summary.images == len({r["image file path"] for r in rows})
    assert summary.by_type == {
        "calcification": sum(r["abnormality type"] == "calcification" for r in rows),
        "mass": sum(r["abnormality type"] == "mass" for r in rows),
    }
    assert sum(summary.by_pathology.values()) == len(rows)
    assert 0.25 <= summary.by_pathology.get("MALIGNANT", 0) / len(rows) <= 0.7
    assert summary.to_dict()["size"] == [832, 512]
    splits = {r["patient_id"]: r["file"] for r in rows}
    assert 2 <= sum("test" in f for f in splits.values()) <= 6  # ~20% Test patients


def test_csv_headers_and_quirks_match_real_files(dataset):
    root, _ = dataset
    for name in CSV_NAMES.values():
        real_header = (REAL_CSV_DIR / name).open(newline="").readline()
        ours = (root / name).read_bytes().decode()
        assert ours.split("\r\n", 1)[0] == real_header.rstrip("\r\n")
        assert tuple(next(csv.reader([real_header]))) == (MASS_COLUMNS if name.startswith("mass") else CALC_COLUMNS)
        recs = list(csv.reader((root / name).open(newline="")))[1:]
        quoted = 13 if name.startswith("mass") else 12  # the column that ends in a newline, as in the real files
        assert recs and all(r[quoted].endswith("\n") and not r[25 - quoted].endswith("\n") for r in recs)
        assert ours.count('"') == 2 * len(recs)
    rows = read_rows(root)
    vocab = {
        "pathology": {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"},
        "assessment": set("012345"),
        "subtlety": set("12345"),
    }
    assert all(r[k] in v for r in rows for k, v in vocab.items())
    crop_names = {r["cropped image file path"].rsplit("/", 1)[1] for r in rows}
    assert crop_names == {"000000.dcm", "000001.dcm"}  # names do not tell crop from mask
    other_series = [
        r for r in rows if r["cropped image file path"].split("/")[2] != r["ROI mask file path"].split("/")[2]
    ]
    assert other_series and all(r["ROI mask file path"].endswith("000000.dcm") for r in other_series)
    for r in rows:
        case = re.escape(r["file"].startswith("mass") and "Mass-" or "Calc-")
        folder = f"{r['patient_id']}_{r['left or right breast']}_{r['image view']}"
        uid = r"1\.3\.6\.1\.4\.1\.9590\.100\.1\.2\.\d+"
        assert re.fullmatch(rf"{case}(Training|Test)_{folder}/{uid}/{uid}/000000\.dcm", r["image file path"])
        for col in ("cropped image file path", "ROI mask file path"):
            assert r[col].split("/")[0] == f"{r['image file path'].split('/')[0]}_{r['abnormality id']}"
            assert all(len(uid) <= 64 for uid in r[col].split("/")[1:3])


def test_dicom_tags_masks_and_crops(dataset):
    root, _ = dataset
    uids, seen = set(), set()
    for r in read_rows(root):
        full = pydicom.dcmread(root / r["image file path"])
        crop = pydicom.dcmread(root / r["cropped image file path"])
        mask = pydicom.dcmread(root / r["ROI mask file path"])
        named = ((full, r["image file path"]), (crop, r["cropped image file path"]), (mask, r["ROI mask file path"]))
        for ds, path in named:
            assert (root / path).read_bytes()[128:132] == b"DICM"
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2" and ds.Modality == "MG"
            assert ds.ImageLaterality == ds.Laterality == r["left or right breast"][0]
            assert ds.ViewPosition == r["image view"] and ds.PatientID == r["patient_id"]
            assert [ds.StudyInstanceUID, ds.SeriesInstanceUID] == path.split("/")[1:3]
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            if path not in seen:
                assert ds.SOPInstanceUID not in uids
                uids.add(ds.SOPInstanceUID)
                seen.add(path)
        assert full.BitsAllocated == full.BitsStored == 16 and full.pixel_array.dtype == np.uint16
        assert full.SeriesDescription == "full mammogram images"
        assert abs(float(full.PixelSpacing[0]) - 250 / 832) < 1e-4
        m = mask.pixel_array
        assert m.shape == full.pixel_array.shape and set(np.unique(m)) == {0, 255}
        ys, xs = np.nonzero(m)
        assert crop.pixel_array.shape == (np.ptp(ys) + 1, np.ptp(xs) + 1)
        assert np.array_equal(crop.pixel_array, full.pixel_array[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def test_breast_side_and_pectoral_muscle(dataset):
    root, _ = dataset
    for r in {r["image file path"]: r for r in read_rows(root)}.values():
        a = pydicom.dcmread(root / r["image file path"]).pixel_array.astype(float)
        h, w = a.shape
        left, right = a[:, : w // 2].mean(), a[:, w // 2 :].mean()
        assert (left > 2 * right) if r["left or right breast"] == "LEFT" else (right > 2 * left)
        assert np.median(a[:, :5] if r["left or right breast"] == "RIGHT" else a[:, -5:]) < 500  # background near 0
        if r["image view"] == "MLO":  # pectoral muscle: brightest tissue, in the chest-wall top corner
            corner = a[: h // 10, : w // 12] if r["left or right breast"] == "LEFT" else a[: h // 10, -(w // 12) :]
            assert corner.mean() > 1.1 * a[a > 2000].mean()


def test_breast_density_sets_brightness(dataset):
    from scipy.stats import spearmanr

    root, _ = dataset
    density, level = [], []
    for r in {r["image file path"]: r for r in read_rows(root)}.values():
        a = pydicom.dcmread(root / r["image file path"]).pixel_array
        density.append(int(r.get("breast_density") or r["breast density"]))
        level.append(np.median(a[a > 4000]))
    assert len(set(density)) >= 3
    assert spearmanr(density, level).statistic > 0.6


def test_lesions_in_both_views_and_patient_mix(dataset):
    root, _ = dataset
    rows = read_rows(root)
    views = defaultdict(set)
    for r in rows:
        views[(r["file"][:4], r["patient_id"], r["left or right breast"], r["abnormality id"])].add(r["image view"])
    assert views and all(v == {"CC", "MLO"} for v in views.values())
    per_image = defaultdict(list)
    for r in rows:
        per_image[r["image file path"]].append(r)
    assert any(len(v) == 2 for v in per_image.values())  # two lesions share a full image
    sides = defaultdict(set)
    for r in rows:
        sides[r["patient_id"]].add(r["left or right breast"])
    assert any(len(s) == 2 for s in sides.values())
    # the same lesion is drawn in CC and MLO: its two masks have similar area
    for key in [k for k in views if k[0] == "mass"][:4]:
        pair = [
            r for r in rows if (r["file"][:4], r["patient_id"], r["left or right breast"], r["abnormality id"]) == key
        ]
        areas = [np.count_nonzero(pydicom.dcmread(root / r["ROI mask file path"]).pixel_array) for r in pair]
        assert 0.6 < areas[0] / areas[1] < 1.6


def tcia_series(root: Path, csv_path: str, description: str) -> list[Path]:
    """TCIA-layout series folders that can hold the file a CSV path names (UIDs share their last 5 digits)."""
    folder, study, series, _ = csv_path.split("/")
    return list((root / "CBIS-DDSM" / folder).glob(f"*-DDSM-*{study[-5:]}/1.000000-{description}-{series[-5:]}"))


def test_tcia_layout_names_and_contents(tmp_path):
    synthesize(tmp_path / "csv", patients=10, seed=5, size=SMALL, progress=False)
    synthesize(tmp_path / "tcia", patients=10, seed=5, size=SMALL, layout="tcia", progress=False)
    for name in CSV_NAMES.values():
        assert (tmp_path / "csv" / name).read_bytes() == (tmp_path / "tcia" / name).read_bytes()
    root, shapes = tmp_path / "tcia", Counter()
    for r in read_rows(root):
        [full] = tcia_series(root, r["image file path"], "full mammogram images")
        assert re.fullmatch(r"\d\d-\d\d-\d{4}-DDSM-(NA-)?\d{5}", full.parent.name)
        assert [p.name for p in full.iterdir()] == ["1-1.dcm"]
        assert pydicom.dcmread(full / "1-1.dcm").SeriesInstanceUID == r["image file path"].split("/")[2]
        crop, mask = r["cropped image file path"], r["ROI mask file path"]
        if crop.rsplit("/", 1)[0] == mask.rsplit("/", 1)[0]:  # one series holds both, in either order
            [roi] = tcia_series(root, mask, "ROI mask images")
            files = sorted(roi.iterdir())
            assert [p.name for p in files] == ["1-1.dcm", "1-2.dcm"]
            binary = [set(np.unique(pydicom.dcmread(p).pixel_array)) <= {0, 255} for p in files]
            assert binary == [mask.endswith("000000.dcm"), mask.endswith("000001.dcm")]  # content tells them apart
            shapes[files[0].name if binary[0] else files[1].name] += 1
        else:
            [crop_dir] = tcia_series(root, crop, "cropped images")
            [mask_dir] = tcia_series(root, mask, "ROI mask images")
            assert [p.name for p in crop_dir.iterdir()] == [p.name for p in mask_dir.iterdir()] == ["1-1.dcm"]
            shapes["separate"] += 1
    assert set(shapes) == {"1-1.dcm", "1-2.dcm", "separate"}  # masks as 1-1, as 1-2, and in a series of their own
    assert not (tmp_path / "tcia" / "Mass-Training").exists() and not list(root.glob("*_P_*"))


def test_from_csv_reproduces_real_rows(tmp_path):
    summary = synthesize(tmp_path, patients=3, seed=0, size=SMALL, from_csv=REAL_CSV_DIR, progress=False)
    real = {}
    for name in CSV_NAMES.values():
        with open(REAL_CSV_DIR / name, newline="") as f:
            real[name] = list(csv.reader(f))
    keep = sorted({r[0] for rows in real.values() for r in rows[1:]})[:3]
    assert summary.patients == 3
    n = 0
    for name, rows in real.items():
        ours = list(csv.reader((tmp_path / name).open(newline="")))
        assert ours == [rows[0]] + [r for r in rows[1:] if r[0] in keep]
        n += len(ours) - 1
        for r in ours[1:]:
            for path in (r[11], r[12], r[13]):
                ds = pydicom.dcmread(tmp_path / path.strip())
                assert ds.PatientID == r[0] and ds.SeriesInstanceUID == path.strip().split("/")[2]
    assert n == summary.abnormalities > 0
    for name in CSV_NAMES.values():  # the real files are sorted by patient: ours are their first lines, byte for byte
        assert (REAL_CSV_DIR / name).read_bytes().startswith((tmp_path / name).read_bytes())


def texture_features(crop: np.ndarray, mask: np.ndarray) -> list[float]:
    """GLCM contrast/homogeneity, edge gradient energy, interior std, compactness of one crop."""
    from scipy import ndimage
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import perimeter

    z = (crop - crop.mean()) / (crop.std() + 1e-9)
    q = np.clip((z + 3) / 6 * 31, 0, 31).astype(np.uint8)
    glcm = graycomatrix(q, [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
    grad2 = ndimage.sobel(z, 0) ** 2 + ndimage.sobel(z, 1) ** 2
    band = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_erosion(mask, iterations=2)
    inner = ndimage.binary_erosion(mask, iterations=2)
    return [
        np.log(graycoprops(glcm, "contrast").mean()),
        graycoprops(glcm, "homogeneity").mean(),
        np.log(grad2[band].mean() / grad2.mean()),  # margin sharpness: edge energy relative to the crop's
        z[inner if inner.any() else mask].std(),
        np.log(perimeter(mask) ** 2 / (4 * np.pi * mask.sum())),
    ]


def texture_auc(root: Path) -> tuple[float, int, list[float]]:
    """Cross-validated AUC (grouped by patient) of a logistic regression on mass crops."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, labels, groups = [], [], []
    for r in read_rows(root):
        if r["abnormality type"] != "mass":
            continue
        crop = pydicom.dcmread(root / r["cropped image file path"]).pixel_array.astype(float)
        full_mask = pydicom.dcmread(root / r["ROI mask file path"]).pixel_array > 0
        ys, xs = np.nonzero(full_mask)
        feats.append(texture_features(crop, full_mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
        labels.append(int(r["pathology"] == "MALIGNANT"))
        groups.append(r["patient_id"])
    x, y = np.asarray(feats), np.asarray(labels)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    prob = cross_val_predict(model, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    single = [round(max(roc_auc_score(y, f), 1 - roc_auc_score(y, f)), 3) for f in x.T]
    return float(roc_auc_score(y, prob)), len(y), single


@pytest.mark.slow
def test_texture_features_separate_pathology_but_not_perfectly(tmp_path):
    # ~85 mass lesions (~160 crops); by hand, seeds 0, 1, 2, 11 gave 0.73-0.87 (shape/margin oracle 0.85-0.95).
    synthesize(tmp_path, patients=120, seed=11, size=(640, 400), progress=False, workers=2)
    auc, n, _ = texture_auc(tmp_path)
    assert n >= 120
    assert 0.65 < auc < 0.99


@pytest.mark.slow
def test_full_size_image(tmp_path):
    summary = synthesize(tmp_path, patients=1, seed=0, size=(5000, 3000), progress=False)
    row = read_rows(tmp_path)[0]
    full = pydicom.dcmread(tmp_path / row["image file path"])
    assert full.pixel_array.shape == (5000, 3000) and summary.images == 2
    assert [float(v) for v in full.PixelSpacing] == [0.05, 0.05]
    mask = pydicom.dcmread(tmp_path / row["ROI mask file path"]).pixel_array
    ys, _ = np.nonzero(mask)
    assert 0.02 * 5000 < np.ptp(ys) < 0.2 * 5000  # a mass of realistic size


def test_replica_keeps_the_real_structure(tmp_path):
    """The first 40 real patients: shared films hold the same pixels, masks of another size, quirk counts."""
    from mammo_ray.data.cbis_ddsm import parse_cbis_csvs
    from mammo_ray.data.dicom import read_dicom
    from mammo_ray.data.index import index_dataset
    from mammo_ray.data.manifest import conform
    from mammo_ray.data.quirks import mark_quirks, quirk_counts

    summary = synthesize(tmp_path, patients=40, seed=0, size=(128, 80), from_csv=REAL_CSV_DIR, progress=False)
    manifest, report = index_dataset(root=tmp_path, csv_dir=tmp_path, progress=False)
    real, _ = parse_cbis_csvs(REAL_CSV_DIR)
    real = mark_quirks(conform(real[real["patient_id"].isin(set(manifest["patient_id"]))].assign(resolved=True)))
    assert report.resolved == report.rows == len(real) == summary.abnormalities
    assert summary.films == real["image_id"].nunique() < summary.images  # some films are stored twice
    quirks, expected = report.quirks, quirk_counts(real)
    for key in ("view_label_conflicts", "shared_films", "multi_roi_images", "official_split_overlap_patients"):
        assert quirks[key] == expected[key], key
    assert quirks["shared_films"] >= 2 and quirks["resampled_masks"] >= 1 and quirks["dropped_masks"] >= 1
    for _, film in manifest[manifest["shared_film"]].groupby("image_id"):
        paths = sorted(set(film["image_path"]))
        assert len(paths) == 2 and {"Mass" in p for p in paths} == {True, False}
        assert np.array_equal(read_dicom(paths[0])[0], read_dicom(paths[1])[0])
    resampled = manifest[manifest["mask_resampled"]].iloc[0]
    mask, _ = read_dicom(resampled["roi_mask_path"], flip=False, apply_voi=False)
    assert mask.shape != (128, 80) and np.isfinite(resampled["bbox_x0"])
    dropped = manifest[manifest["mask_dropped"]]
    assert dropped["bbox_x0"].isna().all()
    assert {w["lesion_id"] for w in report.warnings} >= set(dropped["lesion_id"])
