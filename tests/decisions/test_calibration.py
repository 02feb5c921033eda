"""Calibration (mammo_ray.decisions.calibration): Brier score and equal-mass ECE on hand-computed cases,
and temperature / isotonic calibration fitted on a validation sample and judged on a separate test
sample of a known over-confident model (true logit times 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray.decisions.calibration import (
    Calibrator,
    brier,
    expected_calibration_error,
    reliability_bins,
    sigmoid,
)

OVERCONFIDENCE = 5.0  # the model's logit is the true logit times this: temperature scaling should find it


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, model probabilities): q ~ U(0.02, 0.98), label ~ Bernoulli(q), prob = sigmoid(5 logit(q))."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, n)
    labels = rng.binomial(1, q)
    return labels, sigmoid(OVERCONFIDENCE * np.log(q / (1 - q)))


@pytest.fixture(scope="module")
def val_test():
    return overconfident(3000, seed=0), overconfident(3000, seed=1)


# --- Brier score and ECE: exact small cases --------------------------------------------------------


def test_brier_known_values():
    assert brier([0, 1], [0.5, 0.5]) == 0.25
    assert brier([0, 1], [0.0, 1.0]) == 0.0
    assert brier([1, 0], [0.0, 1.0]) == 1.0
    assert brier([1, 1, 0, 0], [0.9, 0.6, 0.2, 0.0]) == pytest.approx((0.01 + 0.16 + 0.04 + 0.0) / 4)
    assert np.isnan(brier([], []))


def test_perfectly_calibrated_constant_has_zero_ece_in_any_case_order():
    """Half the cases malignant, every probability 0.5: calibrated, whatever order the rows come in
    (the equal-mass bins must not cut a run of tied probabilities by row order)."""
    probs = np.full(100, 0.5)
    for labels in (np.repeat([1, 0], 50), np.repeat([0, 1], 50), np.tile([0, 1], 50)):
        assert expected_calibration_error(labels, probs) == 0.0
        assert len(reliability_bins(labels, probs)) == 1


def test_ece_by_hand_two_bins():
    # sorted: bin 1 = {0.1, 0.2, 0.6} (labels 0, 0, 1), bin 2 = {0.7, 0.9} (labels 0, 1)
    # bin 1: |0.3 - 1/3| * 3 = 0.1; bin 2: |0.8 - 0.5| * 2 = 0.6; ECE = 0.7 / 5 = 0.14
    probs = np.array([0.9, 0.1, 0.7, 0.6, 0.2])  # unsorted on purpose
    labels = np.array([1, 0, 0, 1, 0])
    found = reliability_bins(labels, probs, bins=2)
    assert [b.n for b in found] == [3, 2]
    assert found[0].mean_probability == pytest.approx(0.3)
    assert found[0].fraction_positive == pytest.approx(1 / 3)
    assert (found[0].low, found[0].high) == (0.1, 0.6)
    assert found[1].mean_probability == pytest.approx(0.8)
    assert found[1].fraction_positive == 0.5
    assert (found[1].low, found[1].high) == (0.7, 0.9)
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx(0.14)
    assert expected_calibration_error(labels, probs, bins=1) == pytest.approx(abs(2.5 / 5 - 2 / 5))


@pytest.mark.parametrize("n", [1, 3, 7, 10, 23, 100, 1001])
def test_reliability_bins_are_equal_mass(n):
    rng = np.random.default_rng(n)
    probs = rng.random(n)  # distinct probabilities
    labels = rng.integers(0, 2, n)
    found = reliability_bins(labels, probs, bins=10)
    sizes = [b.n for b in found]
    assert len(found) == min(10, n)
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    for before, after in zip(found, found[1:], strict=False):  # sorted by probability, no overlap
        assert before.high < after.low
    weighted = sum(b.n * abs(b.mean_probability - b.fraction_positive) for b in found) / n
    assert expected_calibration_error(labels, probs, bins=10) == pytest.approx(weighted)


def test_tied_probabilities_share_a_bin():
    probs = np.repeat([0.2, 0.8], 4)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    found = reliability_bins(labels, probs, bins=3)
    assert [b.n for b in found] == [4, 4]
    assert [b.fraction_positive for b in found] == [0.25, 0.75]
    assert expected_calibration_error(labels, probs, bins=3) == pytest.approx(0.05)
    # the same cases in another row order give the same ECE
    assert expected_calibration_error(labels[::-1], probs[::-1], bins=3) == pytest.approx(0.05)


def test_ece_without_cases_is_nan():
    assert np.isnan(expected_calibration_error([], []))
    assert reliability_bins([], []) == []


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.1, np.nan], "nan"),
        ([0, 1], [0.1], "length"),
    ],
)
def test_bad_inputs_are_refused(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        brier(labels, probs)
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(labels, probs)


def test_reliability_bins_needs_a_bin():
    with pytest.raises(ValueError, match="bins must be >= 1"):
        reliability_bins([0, 1], [0.2, 0.7], bins=0)


# --- Calibrators fitted on validation, judged on test ----------------------------------------------


def test_temperature_scaling_undoes_overconfidence(val_test):
    (y_val, p_val), (y_test, p_test) = val_test
    calibrator = Calibrator.fit(y_val, p_val, "temperature")
    assert calibrator.method == "temperature"
    assert 4.0 < calibrator.temperature < 6.0
    assert calibrator.fitted_on == {"split": "val", "n": 3000, "positives": int(y_val.sum())}

    calibrated = calibrator(p_test)
    ece_raw = expected_calibration_error(y_test, p_test)
    ece_cal = expected_calibration_error(y_test, calibrated)
    assert ece_raw > 0.1  # the model really is over-confident
    assert ece_cal < 0.5 * ece_raw
    assert brier(y_test, calibrated) < brier(y_test, p_test) - 0.02
    # monotone: the ranking, so the AUC, is exactly what it was (raw probabilities reach ~1e-9 here)
    assert p_test.min() < 1e-7
    assert roc_auc_score(y_test, calibrated) == roc_auc_score(y_test, p_test)
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(p_test, kind="stable"))


def test_isotonic_calibration_reduces_ece(val_test):
    (y_val, p_val), (y_test, p_test) = val_test
    calibrator = Calibrator.fit(y_val, p_val, "isotonic")
    assert calibrator.method == "isotonic"
    assert len(calibrator.knots_x) == len(calibrator.knots_y) >= 2
    assert list(calibrator.knots_y) == sorted(calibrator.knots_y)  # monotone
    calibrated = calibrator(p_test)
    assert ((calibrated >= 0) & (calibrated <= 1)).all()
    assert expected_calibration_error(y_test, calibrated) < 0.5 * expected_calibration_error(y_test, p_test)
    assert brier(y_test, calibrated) < brier(y_test, p_test)


def test_temperature_below_one_for_an_underconfident_model():
    rng = np.random.default_rng(3)
    q = rng.uniform(0.02, 0.98, 3000)
    labels = rng.binomial(1, q)
    timid = sigmoid(0.5 * np.log(q / (1 - q)))
    assert 1.5 < 1 / Calibrator.fit(labels, timid, "temperature").temperature < 2.5


@pytest.mark.parametrize("method", ["temperature", "isotonic", "none"])
def test_to_dict_round_trip_gives_identical_outputs(val_test, method):
    (y_val, p_val), (_, p_test) = val_test
    calibrator = Calibrator.fit(y_val, p_val, method)
    restored = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert restored == calibrator
    assert np.array_equal(restored(p_test), calibrator(p_test))


def test_none_is_the_identity(val_test):
    (y_val, p_val), (_, p_test) = val_test
    calibrator = Calibrator.fit(y_val, p_val, "none")
    assert calibrator.method == "none"
    out = calibrator(p_test)
    assert np.array_equal(out, p_test)
    assert out is not p_test  # a copy: the caller's array is never aliased
    assert np.array_equal(Calibrator()(p_test), p_test)


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
@pytest.mark.parametrize("label", [0, 1])
def test_fitting_on_one_class_names_the_split(method, label):
    with pytest.raises(ValueError, match="both classes in the val split; it has"):
        Calibrator.fit(np.full(50, label), np.linspace(0.1, 0.9, 50), method)
    with pytest.raises(ValueError, match="the tuning split"):
        Calibrator.fit(np.full(50, label), np.linspace(0.1, 0.9, 50), method, split="tuning")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown calibration method 'platt'"):
        Calibrator.fit([0, 1], [0.2, 0.8], "platt")
    with pytest.raises(ValueError, match="unknown method 'platt'"):
        Calibrator.from_dict({"method": "platt"})
