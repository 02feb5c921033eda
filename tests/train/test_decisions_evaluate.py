"""The decision policy in evaluation: fitted on val only, stored in the checkpoint, applied as stored.

The leakage test perturbs the test labels (every one flipped) between two evaluations of the same
checkpoint: the calibration, the operating thresholds and the referral cut-off must not move, while
the test figures they produce do. It does so for one network and for an ensemble of members.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import mammo_ray.train.evaluation as evaluation_module
from mammo_ray.train.checkpoint import load_checkpoint, store_decisions
from mammo_ray.train.evaluation import evaluate_checkpoint, evaluate_members

pytestmark = pytest.mark.slow


@pytest.fixture
def flipped_test_labels(monkeypatch):
    """``predict_checkpoint`` as before, with every test-split label flipped (val untouched)."""
    original = evaluation_module.predict_checkpoint

    def predict(checkpoint, split, *args, **kwargs):
        predicted = original(checkpoint, split, *args, **kwargs)
        if split == "test":
            predicted.frame = predicted.frame.assign(label=1 - predicted.frame["label"])
        return predicted

    monkeypatch.setattr(evaluation_module, "predict_checkpoint", predict)


def _thresholds(result):
    return [(p["name"], p["threshold"]) for p in result.decisions["operating_points"]]


@pytest.fixture
def unpolicied(lesion_model, tmp_path):
    """A copy of the lesion model without a stored policy (it is fitted on val at evaluation)."""
    copy = tmp_path / "model" / "checkpoint.pt"
    copy.parent.mkdir()
    shutil.copy(lesion_model[0], copy)
    assert "decisions" not in load_checkpoint(copy)
    return copy, lesion_model[1]


def _evaluate(checkpoint, prepared, out):
    return evaluate_checkpoint(
        checkpoint, "test", out, out, n_boot=50, cache_dir=prepared.cache_dir, splits_path=prepared.splits
    )


def test_the_test_labels_never_move_what_val_fixed(unpolicied, tmp_path, request):
    checkpoint, prepared = unpolicied
    honest = _evaluate(checkpoint, prepared, tmp_path / "honest")
    request.getfixturevalue("flipped_test_labels")
    flipped = _evaluate(checkpoint, prepared, tmp_path / "flipped")
    assert honest.decisions["policy_source"] == "fitted on val now" and not honest.decisions["in_sample"]
    assert honest.policy.to_dict() == flipped.policy.to_dict()  # calibration, thresholds, cut-off, best member
    assert _thresholds(honest) == _thresholds(flipped)
    sens = [p["sensitivity"] for p in honest.decisions["operating_points"]]
    assert sens != [p["sensitivity"] for p in flipped.decisions["operating_points"]]  # the test figures did move
    assert honest.image.auc == pytest.approx(1 - flipped.image.auc)
    assert honest.to_dict()["ece"] != flipped.to_dict()["ece"]


def test_an_ensembles_policy_comes_from_the_members_val_predictions(unpolicied, lesion_model, tmp_path, request):
    members = [unpolicied[0], lesion_model[0]]
    args = dict(n_boot=20)
    honest = evaluate_members(members, "test", tmp_path, tmp_path / "honest", **args)
    request.getfixturevalue("flipped_test_labels")
    flipped = evaluate_members(members, "test", tmp_path, tmp_path / "flipped", **args)
    assert honest.policy.members == 2 and honest.policy.to_dict() == flipped.policy.to_dict()
    # a registered ensemble's stored policy is applied as stored, not fitted again
    stored = honest.policy.to_dict()
    stored["referral"]["cutoff"] = -1.0  # refer everything: visibly the stored one
    again = evaluate_members(members, "test", tmp_path, tmp_path / "stored", decisions=stored, **args)
    assert again.decisions["policy_source"] == "registered model"
    assert again.decisions["referral"]["referred_rate"] == 1.0


def test_a_stored_policy_is_used_and_its_figures_are_written(unpolicied, tmp_path):
    checkpoint, prepared = unpolicied
    val = evaluate_checkpoint(
        checkpoint,
        "val",
        tmp_path,
        tmp_path / "val",
        n_boot=0,
        cache_dir=prepared.cache_dir,
        splits_path=prepared.splits,
    )
    assert val.decisions["in_sample"]  # fitted and assessed on val: said so
    policy = val.policy.to_dict()
    policy["calibration"]["temperature"] = 3.0  # not what val would give: visibly the stored one
    store_decisions(checkpoint, policy)
    result = _evaluate(checkpoint, prepared, tmp_path / "test")
    assert result.decisions["policy_source"] == "checkpoint"
    assert result.policy.calibration.temperature == 3.0
    out = result.to_dict()
    assert {"brier", "ece", "ece_calibrated", "operating_points", "referral"} <= out.keys()
    assert len(out["operating_points"]) == 5 and all("specificity_ci" in p for p in out["operating_points"])
    assert out["referral"]["curves"]["policy"]["rates"][0] == 0.0 and out["referral"]["curves"]["random"]["auc"]
    cases = pd.read_csv(tmp_path / "test" / "predictions_test.csv")  # per case, as the served reply says
    assert cases["calibrated_prob"].to_numpy() == pytest.approx(result.policy.calibration(cases["prob"].to_numpy()))
    assert cases["refer"].mean() == pytest.approx(out["referral"]["referred_rate"])
    for name in ("reliability_test.png", "precision_recall_test.png", "referral_test.png"):
        assert (tmp_path / "test" / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "test" / "metrics_test.json").read_text())
    assert saved["ece_calibrated"] == pytest.approx(out["ece_calibrated"]) or np.isnan(out["ece_calibrated"])
    assert result.metrics["test_ece_calibrated"] == pytest.approx(out["ece_calibrated"])


def test_a_val_split_without_both_classes_says_why_there_is_no_policy(unpolicied, tmp_path, monkeypatch):
    checkpoint, prepared = unpolicied
    original = evaluation_module.predict_checkpoint

    def benign_val(checkpoint, split, *args, **kwargs):
        predicted = original(checkpoint, split, *args, **kwargs)
        if split == "val":
            predicted.frame = predicted.frame.assign(label=0)
        return predicted

    monkeypatch.setattr(evaluation_module, "predict_checkpoint", benign_val)
    result = _evaluate(checkpoint, prepared, tmp_path / "test")
    out = result.to_dict()
    assert result.policy is None and "ece" not in out and "operating_points" not in out
    assert out["decisions"]["skipped"].startswith("none: the val split lacks one of the classes")
    assert out["metrics"]["test_auc"] == result.image.auc  # the rest of the evaluation is whole
