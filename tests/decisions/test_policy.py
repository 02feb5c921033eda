"""The decision policy (mammo_ray.decisions.policy) and its figures (mammo_ray.decisions.plots): a JSON
round trip, the referral decision and its reason, ``assess`` at image and exam level, ``retained_at``,
and the reliability, precision-recall and referral plots written as PNG files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_ray.decisions.calibration import brier, expected_calibration_error
from mammo_ray.decisions.plots import plot_precision_recall, plot_referral, plot_reliability
from mammo_ray.decisions.policy import DecisionPolicy, assess, retained_at, save_policy
from mammo_ray.decisions.referral import REFERRAL_RATES, member_uncertainty

MEMBERS = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def exams(n_exams: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A split of ``n_exams`` two-view exams (CC + MLO, one label, one patient each) and the
    probabilities of ``MEMBERS`` over-confident members: each exam has a true logit z (label ~
    Bernoulli(sigmoid(z))), each view adds noise, and each member says sigmoid(4 (view logit + own noise))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n_exams)
    labels = np.repeat(rng.binomial(1, 1 / (1 + np.exp(-z))), 2)
    view = np.repeat(z, 2) + rng.normal(0, 0.3, 2 * n_exams)
    probs = 1 / (1 + np.exp(-4.0 * (view[:, None] + rng.normal(0, 0.3, (2 * n_exams, MEMBERS)))))
    ids = [f"S{seed}-{i:03d}" for i in range(n_exams)]
    frame = pd.DataFrame(
        {
            "exam_key": np.repeat([f"{i}_LEFT_MASS" for i in ids], 2),
            "patient_id": np.repeat(ids, 2),
            "view": np.tile(["CC", "MLO"], n_exams),
            "label": labels,
            "prob": probs.mean(axis=1),
        }
    )
    return frame, probs


@pytest.fixture(scope="module")
def fitted():
    """(policy fitted on a validation split, test frame, test member probabilities, assess result)."""
    val, val_probs = exams(200, seed=0)
    test, test_probs = exams(200, seed=1)
    policy = DecisionPolicy.fit(val["label"], val_probs)
    result = assess(test, test_probs, policy, n_boot=100)
    return policy, test, test_probs, result


# --- The policy as data ----------------------------------------------------------------------------


def test_fit_freezes_what_validation_says(fitted):
    policy, *_ = fitted
    assert policy.members == MEMBERS
    assert 0 <= policy.best_member < MEMBERS
    assert policy.calibration.method == "temperature"
    assert policy.calibration.temperature > 2.0  # the members are over-confident
    assert policy.calibration.fitted_on["split"] == "val"
    assert policy.referral_measure == "entropy"
    assert policy.referral_rate == 0.1
    assert len(policy.operating_points) == 5
    assert 0 < policy.referral_cutoff < 1


def test_json_round_trip(fitted, tmp_path):
    policy, *_ = fitted
    stored = json.dumps(policy.to_dict())
    restored = DecisionPolicy.from_dict(json.loads(stored))
    assert restored == policy
    assert restored.to_dict() == policy.to_dict()
    assert json.loads(stored)["fitted_on"] == "val"
    assert DecisionPolicy.from_dict(json.loads(save_policy(policy, tmp_path / "policy.json").read_text())) == policy


def test_from_dict_refuses_another_version(fitted):
    policy, *_ = fitted
    with pytest.raises(ValueError, match="version 99"):
        DecisionPolicy.from_dict({**policy.to_dict(), "version": 99})


def test_fit_refuses_an_unknown_measure():
    val, val_probs = exams(20, seed=2)
    with pytest.raises(ValueError, match="unknown referral measure 'variance'"):
        DecisionPolicy.fit(val["label"], val_probs, referral_measure="variance")


def test_fit_of_one_network_and_of_other_choices():
    val, val_probs = exams(60, seed=3)
    single = DecisionPolicy.fit(val["label"], val_probs[:, 0], calibration="isotonic", referral_measure="std")
    assert (single.members, single.best_member) == (1, 0)
    assert single.calibration.method == "isotonic"
    assert single.referral_cutoff == 0.0  # one member never disagrees with itself


# --- The referral decision -------------------------------------------------------------------------


def test_refer_above_the_cutoff_with_its_reason(fitted):
    policy, *_ = fitted
    cutoff = policy.referral_cutoff
    above = policy.refer({"entropy": cutoff + 0.01, "std": 0.0, "mutual_information": 0.0})
    assert above["refer"] is True
    assert above["measure"] == "entropy"
    assert above["value"] == pytest.approx(cutoff + 0.01)
    assert above["cutoff"] == cutoff
    assert "entropy" in above["reason"]
    assert f"{cutoff:.4f}" in above["reason"]
    assert "above the cut-off" in above["reason"]
    assert "10%" in above["reason"]
    at = policy.refer({"entropy": cutoff})
    assert at["refer"] is False
    assert "at or below" in at["reason"]
    assert policy.refer({"entropy": cutoff - 0.2})["refer"] is False


# --- assess on the test split ----------------------------------------------------------------------


def test_assess_refuses_another_member_count(fitted):
    policy, test, test_probs, _ = fitted
    with pytest.raises(ValueError, match=f"fitted for {MEMBERS} member"):
        assess(test, test_probs[:, :3], policy, n_boot=0)
    with pytest.raises(ValueError, match="the frame has 399 case"):
        assess(test.iloc[1:], test_probs, policy, n_boot=0)


def test_assess_reports_image_and_exam_levels(fitted):
    policy, test, test_probs, result = fitted
    levels = result["calibration"]
    assert set(levels) == {"image", "exam"}
    assert (levels["image"]["n"], levels["exam"]["n"]) == (400, 200)
    for level in levels.values():
        assert level["ece_bins"] == len(level["reliability"]) == 10
        assert len(level["reliability"]) == 10  # distinct probabilities: 10 equal-mass bins
        assert sum(b["n"] for b in level["reliability"]) == level["n"]
        assert level["ece_calibrated"] < level["ece"]
        assert level["brier_calibrated"] < level["brier"]
        assert 0 < level["average_precision"] <= 1
        assert 0 < level["prevalence"] < 1

    raw = test_probs.mean(axis=1)
    calibrated = policy.calibration(raw)
    y = test["label"].to_numpy()
    assert result["brier"] == levels["image"]["brier"] == pytest.approx(brier(y, raw))
    assert result["ece_calibrated"] == pytest.approx(expected_calibration_error(y, calibrated))
    # exam level: the two views' calibrated probabilities averaged
    exam_cal = calibrated.reshape(-1, 2).mean(axis=1)
    assert levels["exam"]["brier_calibrated"] == pytest.approx(brier(y[::2], exam_cal))

    entropy = member_uncertainty(test_probs).entropy
    referral = result["referral"]
    assert referral["referred"] == int((entropy > policy.referral_cutoff).sum())
    assert 0.02 < referral["referred_rate"] < 0.25  # about the 10% aimed at on validation
    assert set(referral["curves"]) == {"policy", "best_member", "random"}
    assert referral["curves"]["policy"]["label"] == "ensemble entropy"
    assert f"member {policy.best_member}" in referral["curves"]["best_member"]["label"]
    policy_curve, random_curve = referral["curves"]["policy"], referral["curves"]["random"]
    assert retained_at(policy_curve, 0.2) > retained_at(random_curve, 0.2)  # referral by entropy beats chance
    for row in result["operating_points"]:
        assert row["clusters"] == 200  # patients
        assert row["sensitivity_ci"][0] <= row["sensitivity"] <= row["sensitivity_ci"][1]


def test_assess_without_exam_keys_reports_images_only(fitted):
    policy, test, test_probs, _ = fitted
    frame = test.drop(columns=["exam_key", "patient_id"])
    result = assess(frame, test_probs, policy, n_boot=20)
    assert set(result["calibration"]) == {"image"}
    assert result["operating_points"][0]["clusters"] == 400  # every image its own cluster


def test_retained_at_reads_a_curve(fitted):
    *_, result = fitted
    curve = result["referral"]["curves"]["policy"]
    assert curve["rates"] == list(REFERRAL_RATES)
    assert retained_at(curve, 0.2) == curve["auc"][curve["rates"].index(0.2)]
    assert retained_at(curve, 0.0) == curve["auc"][0]
    assert retained_at(curve, 0.2) > retained_at(curve, 0.0)
    with pytest.raises(ValueError, match="no rate 0.123"):
        retained_at(curve, 0.123)


# --- Figures ---------------------------------------------------------------------------------------


def test_plots_write_png_files(fitted, tmp_path):
    policy, test, test_probs, result = fitted
    calibrated = policy.calibration(test_probs.mean(axis=1))
    paths = [
        plot_reliability(result["calibration"], tmp_path / "reliability.png"),
        plot_precision_recall(
            {"per image": (test["label"], calibrated, result["calibration"]["image"]["average_precision"])},
            tmp_path / "pr" / "precision_recall.png",
            title="test",
        ),
        plot_referral(
            result["referral"]["curves"], tmp_path / "referral.png", title="test", cutoff_rate=policy.referral_rate
        ),
    ]
    for path in paths:
        assert path.parent.is_dir() and path.is_file()
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5000
