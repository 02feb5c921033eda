"""PairedViewDataset's pairs: the patient of each exam, and exams whose views disagree rejected."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from mammo_ray.data.datasets import PairedViewDataset


def fake_cache(rows: list[tuple[str, str, str, int]], tmp_path) -> SimpleNamespace:
    """What ``PairedViewDataset.__init__`` reads of a ``CropCache``: its index and its folder.

    Each row is ``(exam_key, patient_id, view, malignant)``; all lesion crops of the val split."""
    index = pd.DataFrame(rows, columns=["exam_key", "patient_id", "view", "malignant"])
    index.insert(0, "entry", range(len(index)))
    index = index.assign(kind="lesion", mass=1, split="val")
    return SimpleNamespace(index=index, cache_dir=tmp_path)


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
