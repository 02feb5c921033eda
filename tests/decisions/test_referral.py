"""Ensemble uncertainty and referral (mammo_ray.decisions.referral): std, entropy and mutual information of
known member configurations; a simulated ensemble whose ambiguous cases its uncertainty finds; referral
curves that beat random referral; the referral cut-off's share of cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray.decisions.referral import (
    MEASURES,
    REFERRAL_RATES,
    binary_entropy,
    confidence_uncertainty,
    member_uncertainty,
    random_referral_curve,
    referral_curve,
    referral_cutoff,
)

# --- member_uncertainty on known configurations ----------------------------------------------------


def test_binary_entropy_known_values():
    assert binary_entropy(np.array([0.0, 0.5, 1.0])) == pytest.approx([0.0, 1.0, 0.0], abs=1e-9)
    assert binary_entropy(np.array([0.1, 0.9])) == pytest.approx([0.4689956] * 2, abs=1e-6)


def test_identical_members_have_no_disagreement():
    probs = np.repeat(np.array([[0.05], [0.3], [0.5], [0.8], [0.99]]), 7, axis=1)  # 5 cases, 7 equal members
    u = member_uncertainty(probs)
    assert u.mean == pytest.approx(probs[:, 0])
    assert u.std == pytest.approx(np.zeros(5), abs=1e-12)
    assert u.mutual_information == pytest.approx(np.zeros(5), abs=1e-12)
    assert (u.mutual_information >= 0).all()
    assert u.entropy == pytest.approx(binary_entropy(u.mean))
    assert u.expected_entropy == pytest.approx(u.entropy)


def test_members_split_between_two_sure_answers_have_high_mutual_information():
    probs = np.array([[0.1] * 5 + [0.9] * 5, [0.9, 0.1] * 5])
    u = member_uncertainty(probs)
    assert u.mean == pytest.approx([0.5, 0.5])
    assert u.std == pytest.approx([0.4, 0.4])
    assert u.entropy == pytest.approx([1.0, 1.0])
    assert u.expected_entropy == pytest.approx(binary_entropy(np.array([0.1, 0.1])))
    assert (u.mutual_information > 0.4).all()
    assert u.mutual_information == pytest.approx(1.0 - binary_entropy(np.array([0.1, 0.1])))
    assert u.row(0) == pytest.approx(
        {
            "std": 0.4,
            "entropy": 1.0,
            "expected_entropy": binary_entropy(0.1),
            "mutual_information": 1 - binary_entropy(0.1),
        }
    )


def test_one_member_has_no_mutual_information():
    u = member_uncertainty(np.array([[0.2], [0.5], [0.7]]))
    assert u.mutual_information == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert u.std == pytest.approx([0.0, 0.0, 0.0])
    assert u.entropy == pytest.approx(binary_entropy(np.array([0.2, 0.5, 0.7])))


def test_member_uncertainty_refuses_a_flat_array_and_unknown_measures():
    with pytest.raises(ValueError, match=r"\(cases, members\)"):
        member_uncertainty(np.array([0.2, 0.4]))
    with pytest.raises(ValueError, match="unknown uncertainty measure 'variance'"):
        member_uncertainty(np.array([[0.2, 0.4]])).measure("variance")


def test_confidence_uncertainty():
    assert confidence_uncertainty([0.0, 0.25, 0.5, 0.9, 1.0]) == pytest.approx([0.0, 0.25, 0.5, 0.1, 0.0])


# --- A simulated ensemble: ambiguous cases against clear ones -------------------------------------


@pytest.fixture(scope="module")
def ensemble():
    """10 members on 600 cases: 20% ambiguous (members scattered around 0.5, labels random), the rest
    clear (members agree, on the label's side, except 10% of cases where they agree on the wrong one)."""
    rng = np.random.default_rng(0)
    n, members = 600, 10
    ambiguous = np.zeros(n, dtype=bool)
    ambiguous[rng.choice(n, n // 5, replace=False)] = True
    labels = rng.integers(0, 2, n)
    side = np.where(rng.random(n) < 0.1, 1 - labels, labels)  # confident errors among the clear cases
    center = np.where(ambiguous, rng.normal(0, 0.3, n), 3.0 * (2 * side - 1))
    spread = np.where(ambiguous, 1.2, 0.4)
    logits = center[:, None] + spread[:, None] * rng.normal(size=(n, members))
    return labels, 1 / (1 + np.exp(-logits)), ambiguous


def test_uncertainty_ranks_ambiguous_cases_first(ensemble):
    labels, probs, ambiguous = ensemble
    u = member_uncertainty(probs)
    for measure in MEASURES:
        assert roc_auc_score(ambiguous, u.measure(measure)) > 0.9, measure
    assert u.mutual_information[ambiguous].mean() > 10 * u.mutual_information[~ambiguous].mean()
    # a single member's confidence finds them too, but the ensemble's entropy does at least as well
    single = roc_auc_score(ambiguous, confidence_uncertainty(probs[:, 0]))
    assert roc_auc_score(ambiguous, u.entropy) >= single


def test_referral_curve_rises_and_beats_random_referral(ensemble):
    labels, probs, _ = ensemble
    u = member_uncertainty(probs)
    curve = referral_curve(labels, u.mean, u.entropy)
    assert curve["rates"] == list(REFERRAL_RATES)
    assert curve["kept"] == [int(round((1 - r) * labels.size)) for r in REFERRAL_RATES]
    at = {rate: i for i, rate in enumerate(curve["rates"])}
    assert curve["auc"][at[0.0]] == pytest.approx(roc_auc_score(labels, u.mean))  # nothing referred
    assert curve["auc"][at[0.2]] > curve["auc"][at[0.0]] + 0.01
    assert curve["accuracy"][at[0.2]] > curve["accuracy"][at[0.0]] + 0.05
    chance = random_referral_curve(labels, u.mean, rates=(0.0, 0.2), repeats=50)
    assert chance["kept"] == [600, 480]
    assert chance["auc"][0] == pytest.approx(curve["auc"][at[0.0]])
    assert curve["auc"][at[0.2]] > chance["auc"][1] + 0.01
    assert abs(chance["auc"][1] - chance["auc"][0]) < 0.01  # random referral keeps the AUC, in expectation


def test_referral_curve_breaks_ties_at_random_not_by_row_order():
    labels = np.repeat([1, 0], 50)
    probs = np.where(labels == 1, 0.9, 0.1)
    probs[:10] = 0.05  # the first rows are errors
    flat = np.zeros(100)  # every case equally uncertain
    curve = referral_curve(labels, probs, flat, rates=(0.0, 0.5), seed=1)
    # row order would refer the last 50 (all negatives) and keep one class only (nan AUC)
    assert np.isfinite(curve["auc"][1])
    assert curve["kept"] == [100, 50]


# --- The referral cut-off --------------------------------------------------------------------------


def test_referral_cutoff_leaves_the_rate_above_it():
    u = np.random.default_rng(1).random(1000)
    for rate in (0.05, 0.1, 0.25):
        cutoff = referral_cutoff(u, rate)
        assert (u > cutoff).mean() == pytest.approx(rate, abs=0.002)
    assert referral_cutoff(u, 0.0) == u.max()
    assert not (u > referral_cutoff(u, 0.0)).any()


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_referral_cutoff_refuses_a_bad_rate(rate):
    with pytest.raises(ValueError, match=r"referral rate must be in \[0, 1\)"):
        referral_cutoff([0.1, 0.2], rate)


def test_referral_cutoff_needs_cases():
    with pytest.raises(ValueError, match="needs validation cases"):
        referral_cutoff([], 0.1)
