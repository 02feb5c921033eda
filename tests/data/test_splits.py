"""Patient-level splits: properties over random manifests, balancing, folds, the leak check."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mammo_ray.data.splits import SplitLeakError, Splits, make_splits, patient_strata, summarize


def random_manifest(seed: int, n_patients: int, p_malignant: float = 0.4, p_unresolved: float = 0.0) -> pd.DataFrame:
    """Patients with 1-4 lesions each, random labels, some rows unresolved."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        for j in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    "patient_id": f"P_{i:05d}",
                    "lesion_id": f"P_{i:05d}_{j}",
                    "label": int(rng.random() < p_malignant),
                    "abnormality_type": "MASS" if rng.random() < 0.5 else "CALCIFICATION",
                    "resolved": bool(rng.random() >= p_unresolved),
                }
            )
    return pd.DataFrame(rows)


manifests = st.builds(
    random_manifest,
    seed=st.integers(0, 2**31),
    n_patients=st.integers(1, 80),
    p_malignant=st.floats(0.0, 1.0),
    p_unresolved=st.sampled_from([0.0, 0.3]),
)


@settings(max_examples=60, deadline=None)
@given(manifest=manifests, seed=st.integers(0, 2**31), balance=st.booleans())
def test_every_patient_in_exactly_one_split(manifest, seed, balance):
    splits = make_splits(manifest, seed=seed, balance_eval=balance)
    groups = [set(splits.train), set(splits.val), set(splits.test)]
    assert sum(map(len, groups)) == len(set().union(*groups))  # disjoint, no duplicates
    has_resolved = manifest.groupby("patient_id")["resolved"].any()
    assert set().union(*groups) == set(has_resolved[has_resolved].index)
    assert set(splits.excluded_patients) == set(has_resolved[~has_resolved].index)
    assert splits.excluded_rows == int((~manifest["patient_id"].map(has_resolved)).sum())
    assert make_splits(manifest, seed=seed, balance_eval=balance) == splits  # reproducible
    assigned = splits.assign(manifest)
    assert (assigned.groupby(manifest["patient_id"]).nunique() == 1).all()  # all rows of a patient together
    assert set(assigned[assigned != ""]) <= {"train", "val", "test"}
    if balance:
        strata = patient_strata(manifest[manifest["patient_id"].isin(set().union(*groups))])
        for part in (splits.val, splits.test):
            counts = Counter(strata[p] for p in part)
            present = set(strata)
            assert len({counts.get(c, 0) for c in present}) <= 1, (counts, present)


@settings(max_examples=30, deadline=None)
@given(manifest=manifests, seed=st.integers(0, 2**31), k=st.integers(2, 6))
def test_folds_partition_the_non_test_patients(manifest, seed, k):
    pool = manifest.groupby("patient_id")["resolved"].any().sum()
    test_share = make_splits(manifest, seed=seed, fractions=(0.85, 0.0, 0.15))
    if len(test_share.train) < k:
        with pytest.raises(ValueError, match="folds must be between 2"):
            make_splits(manifest, seed=seed, fractions=(0.85, 0.0, 0.15), folds=k)
        return
    splits = make_splits(manifest, seed=seed, fractions=(0.85, 0.0, 0.15), folds=k)
    assert len(splits.folds) == k and splits.val == []
    flat = [p for fold in splits.folds for p in fold]
    assert len(flat) == len(set(flat)) and set(flat) == set(splits.train)
    assert max(map(len, splits.folds)) - min(map(len, splits.folds)) <= 1
    assert len(splits.train) + len(splits.test) == pool
    fold_train, fold_val = splits.fold(0)
    assert set(fold_val) == set(splits.folds[0]) and set(fold_train) | set(fold_val) == set(splits.train)
    assert (splits.assign_folds(manifest)[manifest["patient_id"].isin(splits.test)] == -1).all()


def test_fractions_and_strata_respected_for_large_n():
    manifest = random_manifest(1, 2000, p_malignant=0.3)
    splits = make_splits(manifest, seed=7)
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert n == 2000
    assert abs(len(splits.train) / n - 0.8) < 0.005 and abs(len(splits.test) / n - 0.1) < 0.005
    strata = patient_strata(manifest)
    overall = strata.mean()
    for part in (splits.train, splits.val, splits.test):
        assert abs(strata[part].mean() - overall) < 0.01
    assert make_splits(manifest, seed=8) != splits
    table = pd.DataFrame(summarize(splits, manifest)).T
    json.dumps(summarize(splits, manifest))
    assert list(table.index) == ["train", "val", "test"]
    assert list(table.columns) == ["patients", "rows", "label_0", "label_1"]
    assert table["patients"].sum() == 2000 and table["rows"].sum() == len(manifest)
    assert (table["label_0"] + table["label_1"] == table["rows"]).all()


def test_balance_eval_moves_surplus_into_train():
    manifest = random_manifest(3, 400, p_malignant=0.2)
    plain = make_splits(manifest, seed=1)
    balanced = make_splits(manifest, seed=1, balance_eval=True)
    strata = patient_strata(manifest)
    for part in (balanced.val, balanced.test):
        assert strata[part].sum() * 2 == len(part) > 0
    assert set(balanced.test) <= set(plain.test) and set(balanced.val) <= set(plain.val)
    assert len(balanced.train) + len(balanced.val) + len(balanced.test) == 400  # nobody dropped
    assert set(plain.test) - set(balanced.test) <= set(balanced.train)


def test_stratify_on_a_string_column_and_unstratified():
    manifest = random_manifest(4, 300)
    splits = make_splits(manifest, seed=0, label_column="abnormality_type", folds=5)
    strata = patient_strata(manifest, "abnormality_type")
    assert set(strata) == {"MASS", "CALCIFICATION"}
    assert list(summarize(splits, manifest)["test"]) == [
        "patients",
        "rows",
        "abnormality_type_CALCIFICATION",
        "abnormality_type_MASS",
    ]
    loose = make_splits(manifest, seed=0, stratify=False)
    assert len(loose.test) == 30 and len(loose.val) == 30


def test_excluded_rows_are_counted_and_summarized():
    manifest = random_manifest(5, 50)
    manifest.loc[manifest["patient_id"] == "P_00003", "resolved"] = False
    splits = make_splits(manifest, seed=0)
    assert splits.excluded_patients == ["P_00003"]
    assert splits.excluded_rows == int((manifest["patient_id"] == "P_00003").sum())
    assert splits.excluded_reason == "patient has no resolved row"
    assert splits.assign(manifest)[manifest["patient_id"] == "P_00003"].eq("").all()
    assert summarize(splits, manifest)["excluded"]["patients"] == 1
    everyone = make_splits(manifest, seed=0, require_resolved=False)
    assert everyone.excluded_patients == [] and "P_00003" in everyone.train + everyone.val + everyone.test


def test_save_load_round_trip_and_leak_errors(tmp_path):
    splits = make_splits(random_manifest(6, 60), seed=3, folds=3)
    path = splits.save(tmp_path / "splits.json")
    assert Splits.load(path) == splits
    assert not (tmp_path / "splits.json.tmp").exists()
    data = json.loads(path.read_text())
    data["test"].append(data["train"][0])
    (tmp_path / "leaky.json").write_text(json.dumps(data))
    with pytest.raises(
        SplitLeakError,
        match=rf"leaky.json: 1 patient\(s\) in more than one split: "
        rf"{data['train'][0]} in train and .*test",
    ) as info:
        Splits.load(tmp_path / "leaky.json")
    assert list(info.value.leaks) == [data["train"][0]]
    hand = Splits(train=["A", "B"], val=["C"], test=["B"])
    with pytest.raises(SplitLeakError, match="B in train and test"):
        hand.save(tmp_path / "hand.json")
    assert not (tmp_path / "hand.json").exists()
    with pytest.raises(SplitLeakError, match="A in train and fold 0 and fold 1"):
        Splits(train=["A"], val=[], test=[], folds=[["A"], ["A"]]).check_no_leak()
    data = json.loads(path.read_text()) | {"colour": "blue"}
    (tmp_path / "odd.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        Splits.load(tmp_path / "odd.json")


def test_bad_arguments():
    manifest = random_manifest(0, 10)
    with pytest.raises(ValueError, match="summing to 1"):
        make_splits(manifest, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="folds must be between 2"):
        make_splits(manifest, folds=1)
