"""Operating points (mammo_ray.decisions.operating_points): thresholds chosen on validation reach their
targets there and are the extreme ones that do; on test they are applied frozen, with patient-clustered
bootstrap CIs; and a policy's thresholds never depend on the test labels (the leakage test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_ray.decisions.operating_points import (
    SENSITIVITY_TARGETS,
    SPECIFICITY_TARGETS,
    OperatingPoint,
    choose_thresholds,
    report_operating_points,
)
from mammo_ray.decisions.policy import DecisionPolicy, assess


def scored_cases(n_patients: int, seed: int, *, per_patient: int = 2, members: int = 1):
    """(labels, member probabilities (n, members), patient ids): ``per_patient`` cases of one label per
    patient, a shared noisy signal plus each member's own noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 2, n_patients), per_patient)
    signal = 1.5 * (2 * labels - 1) + rng.normal(0, 1.5, labels.size)
    probs = 1 / (1 + np.exp(-(signal[:, None] + rng.normal(0, 0.7, (labels.size, members)))))
    patients = np.repeat([f"P{seed}-{i:04d}" for i in range(n_patients)], per_patient)
    return labels, probs, patients


def _rates(labels, probs, threshold):
    called = np.asarray(probs) >= threshold
    labels = np.asarray(labels)
    return called[labels == 1].mean(), (~called[labels == 0]).mean()


# --- choose_thresholds -----------------------------------------------------------------------------


def test_hand_example_thresholds_are_the_extreme_ones():
    negatives = [0.1, 0.2, 0.3, 0.4, 0.5]
    positives = [0.35, 0.45, 0.6, 0.7, 0.8]
    labels = [0] * 5 + [1] * 5
    points = {
        (p.kind, p.target): p
        for p in choose_thresholds(
            labels, negatives + positives, specificity_targets=(0.8, 1.0), sensitivity_targets=(0.8, 1.0)
        )
    }
    # specificity 0.8: 4 of 5 negatives below t; 0.45 is the lowest such probability (at 0.4 only 3 are)
    assert points["specificity", 0.8].threshold == 0.45
    assert (points["specificity", 0.8].val_sensitivity, points["specificity", 0.8].val_specificity) == (0.8, 0.8)
    assert _rates(labels, negatives + positives, 0.4)[1] < 0.8  # one candidate lower misses the target
    # specificity 1.0: every negative below t: 0.6, the next probability above 0.5
    assert points["specificity", 1.0].threshold == 0.6
    assert (points["specificity", 1.0].val_sensitivity, points["specificity", 1.0].val_specificity) == (0.6, 1.0)
    # sensitivity 0.8: 4 of 5 positives at or above t; 0.45 is the highest (at 0.5 only 3 are)
    assert points["sensitivity", 0.8].threshold == 0.45
    assert _rates(labels, negatives + positives, 0.5)[0] < 0.8  # one candidate higher misses the target
    # sensitivity 1.0: the lowest positive
    assert points["sensitivity", 1.0].threshold == 0.35
    assert (points["sensitivity", 1.0].val_sensitivity, points["sensitivity", 1.0].val_specificity) == (1.0, 0.6)


def test_validation_targets_are_met_by_the_extreme_threshold():
    labels, probs, _ = scored_cases(300, seed=0)
    probs = probs[:, 0]
    points = choose_thresholds(labels, probs)
    assert [(p.kind, p.target) for p in points] == [("specificity", t) for t in SPECIFICITY_TARGETS] + [
        ("sensitivity", t) for t in SENSITIVITY_TARGETS
    ]
    candidates = np.unique(probs)
    for point in points:
        sens, spec = _rates(labels, probs, point.threshold)
        assert (point.val_sensitivity, point.val_specificity) == (sens, spec)
        i = np.searchsorted(candidates, point.threshold)
        if point.kind == "specificity":
            assert spec >= point.target
            assert _rates(labels, probs, candidates[i - 1])[1] < point.target  # one lower misses it
        else:
            assert sens >= point.target
            assert _rates(labels, probs, candidates[i + 1])[0] < point.target  # one higher misses it
    # the more specific, the higher the threshold
    spec_thresholds = [p.threshold for p in points if p.kind == "specificity"]
    assert spec_thresholds == sorted(spec_thresholds)


def test_choose_thresholds_needs_both_classes():
    with pytest.raises(ValueError, match="both classes; the cases have 0 positive"):
        choose_thresholds([0, 0, 0], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="3 positive"):
        choose_thresholds([1, 1, 1], [0.1, 0.5, 0.9])


def test_operating_point_name_and_round_trip():
    point = OperatingPoint("specificity", 0.9, 0.42, 0.77, 0.91)
    other = OperatingPoint("sensitivity", 0.95, 0.2, 0.96, 0.5)
    assert point.name == "sensitivity_at_specificity_0.90"
    assert other.name == "specificity_at_sensitivity_0.95"
    assert point.to_dict()["name"] == point.name
    assert OperatingPoint.from_dict(point.to_dict()) == point


# --- report_operating_points on the test split -----------------------------------------------------


def test_report_estimates_lie_inside_their_patient_bootstrap_cis():
    y_val, p_val, _ = scored_cases(200, seed=1)
    y_test, p_test, patients = scored_cases(200, seed=2)  # 400 cases, 2 per patient
    points = choose_thresholds(y_val, p_val[:, 0])
    rows = report_operating_points(y_test, p_test[:, 0], points, groups=patients, n_boot=300, seed=0)
    assert [row["name"] for row in rows] == [p.name for p in points]
    for row, point in zip(rows, points, strict=True):
        assert row["threshold"] == point.threshold  # frozen, not re-chosen on test
        sens, spec = _rates(y_test, p_test[:, 0], point.threshold)
        assert (row["sensitivity"], row["specificity"]) == (sens, spec)
        assert row["n"] == 400
        assert row["clusters"] == 200  # patients, not cases
        for key in ("sensitivity", "specificity"):
            low, high = row[f"{key}_ci"]
            assert 0 <= low < high <= 1
            assert low <= row[key] <= high
    # the same seed gives the same intervals; without groups every case is a cluster
    again = report_operating_points(y_test, p_test[:, 0], points, groups=patients, n_boot=300, seed=0)
    assert [r["sensitivity_ci"] for r in again] == [r["sensitivity_ci"] for r in rows]
    assert report_operating_points(y_test, p_test[:, 0], points, n_boot=50)[0]["clusters"] == 400


def test_report_without_bootstrap_has_nan_cis():
    y_val, p_val, _ = scored_cases(100, seed=3)
    y_test, p_test, patients = scored_cases(100, seed=4)
    points = choose_thresholds(y_val, p_val[:, 0])
    rows = report_operating_points(y_test, p_test[:, 0], points, groups=patients, n_boot=0)
    for row in rows:
        assert np.isfinite(row["sensitivity"]) and np.isfinite(row["specificity"])
        assert all(np.isnan(v) for v in (*row["sensitivity_ci"], *row["specificity_ci"]))


# --- The leakage test: nothing fitted sees the test labels -----------------------------------------


def test_test_labels_never_move_the_thresholds():
    y_val, p_val, _ = scored_cases(150, seed=5, members=4)
    y_test, p_test, patients = scored_cases(150, seed=6, members=4)
    policy = DecisionPolicy.fit(y_val, p_val)
    frozen = policy.to_dict()

    def frame(labels):
        return pd.DataFrame({"label": labels, "prob": p_test.mean(axis=1), "patient_id": patients})

    shuffled = np.random.default_rng(0).permutation(y_test)
    results = [assess(frame(labels), p_test, policy, n_boot=20) for labels in (y_test, 1 - y_test, shuffled)]
    truth = results[0]
    for result in results:
        assert result["policy"] == frozen
        assert [row["threshold"] for row in result["operating_points"]] == [
            p.threshold for p in policy.operating_points
        ]
        assert [row["val_sensitivity"] for row in result["operating_points"]] == [
            p.val_sensitivity for p in policy.operating_points
        ]
        assert result["policy"]["calibration"]["temperature"] == policy.calibration.temperature
        assert result["referral"]["cutoff"] == policy.referral_cutoff
        assert result["referral"]["referred"] == truth["referral"]["referred"]  # referral ignores labels too
    assert policy.to_dict() == frozen  # assess changed nothing
    sensitivities = [[row["sensitivity"] for row in r["operating_points"]] for r in results]
    assert sensitivities[0] != sensitivities[1]
    assert sensitivities[0] != sensitivities[2]
    # with the true labels the model works; with flipped labels it is worse than chance
    assert min(sensitivities[0]) > max(sensitivities[1])
