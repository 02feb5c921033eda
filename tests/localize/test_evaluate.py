"""Paper 003's split evaluation on a hand-made manifest: every mass row is one ROI, films are scanned once.

Five tiny films (96 x 64 DICOMs) and a stand-in localizer whose map is the image's brightness
on a dense map's grid (8-px cells, the first 4 px in from the border), so every count is known:

    A  three mass lesions: two touching masks (one stored at half size, resampled) and a 3 x 3 px
       box in the border no cell reaches
    B  a shared film: a MASS row and a CALCIFICATION row with different files of the same pixels;
       the breast is on the right, so the film is read mirrored
    C  calcification only: the negative
    D  a shared film whose Mass copy is missing: read through its Calc copy, still a mass image
    E  a mass row with neither mask, box nor seed point: counted, as missed
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_ray.constants import Side, View
from mammo_ray.data.synthetic.dicom_write import SERIES_FULL, SERIES_MASK, DicomInfo, write_mammogram, write_mask
from mammo_ray.localize.evaluate import ScannedImage, evaluate_split, scan_split, split_images, two_stage
from mammo_ray.localize.fcn import DenseMap
from mammo_ray.localize.froc import froc
from mammo_ray.localize.whole_image import Localization, WindowGeometry

SHAPE = (96, 64)
WINDOW, STRIDE = 16, 8  # the map: 11 x 7 cells of 8 px, offset 4 px
TISSUE, LESION = 1000, 4000


def _info(patient: str, series: str, n: int) -> DicomInfo:
    return DicomInfo(patient, Side.LEFT, View.CC, "1.2.3", f"1.2.3.{n}", f"1.2.3.{n}.1", series, "20200101", 0.1)


def _box(mask_shape, rows, cols) -> np.ndarray:
    mask = np.zeros(mask_shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def _film(breast_right: bool = False, bright=()) -> np.ndarray:
    image = np.zeros(SHAPE, dtype=np.uint16)
    image[:, 24:] = TISSUE if breast_right else 0
    image[:, :40] = 0 if breast_right else TISSUE
    for rows, cols in bright:
        image[rows, cols] = LESION
    return image


def _row(image_id, patient, kind, lesion, image_path, *, mask="", box=None, resolved=True):
    x0, y0, x1, y1 = box if box else (np.nan,) * 4
    return {
        "image_id": image_id,
        "patient_id": patient,
        "side": "LEFT",
        "view": "CC",
        "abnormality_type": kind,
        "lesion_id": lesion,
        "image_path": str(image_path),
        "roi_mask_path": str(mask),
        "resolved": resolved,
        "bbox_x0": x0,
        "bbox_y0": y0,
        "bbox_x1": x1,
        "bbox_y1": y1,
        "seed_x": np.nan,
        "seed_y": np.nan,
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    d = tmp_path_factory.mktemp("films")
    n = iter(range(1000))

    def image(name, pixels, patient):
        return write_mammogram(d / name, pixels, _info(patient, SERIES_FULL, next(n)))

    def mask(name, pixels, patient):
        return write_mask(d / name, pixels, _info(patient, SERIES_MASK, next(n)))

    a = image("a.dcm", _film(bright=[(slice(20, 30), slice(20, 30))]), "P_A")
    a1 = mask("a1.dcm", _box(SHAPE, slice(20, 30), slice(20, 30)), "P_A")
    a2 = mask("a2_half.dcm", _box((48, 32), slice(10, 15), slice(15, 20)), "P_A")  # x 30-40, y 20-30 at full size
    film_b = _film(breast_right=True, bright=[(slice(60, 70), slice(44, 54))])
    b_mass, b_calc = image("b_mass.dcm", film_b, "P_B"), image("b_calc.dcm", film_b, "P_B")
    b1 = mask("b1.dcm", _box(SHAPE, slice(60, 70), slice(44, 54)), "P_B")  # stored (not mirrored) orientation
    c = image("c.dcm", _film(), "P_C")
    d_calc = image("d_calc.dcm", _film(bright=[(slice(70, 80), slice(10, 20))]), "P_D")
    e = image("e.dcm", _film(), "P_E")
    rows = [
        _row("P_A_LEFT_CC", "P_A", "MASS", "A1", a, mask=a1),
        _row("P_A_LEFT_CC", "P_A", "MASS", "A2", a, mask=a2),
        _row("P_A_LEFT_CC", "P_A", "MASS", "A3", a, box=(0, 40, 3, 43)),
        _row("P_B_LEFT_CC", "P_B", "MASS", "B1", b_mass, mask=b1),
        _row("P_B_LEFT_CC", "P_B", "CALCIFICATION", "B2", b_calc, box=(50, 10, 52, 12)),
        _row("", "P_C", "CALCIFICATION", "C1", c, box=(5, 5, 9, 9)),  # image_id derived from patient/side/view
        _row("P_D_LEFT_CC", "P_D", "MASS", "D1", d / "d_mass_missing.dcm", box=(10, 70, 20, 80), resolved=False),
        _row("P_D_LEFT_CC", "P_D", "CALCIFICATION", "D2", d_calc, box=(30, 30, 32, 32)),
        _row("P_E_LEFT_CC", "P_E", "MASS", "E1", e),
        _row("P_F_LEFT_CC", "P_F", "MASS", "F1", d / "f_missing.dcm", box=(1, 1, 5, 5), resolved=False),
    ]
    return pd.DataFrame(rows)


def brightness_localizer(image: np.ndarray, flipped: bool) -> Localization:
    """A dense map of 16-px windows at stride 8: each cell is the lesion brightness of its 8 x 8 centre."""
    rows, cols = (SHAPE[0] - WINDOW) // STRIDE + 1, (SHAPE[1] - WINDOW) // STRIDE + 1
    probs = np.zeros((rows, cols), dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            cell = image[4 + i * STRIDE : 12 + i * STRIDE, 4 + j * STRIDE : 12 + j * STRIDE]
            probs[i, j] = np.clip((cell.max() - TISSUE) / (LESION - TISSUE), 0, 1)
    dense = DenseMap(probs, STRIDE, WINDOW, SHAPE)
    return Localization(dense, np.zeros_like(probs), WindowGeometry(1.0, WINDOW, WINDOW), SHAPE, flipped, 0.5)


@pytest.fixture(scope="module")
def scan(manifest):
    rows = split_images(manifest, pd.Series("test", index=manifest.index), "test")
    return scan_split(rows, brightness_localizer, progress=False)


def test_every_mass_row_of_the_split_is_one_roi(manifest, scan):
    readable = scan.images
    by_film = {s.image_id: s for s in readable}
    assert sorted(by_film) == ["P_A_LEFT_CC", "P_B_LEFT_CC", "P_C_LEFT_CC", "P_D_LEFT_CC", "P_E_LEFT_CC"]
    assert {k: s.n_masses for k, s in by_film.items()} == {
        "P_A_LEFT_CC": 3,
        "P_B_LEFT_CC": 1,
        "P_C_LEFT_CC": 0,
        "P_D_LEFT_CC": 1,
        "P_E_LEFT_CC": 1,
    }
    mass_rows_of_scanned = int(((manifest["abnormality_type"] == "MASS") & (manifest["patient_id"] != "P_F")).sum())
    assert sum(s.n_masses for s in readable) == mass_rows_of_scanned == 6
    # P_F's only file is missing: reported with its ROI, which leaves the evaluation counted
    assert scan.roi_counts == {"mass_rows": 7, "evaluated": 6, "in_unreadable_images": 1, "duplicate_rows": 0}
    assert [(s["image_id"], s["n_masses"]) for s in scan.skipped] == [("P_F_LEFT_CC", 1)]
    assert "f_missing.dcm" in scan.skipped[0]["reason"]
    a = by_film["P_A_LEFT_CC"]
    assert a.lesion_ids == ("A1", "A2", "A3") and [int(layer.sum()) for layer in a.rois] == [4, 4, 1]
    assert np.argwhere(a.rois[2]).tolist() == [[4, 0]]  # the 3 x 3 px border box: the cell nearest it
    placed = {p["lesion_id"]: p["placed_by"] for p in scan.placed}
    assert placed == {"A1": "mask", "A2": "mask_resampled", "A3": "bbox", "B1": "mask", "D1": "bbox", "E1": None}
    result = froc([s.prob_map for s in readable], [s.rois for s in readable], [0.5])
    assert result.n_rois == 6
    # found: A1, A2 (shares a cell column with A1), B1 (mirrored mask on the mirrored film), D1;
    # missed: the dark border box A3 and E1, which nothing places
    assert result.sensitivity.tolist() == [pytest.approx(4 / 6)]
    union_rois = sum(int(froc([s.prob_map], [s.mask]).n_rois) for s in readable)
    assert union_rois == 4  # the old union mask: A's three lesions became two ROIs, E's vanished


def test_a_shared_film_is_scanned_once_and_is_never_a_negative(scan):
    by_film = {s.image_id: s for s in scan.images}
    assert scan.n_films == 6 and scan.shared_films == 2  # B (both copies) and D (Calc copy only readable)
    b, d = by_film["P_B_LEFT_CC"], by_film["P_D_LEFT_CC"]
    assert b.image_path.endswith("b_mass.dcm") and b.n_masses == 1 and b.rois[0].any()
    assert d.image_path.endswith("d_calc.dcm") and d.n_masses == 1  # the Mass copy is missing
    assert by_film["P_C_LEFT_CC"].n_masses == 0  # the only negative
    assert [s.image_id for s in scan.images if s.n_masses == 0] == ["P_C_LEFT_CC"]


def test_unreadable_films_are_counted_with_their_rois(manifest, tmp_path):
    broken = manifest.copy()
    broken.loc[broken["lesion_id"] == "E1", "image_path"] = str(tmp_path / "gone.dcm")
    rows = split_images(broken, pd.Series("test", index=broken.index), "test")
    scan = scan_split(rows, brightness_localizer, progress=False)
    assert scan.roi_counts == {"mass_rows": 7, "evaluated": 5, "in_unreadable_images": 2, "duplicate_rows": 0}
    assert scan.skipped[0]["image_id"] == "P_E_LEFT_CC" and "gone.dcm" in scan.skipped[0]["reason"]
    doubled = pd.concat([manifest, manifest[manifest["lesion_id"] == "B1"]], ignore_index=True)
    rows = split_images(doubled, pd.Series("test", index=doubled.index), "test")
    again = scan_split(rows, brightness_localizer, progress=False)
    assert again.roi_counts == {"mass_rows": 8, "evaluated": 6, "in_unreadable_images": 1, "duplicate_rows": 1}


def test_evaluate_split_reports_the_roi_accounting(scan, tmp_path):
    summary = evaluate_split(scan, tmp_path / "froc", image_threshold=0.5, box_threshold=0.5)
    assert summary["n_images"] == 5 and summary["n_rois"] == 6 and summary["shared_films"] == 2
    assert summary["n_films"] == 6 and summary["skipped"][0]["image_id"] == "P_F_LEFT_CC"
    assert summary["rois"]["counts"]["evaluated"] == 6
    assert summary["rois"]["placed_by"] == {"mask": 2, "mask_resampled": 1, "bbox": 2, "None": 1}
    unplaced = [n for n in summary["rois"]["not_by_own_mask"] if n["placed_by"] is None]
    assert [n["lesion_id"] for n in unplaced] == ["E1"] and "no bbox" in unplaced[0]["reason"]
    two = summary["two_stage"]
    assert two["n_rois"] == 6 and two["sensitivity"] == pytest.approx(4 / 6)
    assert two["stage1_sensitivity"] == pytest.approx(3 / 4)  # E's map is dark: stage 1 misses it
    saved = json.loads((tmp_path / "froc" / "froc.json").read_text())
    assert saved["n_rois"] == 6
    per_image = pd.read_csv(tmp_path / "froc" / "per_image.csv")
    assert per_image["n_masses"].tolist() == [3, 1, 0, 1, 1] and per_image["image_id"].is_unique


def _two_stage_case() -> list[ScannedImage]:
    """Four 8 x 8 maps whose two-stage figures are worked out by hand (box and image thresholds 0.5).

    A  two masses, stage 1 calls it (0.8). ROI 1 (rows 1-2, cols 1-2) peaks at 0.9, mean 0.45.
       ROI 2 (rows 5-6, cols 1-2) is 0.2 but for 0.6 at (5, 2), where a blob starts that runs out of
       the ROI to its peak 0.8 at (5, 4). A blob of 0.7 at rows 1-2, cols 5-6 touches no ROI.
    B  one mass (0.9) that stage 1 misses (0.2); a blob of 0.9 elsewhere: neither counts.
    C  no mass, called (0.7): a blob of 0.8, one false positive.
    D  no mass, not called (0.1): a blob of 0.9 that does not count.
    """

    def layer(rows: slice, cols: slice) -> np.ndarray:
        roi = np.zeros((8, 8), dtype=bool)
        roi[rows, cols] = True
        return roi

    a = np.zeros((8, 8), np.float32)
    a[1:3, 1:3] = 0.3
    a[1, 1] = 0.9
    a[5:7, 1:3] = 0.2
    a[5, 2:5] = (0.6, 0.7, 0.8)
    a[1:3, 5:7] = 0.7
    b = np.zeros((8, 8), np.float32)
    b[3:5, 3:5], b[0, 7] = 0.9, 0.9
    c = np.zeros((8, 8), np.float32)
    c[3:5, 3:5] = 0.8
    d = np.zeros((8, 8), np.float32)
    d[2:4, 2:4] = 0.9
    no_roi = np.zeros((0, 8, 8), dtype=bool)
    cases = [
        ("A", a, np.stack([layer(slice(1, 3), slice(1, 3)), layer(slice(5, 7), slice(1, 3))]), 0.8),
        ("B", b, layer(slice(3, 5), slice(3, 5))[None], 0.2),
        ("C", c, no_roi, 0.7),
        ("D", d, no_roi, 0.1),
    ]
    return [
        ScannedImage(name, f"{name}.dcm", f"P_{name}", prob, rois, tuple(f"{name}{i}" for i in range(len(rois))), score)
        for name, prob, rois, score in cases
    ]


@pytest.mark.parametrize(
    ("reduce", "hit", "sensitivity", "fp_per_image"),
    [
        ("max", "overlap", 2 / 3, 2 / 4),  # A's ROIs both reach 0.5; FPs: A's lone blob and C's
        ("mean", "overlap", 0 / 3, 2 / 4),  # A's ROI means are 0.45 and 0.3; blobs do not depend on reduce
        ("max", "peak", 1 / 3, 3 / 4),  # the blob through ROI 2 peaks outside it: a miss and a false positive
    ],
)
def test_two_stage_figures_of_a_hand_built_case(reduce, hit, sensitivity, fp_per_image):
    result = two_stage(_two_stage_case(), image_threshold=0.5, box_threshold=0.5, reduce=reduce, hit=hit)
    assert result == {
        "image_threshold": 0.5,
        "box_threshold": 0.5,
        "reduce": reduce,
        "hit": hit,
        "stage1_accuracy": 2 / 4,  # calls A, C; masses in A, B
        "stage1_sensitivity": 1 / 2,
        "stage1_specificity": 1 / 2,
        "images_called_positive": 2,
        "n_images": 4,
        "n_rois": 3,  # B's mass counts, missed, though stage 1 never passed B on
        "sensitivity": pytest.approx(sensitivity),
        "fp_per_image": pytest.approx(fp_per_image),  # over all four images
    }
