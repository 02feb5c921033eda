"""The crop cache on real CBIS-DDSM structure, with hand-made films and manifests in tmp_path: a film stored
twice (Mass and Calc folder), several ROIs per film, masks stored at another size, orientation from the
laterality header, and 8-bit sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_ray.baseline.features import FEATURE_NAMES, lesion_features
from mammo_ray.config import DataConfig
from mammo_ray.data.cache import prepare_cache
from mammo_ray.data.crops import crop_padded, mask_bbox, resize
from mammo_ray.data.datasets import CropCache
from mammo_ray.data.manifest import conform
from mammo_ray.data.masks import mask_fit_reason, resample_mask
from mammo_ray.data.roi import roi_crop

H, W = 200, 120  # film size (rows, columns)


def write_dicom(path: Path, pixels: np.ndarray, laterality: str | None = "L") -> str:
    """A minimal MONOCHROME2 mammogram (uint16) or mask / 8-bit film (uint8)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    if laterality:
        ds.ImageLaterality = laterality
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def breast(dtype=np.uint16, tissue: int = 20_000, seed: int = 0) -> np.ndarray:
    """A half-disc breast against the left edge (radius 110 px) with some texture; background 0."""
    yy, xx = np.mgrid[:H, :W]
    inside = (yy - H / 2) ** 2 + xx**2 < 110**2
    noise = np.random.default_rng(seed).integers(0, tissue // 10, (H, W))
    return np.where(inside, tissue + noise, 0).astype(dtype)


def rect(y0: int, y1: int, x0: int, x1: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def save_mask(path: Path, mask: np.ndarray) -> str:
    return write_dicom(path, np.where(mask, 255, 0).astype(np.uint8), laterality=None)


def manifest_row(
    image_path: str,
    mask_path: str,
    kind: str = "MASS",
    abn: int = 1,
    side: str = "LEFT",
    view: str = "CC",
    patient: str = "P_00001",
    label: int = 1,
) -> dict:
    return {
        "lesion_id": f"{patient}_{side}_{view}_{kind}_{abn}",
        "exam_key": f"{patient}_{side}_{kind}_{abn}",
        "patient_id": patient,
        "side": side,
        "view": view,
        "abnormality_id": abn,
        "abnormality_type": kind,
        "pathology": "MALIGNANT" if label else "BENIGN",
        "label": label,
        "source": "cbis-ddsm",
        "source_split": "train",
        "source_file": "x.csv",
        "source_row": abn,
        "resolved": True,
        "image_path": image_path,
        "roi_mask_path": mask_path,
    }


def prepare(tmp_path: Path, rows: list[dict], name: str = "cache", **kw):
    manifest = conform(pd.DataFrame(rows))
    base = dict(
        cache_px=32,
        input_px=32,
        num_workers=1,
        shard_images=4,
        patch_px=32,
        negatives_per_image=0,
        abnormality="all",
        crop="fixed",
        fixed_pad_px=10,
    )
    summary = prepare_cache(
        manifest,
        pd.Series("train", index=manifest.index),
        DataConfig(**{**base, **kw}),
        tmp_path / name,
        progress=False,
    )
    return summary, CropCache(tmp_path / name)


def cropped(mask: np.ndarray, entry: pd.Series, px: int = 32) -> np.ndarray:
    """``mask`` cut by an entry's box the way the cache cuts masks."""
    box = tuple(int(entry[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    return resize(crop_padded(mask, box, fill=0).astype(np.float32), (px, px), nearest=True).astype(np.uint8)


def overlaps(mask: np.ndarray, entry: pd.Series) -> bool:
    box = tuple(int(entry[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    return bool(crop_padded(mask, box, fill=0).any())


# --- 1. a film stored twice ------------------------------------------------------------------


@pytest.fixture
def shared_film(tmp_path):
    """One film written at a Mass and a Calc path (same pixels): a large mass, and a calcification."""
    pixels = breast()
    mass, calc = rect(60, 100, 20, 60), rect(140, 150, 20, 30)
    mass_path = write_dicom(tmp_path / "Mass-Training_P_00001_LEFT_CC" / "1-1.dcm", pixels)
    calc_path = write_dicom(tmp_path / "Calc-Training_P_00001_LEFT_CC" / "1-1.dcm", pixels)
    rows = [
        manifest_row(mass_path, save_mask(tmp_path / "m_mass.dcm", mass), "MASS"),
        manifest_row(calc_path, save_mask(tmp_path / "m_calc.dcm", calc), "CALCIFICATION"),
    ]
    return rows, mass, calc_path


def test_shared_film_is_decoded_once_and_its_negatives_avoid_the_other_folders_lesion(tmp_path, shared_film):
    rows, mass, calc_path = shared_film
    settings = dict(crop="patch", abnormality="calcification", negatives_per_image=25)
    summary, cache = prepare(tmp_path, rows, **settings)
    index = cache.index
    assert summary.images_decoded == 1 and summary.skipped == []
    lesions, negatives = index[index["kind"] == "lesion"], index[index["kind"] == "negative"]
    assert lesions["abnormality_type"].tolist() == ["CALCIFICATION"]  # the mass row only fences negatives
    assert lesions["image_path"].tolist() == [calc_path]  # an entry keeps its own row's path
    assert len(negatives) == 25 and (negatives["image_id"] == "P_00001_LEFT_CC").all()
    assert not any(overlaps(mass, e) for _, e in negatives.iterrows())
    assert not any(cache.mask(int(i)).any() for i in negatives["entry"])  # the stored lesion map: empty
    # Control: had the mass row not travelled with the film (grouping by file), patches would land on it.
    _, alone = prepare(tmp_path, rows[1:], name="calc_only", **settings)
    unfenced = alone.index[alone.index["kind"] == "negative"]
    assert any(overlaps(mass, e) for _, e in unfenced.iterrows())


# --- 2. several ROIs in one film ---------------------------------------------------------------


def test_each_lesion_stores_its_own_mask_not_its_neighbours(tmp_path):
    pixels = breast()
    big, small = rect(70, 100, 20, 50), rect(104, 114, 30, 40)  # 4 px apart: each crop shows the other
    path = write_dicom(tmp_path / "film.dcm", pixels)
    rows = [
        manifest_row(path, save_mask(tmp_path / "m1.dcm", big), abn=1),
        manifest_row(path, save_mask(tmp_path / "m2.dcm", small), abn=2, label=0),
    ]
    summary, cache = prepare(tmp_path, rows)
    index = cache.index.set_index("lesion_id")
    assert summary.images_decoded == 1 and len(index) == 2
    for own, other, lesion_id in ((big, small, "P_00001_LEFT_CC_MASS_1"), (small, big, "P_00001_LEFT_CC_MASS_2")):
        entry = index.loc[lesion_id]
        stored = cache.mask(int(entry["entry"]))
        assert overlaps(other, entry)  # the neighbour is inside this crop ...
        np.testing.assert_array_equal(stored, cropped(own, entry))  # ... but not in its mask
        assert not (stored & cropped(other, entry)).any()
        # the baseline's shape features now measure this lesion: its area share of the crop
        vector = lesion_features(cache.image(int(entry["entry"])), stored)
        assert vector[FEATURE_NAMES.index("shape_area")] == pytest.approx(stored.sum() / stored.size)
    _, whole = prepare(tmp_path, rows, name="whole", crop="whole", whole_size=(100, 60))
    assert whole.mask(0).sum() == pytest.approx((big.sum() + small.sum()) / 4, rel=0.15)  # both, at half size


# --- 3. masks stored at another size ----------------------------------------------------------


def test_masks_of_another_size_are_resampled_or_dropped(tmp_path):
    # A RIGHT film in standard display (breast on the right): the masks follow the film's mirror.
    pixels = np.ascontiguousarray(breast()[:, ::-1])
    lesion = rect(60, 100, 60, 100)  # stored (unmirrored) coordinates
    half = lesion[::2, ::2]  # the same outline stored at 100 x 60: same aspect ratio
    path = write_dicom(tmp_path / "film.dcm", pixels, laterality="R")
    rows = [
        manifest_row(path, save_mask(tmp_path / "half.dcm", half), side="RIGHT", abn=1),
        manifest_row(path, save_mask(tmp_path / "square.dcm", np.ones((100, 100), bool)), side="RIGHT", abn=2),
    ]
    summary, cache = prepare(tmp_path, rows, crop="patch", negatives_per_image=3)
    index = cache.index
    assert summary.resampled_masks == 1
    assert [s["lesion_id"] for s in summary.skipped] == ["P_00001_RIGHT_CC_MASS_2", ""]
    assert summary.skipped[0]["reason"] == mask_fit_reason((100, 100), (H, W))
    # the unplaceable lesion could lie anywhere: no non-mass patch is drawn from its film
    assert "no non-mass patches" in summary.skipped[1]["reason"] and "MASS_2" in summary.skipped[1]["reason"]
    assert index["kind"].tolist() == ["lesion"] and bool(index.loc[0, "mask_resampled"])
    entry = index.iloc[0]
    canonical = resample_mask(half[:, ::-1], (H, W))  # mirrored at its own size, then resampled
    assert bool(entry["flipped"]) and mask_bbox(canonical) == mask_bbox(lesion[:, ::-1])
    np.testing.assert_array_equal(cache.mask(0), cropped(canonical, entry))
    assert cache.mask(0)[12:20, 12:20].all()  # the lesion sits at the patch centre


# --- 6. orientation: laterality header first ----------------------------------------------------


def test_laterality_header_decides_and_disagreements_are_counted(tmp_path):
    pixels, lesion = breast(), rect(80, 110, 20, 50)
    # film 1 says RIGHT but shows its breast on the left: mirrored anyway, and counted
    right = write_dicom(tmp_path / "right.dcm", pixels, laterality="R")
    # film 2 names no side in its header (its path does, which must not count): content decides
    unnamed = write_dicom(tmp_path / "P_00002_RIGHT_CC" / "film.dcm", pixels, laterality=None)
    mask = save_mask(tmp_path / "m.dcm", lesion)
    rows = [manifest_row(right, mask, side="RIGHT"), manifest_row(unnamed, mask, side="RIGHT", patient="P_00002")]
    summary, cache = prepare(tmp_path, rows)
    assert (summary.orientation_disagreements, summary.orientation_from_content) == (1, 1)
    flipped = dict(zip(cache.index["patient_id"], cache.index["flipped"], strict=True))
    assert flipped == {"P_00001": True, "P_00002": False}
    for i in range(2):  # either way the mask followed its film
        assert cache.mask(i)[12:20, 12:20].all()


# --- 5. 8-bit sources --------------------------------------------------------------------------


def test_crops_of_an_eight_bit_film_keep_their_relative_intensity(tmp_path):
    pixels = breast(np.uint8, tissue=30)
    pixels[120:170, 10:60] = np.where(pixels[120:170, 10:60] > 0, 200, 0)  # a bright region of the same film
    dark, bright = rect(40, 60, 20, 40), rect(135, 155, 25, 45)
    path = write_dicom(tmp_path / "film8.dcm", pixels)
    rows = [
        manifest_row(path, save_mask(tmp_path / "d.dcm", dark), abn=1),
        manifest_row(path, save_mask(tmp_path / "b.dcm", bright), abn=2),
    ]
    _, cache = prepare(tmp_path, rows, fixed_pad_px=4)
    index = cache.index.set_index("lesion_id")
    d, b = (int(index.loc[f"P_00001_LEFT_CC_MASS_{k}", "entry"]) for k in (1, 2))
    assert set(index["value_scale"]) == {257.0} and set(index["value_offset"]) == {0.0}
    assert cache.image(b).mean() > 4 * cache.image(d).mean()
    assert cache.image(d).max() <= 33 * 257  # the dark crop was not stretched to 0..65535
    # a served crop of the same ROI (roi_crop, from the whole image) equals the cached one
    cfg = DataConfig(cache_px=32, input_px=32, crop="fixed", fixed_pad_px=4)
    image = pixels.astype(np.float32)
    for entry, mask in ((d, dark), (b, bright)):
        np.testing.assert_array_equal(roi_crop(image, cfg, box=mask_bbox(mask)), cache.image(entry))
