"""Real CBIS-DDSM quirks on small hand-made manifests: the pairing rule, shared films, official splits,
splits that do not depend on the abnormality, and masks stored at another size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_ray.data.manifest import conform
from mammo_ray.data.masks import mask_fit, resample_mask, scale_box
from mammo_ray.data.quirks import mark_quirks, quirk_counts
from mammo_ray.data.splits import make_splits


def row(
    patient: str,
    side: str,
    view: str,
    abn: int,
    kind: str,
    pathology: str,
    split: str = "train",
    path: str | None = None,
) -> dict:
    folder = f"{'Mass' if kind == 'MASS' else 'Calc'}-{split}_{patient}_{side}_{view}"
    return {
        "patient_id": patient,
        "side": side,
        "view": view,
        "abnormality_id": abn,
        "abnormality_type": kind,
        "pathology": pathology,
        "label": int(pathology == "MALIGNANT"),
        "source": "cbis-ddsm",
        "source_split": split,
        "source_file": "x.csv",
        "source_row": 1,
        "resolved": True,
        "lesion_id": f"{patient}_{side}_{view}_{kind}_{abn}",
        "exam_key": f"{patient}_{side}_{kind}_{abn}",
        "image_path": path or f"/data/{folder}/1-1.dcm",
    }


def p00419() -> pd.DataFrame:
    """P_00419 LEFT as the real CSVs have it: abnormality ids 1 and 2 swap pathology between CC and MLO."""
    return conform(
        pd.DataFrame(
            [
                row("P_00419", "LEFT", "CC", 1, "MASS", "BENIGN"),
                row("P_00419", "LEFT", "CC", 2, "MASS", "MALIGNANT"),
                row("P_00419", "LEFT", "MLO", 1, "MASS", "MALIGNANT"),
                row("P_00419", "LEFT", "MLO", 2, "MASS", "BENIGN"),
                row("P_00001", "LEFT", "CC", 1, "MASS", "MALIGNANT"),
                row("P_00001", "LEFT", "MLO", 1, "MASS", "MALIGNANT"),
            ]
        )
    )


def test_views_that_disagree_on_the_label_are_not_paired():
    marked = mark_quirks(p00419())
    keys = dict(zip(marked["lesion_id"], marked["exam_key"], strict=True))
    assert keys["P_00419_LEFT_CC_MASS_1"] == "P_00419_LEFT_MASS_1_CC"
    assert keys["P_00419_LEFT_MLO_MASS_1"] == "P_00419_LEFT_MASS_1_MLO"
    assert keys["P_00001_LEFT_CC_MASS_1"] == keys["P_00001_LEFT_MLO_MASS_1"] == "P_00001_LEFT_MASS_1"
    assert marked.groupby("exam_key")["label"].nunique().max() == 1  # every exam has one label
    assert marked["view_label_conflict"].tolist() == [True] * 4 + [False] * 2
    assert quirk_counts(marked)["view_label_conflicts"] == 2  # exam keys, not rows
    assert mark_quirks(marked).equals(marked)  # idempotent: a re-indexed manifest keeps its keys


def test_exam_level_and_paired_views_work_on_the_conflict():
    from mammo_ray.train.metrics import exam_level

    marked = mark_quirks(p00419())
    frame = marked[["exam_key", "label"]].assign(prob=[0.2, 0.9, 0.8, 0.3, 0.7, 0.9])
    exams = exam_level(frame)
    assert len(exams) == 5 and sorted(exams["n_images"]) == [1, 1, 1, 1, 2]


def test_a_film_in_two_folders_is_one_image():
    rows = [
        row("P_00005", "RIGHT", "CC", 1, "MASS", "BENIGN", path="/d/Mass-Training_P_00005_RIGHT_CC/1-1.dcm"),
        row(
            "P_00005", "RIGHT", "CC", 1, "CALCIFICATION", "MALIGNANT", path="/d/Calc-Training_P_00005_RIGHT_CC/1-1.dcm"
        ),
        row("P_00005", "RIGHT", "MLO", 1, "MASS", "BENIGN"),
        row("P_00006", "LEFT", "CC", 1, "CALCIFICATION", "BENIGN"),
        row("P_00006", "LEFT", "CC", 2, "CALCIFICATION", "BENIGN"),
    ]
    marked = mark_quirks(conform(pd.DataFrame(rows)))
    assert marked["image_id"].tolist() == ["P_00005_RIGHT_CC"] * 2 + ["P_00005_RIGHT_MLO"] + ["P_00006_LEFT_CC"] * 2
    assert marked["shared_film"].tolist() == [True, True, False, False, False]
    assert marked["multi_roi_image"].tolist() == [True, True, False, True, True]
    counts = quirk_counts(marked)
    assert counts["shared_films"] == 1 and counts["multi_roi_images"] == 2


def official_manifest(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        split = "test" if i % 5 == 0 else "train"
        kind = "MASS" if i % 2 else "CALCIFICATION"
        rows.append(row(f"P_{i:05d}", "LEFT", "CC", 1, kind, "MALIGNANT" if rng.random() < 0.5 else "BENIGN", split))
        if i % 7 == 3:  # in both official sets, as 31 real patients are
            rows.append(row(f"P_{i:05d}", "RIGHT", "CC", 1, kind, "BENIGN", "test" if split == "train" else "train"))
    return mark_quirks(conform(pd.DataFrame(rows)))


def test_official_split_keeps_the_test_set_and_puts_overlap_patients_in_test():
    manifest = official_manifest()
    overlap = set(manifest.loc[manifest["in_both_source_splits"], "patient_id"])
    official_test = set(manifest.loc[manifest["source_split"] == "test", "patient_id"])
    assert overlap and overlap <= official_test
    splits = make_splits(manifest, mode="official", seed=1)
    assert set(splits.test) == official_test
    assert splits.overlap_patients_in_test == len(overlap) == quirk_counts(manifest)["official_split_overlap_patients"]
    train_pool = set(manifest["patient_id"]) - official_test
    assert set(splits.train) | set(splits.val) == train_pool and not set(splits.train) & set(splits.val)
    assert abs(len(splits.val) - len(train_pool) / 9) <= 3  # 0.1 / (0.8 + 0.1) of the official train patients
    assert make_splits(manifest, mode="official", seed=2).test == splits.test  # the seed only moves val
    assert make_splits(manifest, mode="official", seed=1, balance_eval=True).test == splits.test


def test_official_split_needs_the_source_split():
    manifest = official_manifest().assign(source_split="")
    with pytest.raises(ValueError, match="data.split=official needs the dataset's own train/test split"):
        make_splits(manifest, mode="official")


def test_split_does_not_depend_on_the_abnormality(tmp_path):
    """Splits are made once over every patient; a mass model and an all-abnormality model share test."""
    from mammo_ray.config import load_config
    from mammo_ray.data.manifest import write_manifest
    from mammo_ray.data.pipeline import ensure_splits
    from mammo_ray.data.splits import Splits

    manifest_path = write_manifest(official_manifest(), tmp_path / "m.parquet")
    paths = {
        a: ensure_splits(load_config(None, [f"data.abnormality={a}"]).data, manifest_path, tmp_path)
        for a in ("mass", "all", "calcification")
    }
    assert len(set(paths.values())) == 1
    splits = Splits.load(paths["mass"])
    manifest = official_manifest()
    mass_patients = set(manifest.loc[manifest["abnormality_type"] == "MASS", "patient_id"])
    assert 0 < len(mass_patients & set(splits.test)) < len(mass_patients)  # masses are stratified into test


@pytest.mark.parametrize(
    "mask_shape, fit",
    [
        ((64, 48), "same"),
        ((32, 24), "resample"),
        ((80, 60), "resample"),
        ((65, 48), "resample"),
        ((56, 48), "drop"),
        ((48, 64), "drop"),
    ],
)
def test_mask_fit(mask_shape, fit):
    assert mask_fit(mask_shape, (64, 48)) == fit


def test_resampled_mask_lands_on_the_lesion():
    image_shape = (64, 48)
    full = np.zeros(image_shape, bool)
    full[20:36, 8:24] = True
    half = resample_mask(full, (32, 24))
    assert half.dtype == bool and half.sum() == 8 * 8
    back = resample_mask(half, image_shape)
    assert np.array_equal(back, full)
    ys, xs = np.nonzero(half)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    assert scale_box(box, (32, 24), image_shape) == (8, 20, 24, 36)
    assert np.array_equal(resample_mask(full, image_shape), full)
