"""PairedViewDataset's pairs: each sample is its exam's CC and MLO crops with the exam's label, the
patient of each exam, exams whose views disagree rejected; and models in the two-view modes learn a
signal that only the MLO view carries."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from crop_caches import mlo_signal_cache

from mammo_ray.config import load_config
from mammo_ray.data.datasets import PairedViewDataset
from mammo_ray.train.loop import build_training, fit


def fake_cache(rows: list[tuple[str, str, str, int]], tmp_path) -> SimpleNamespace:
    """What ``PairedViewDataset`` reads of a ``CropCache``: its index, its folder and its crops (``crop_of``).

    Each row is ``(exam_key, patient_id, view, malignant)``; all lesion crops of the val split."""
    index = pd.DataFrame(rows, columns=["exam_key", "patient_id", "view", "malignant"])
    index.insert(0, "entry", range(len(index)))
    index = index.assign(kind="lesion", mass=1, split="val")
    return SimpleNamespace(index=index, cache_dir=tmp_path, image=crop_of)


def crop_of(entry: int) -> np.ndarray:
    """The fake cache's stored crop ``entry``: a constant image that names its entry."""
    return np.full((4, 5), 100 + entry, np.uint16)


def test_pairs_carry_the_patient_and_count_the_unpaired(tmp_path):
    cache = fake_cache(
        [
            ("P_1_LEFT_MASS_1", "P_1", "CC", 1),
            ("P_1_LEFT_MASS_1", "P_1", "MLO", 1),
            ("P_2_RIGHT_MASS_1", "P_2", "MLO", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "CC", 0),
            ("P_3_LEFT_MASS_1", "P_3", "CC", 1),
        ],
        tmp_path,
    )
    ds = PairedViewDataset(cache, "val", "pathology")
    assert list(ds.pairs.columns) == ["exam_key", "patient_id", "cc_entry", "mlo_entry", "label"]
    assert ds.pairs["patient_id"].tolist() == ["P_1", "P_2"]
    assert ds.pairs[["cc_entry", "mlo_entry"]].values.tolist() == [[0, 1], [3, 2]]
    assert ds.labels.tolist() == [1, 0]
    assert (ds.unpaired, ds.unpaired_keys) == (1, ["P_3_LEFT_MASS_1"])


def test_an_exam_whose_views_disagree_is_rejected_by_name(tmp_path):
    # P_00419 LEFT MASS 1 in real CBIS-DDSM: CC and MLO with different pathologies. The indexer
    # keys them apart; a cache that still pairs them must not take the first row's label.
    cache = fake_cache(
        [
            ("P_00419_LEFT_MASS_1", "P_00419", "CC", 1),
            ("P_00419_LEFT_MASS_1", "P_00419", "MLO", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "CC", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "MLO", 0),
        ],
        tmp_path,
    )
    with pytest.raises(ValueError, match=r"exam 'P_00419_LEFT_MASS_1' .* different 'label' .*re-index"):
        PairedViewDataset(cache, "val", "pathology")


def test_views_split_by_the_pairing_rule_are_unpaired_not_mislabelled(tmp_path):
    cache = fake_cache(
        [
            ("P_00419_LEFT_MASS_1_CC", "P_00419", "CC", 1),
            ("P_00419_LEFT_MASS_1_MLO", "P_00419", "MLO", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "CC", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "MLO", 0),
        ],
        tmp_path,
    )
    ds = PairedViewDataset(cache, "val", "pathology")
    assert ds.pairs["exam_key"].tolist() == ["P_2_RIGHT_MASS_1"]
    assert ds.unpaired == 2


def test_each_sample_is_its_exams_transformed_cc_and_mlo_crops_with_its_label(tmp_path):
    cache = fake_cache(
        [
            ("P_1_LEFT_MASS_1", "P_1", "MLO", 1),  # the MLO row first: pairing goes by view, not by order
            ("P_1_LEFT_MASS_1", "P_1", "CC", 1),
            ("P_2_RIGHT_MASS_1", "P_2", "CC", 0),
            ("P_2_RIGHT_MASS_1", "P_2", "MLO", 0),
            ("P_3_LEFT_MASS_1", "P_3", "CC", 1),
            ("P_3_LEFT_MASS_1", "P_3", "MLO", 1),
        ],
        tmp_path,
    )

    def transform(crop: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(crop.astype(np.float32))[None] * 2 - 1

    ds = PairedViewDataset(cache, "val", "pathology", transform=transform)
    index = cache.index.set_index(["exam_key", "view"])
    assert len(ds) == 3
    for i, key in enumerate(["P_1_LEFT_MASS_1", "P_2_RIGHT_MASS_1", "P_3_LEFT_MASS_1"]):
        (cc, mlo), label = ds[i]
        cc_entry, mlo_entry = (int(index.loc[(key, view), "entry"]) for view in ("CC", "MLO"))
        torch.testing.assert_close(cc, transform(crop_of(cc_entry)), rtol=0, atol=0)
        torch.testing.assert_close(mlo, transform(crop_of(mlo_entry)), rtol=0, atol=0)
        assert label == int(index.loc[(key, "CC"), "malignant"]) == int(index.loc[(key, "MLO"), "malignant"])
    (cc, mlo), _ = PairedViewDataset(cache, "val", "pathology")[0]  # no transform: the stored crop as float
    torch.testing.assert_close(cc, torch.full((1, 4, 5), 101.0))
    torch.testing.assert_close(mlo, torch.full((1, 4, 5), 100.0))


@pytest.mark.slow
@pytest.mark.parametrize("view_mode", ["parallel", "multimodal"])
def test_two_view_models_learn_a_signal_only_the_mlo_view_carries(tmp_path, view_mode):
    """Every CC crop is noise; a malignant exam's MLO crop has a bright disc. A multimodal model must
    read its MLO branch and a parallel model must average its views' probabilities to beat chance."""
    cache_dir = mlo_signal_cache(tmp_path / "cache", {"train": 48, "val": 32}, px=40)
    config = load_config(
        None,
        [
            "data.cache_px=40",
            "data.input_px=32",
            "data.normalization=global",
            "data.hflip=false",
            "data.num_workers=0",
            "model.name=levynet",
            f"model.view_mode={view_mode}",
            "model.dropout=0.0",
            "optim.lr=0.003",
            "train.batch_size=8",
            "train.epochs=4",
        ],
    )
    training = build_training(config, cache_dir)
    history = fit(training)
    last = history[-1]
    assert last["val_n"] == 32  # per exam, the level both two-view modes are scored at
    assert last["val_auc"] > 0.9, [round(h["val_auc"], 3) for h in history]
