"""Referral by ensemble uncertainty, end to end on trained networks (mammo_ray.decisions.referral and .policy).

Synthetic 16x16 one-channel images of Gaussian noise: a positive case has a bright Gaussian blob
(amplitude ``AMPLITUDE``, at a random place), a negative case none. A quarter of the cases are made
ambiguous on purpose: their blob has half the amplitude and their label is a coin flip, so no network
can be sure of them. An ensemble of ``MEMBERS`` small CNNs, each with its own torch seed and its own
bootstrap resample of the training set, is actually trained (plain torch, Adam, a few epochs), and
its probabilities on a validation and a test split go through the decisions code. The test shows that

(a) every uncertainty measure a policy can refer by (the entropy of the mean, the members' mutual
    information and their standard deviation) ranks the ambiguous test cases above the clear ones
    (ROC AUC of the measure against ``is_ambiguous`` > 0.85; over data seeds 0-4 entropy gave
    0.94-0.96, std 0.92-0.95 and mutual information, the lowest, 0.90-0.93);
(b) the AUC of the cases kept rises with the share referred by entropy (0% -> 10% -> 20%), and at
    20% it beats random referral, which keeps the AUC where it was;
(c) a ``DecisionPolicy`` fitted on the validation split only, with ``referral_rate=0.2``, refers
    about 20% of the test cases, most of the ambiguous ones and few of the clear ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mammo_ray.decisions.policy import DecisionPolicy
from mammo_ray.decisions.referral import MEASURES, member_uncertainty, random_referral_curve, referral_curve

pytestmark = pytest.mark.slow

SIZE = 16  # image side, pixels
AMPLITUDE = 3.0  # a clear positive's blob, in units of the noise's standard deviation
BLOB_SIGMA = 1.5  # the blob's width, pixels
AMBIGUOUS_SHARE = 0.25
MEMBERS = 5
EPOCHS = 20
BATCH = 50
SEED = 0  # of the data; seeds 0-4 were checked (see the module docstring)
RATES = (0.0, 0.1, 0.2)


def images(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images (n, 1, SIZE, SIZE), labels, is_ambiguous): a clear case has a blob of AMPLITUDE and label 1,
    or no blob and label 0; an ambiguous case has a blob of AMPLITUDE / 2 and a label drawn 50/50."""
    rng = np.random.default_rng(seed)
    ambiguous = rng.random(n) < AMBIGUOUS_SHARE
    labels = rng.integers(0, 2, n)
    amplitude = np.where(ambiguous, AMPLITUDE / 2, AMPLITUDE * labels)
    cy, cx = rng.uniform(4, SIZE - 4, (2, n))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * BLOB_SIGMA**2))
    pixels = amplitude[:, None, None] * blob + rng.normal(0, 1, (n, SIZE, SIZE))
    return torch.tensor(pixels[:, None], dtype=torch.float32), labels, ambiguous


def member(x: torch.Tensor, y: np.ndarray, seed: int) -> nn.Module:
    """One CNN (two convolutions, global max pooling, a linear logit) trained on a bootstrap resample."""
    torch.manual_seed(seed)
    pick = np.random.default_rng(1000 + seed).integers(0, len(y), len(y))
    xb, yb = x[pick], torch.tensor(y[pick], dtype=torch.float32)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(yb), generator=order)
        for start in range(0, len(yb), BATCH):
            batch = perm[start : start + BATCH]
            loss = nn.functional.binary_cross_entropy_with_logits(net(xb[batch]).squeeze(1), yb[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def ensemble():
    """Validation and test (labels, is_ambiguous, member probabilities (cases, MEMBERS)) of a trained ensemble."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_train, y_train, _ = images(600, SEED)
        x_val, y_val, amb_val = images(300, SEED + 1)
        x_test, y_test, amb_test = images(300, SEED + 2)
        nets = [member(x_train, y_train, seed=10 * SEED + m) for m in range(MEMBERS)]
        with torch.no_grad():
            val = np.stack([torch.sigmoid(net(x_val)).squeeze(1).numpy() for net in nets], axis=1)
            test = np.stack([torch.sigmoid(net(x_test)).squeeze(1).numpy() for net in nets], axis=1)
    finally:
        torch.set_num_threads(threads)
    return {"val": (y_val, amb_val, val), "test": (y_test, amb_test, test)}


def test_the_members_learned_the_clear_cases(ensemble):
    labels, ambiguous, probs = ensemble["test"]
    assert probs.shape == (300, MEMBERS)
    assert 0.15 < ambiguous.mean() < 0.35
    for m in range(MEMBERS):  # otherwise nothing below would say anything about trained networks
        assert roc_auc_score(labels[~ambiguous], probs[~ambiguous, m]) > 0.95


@pytest.mark.parametrize("measure", MEASURES)
def test_uncertainty_ranks_ambiguous_cases_above_clear_ones(ensemble, measure):
    _, ambiguous, probs = ensemble["test"]
    uncertainty = member_uncertainty(probs).measure(measure)
    assert roc_auc_score(ambiguous, uncertainty) > 0.85


def test_referring_by_entropy_raises_the_kept_auc_and_beats_random(ensemble):
    labels, _, probs = ensemble["test"]
    u = member_uncertainty(probs)
    curve = referral_curve(labels, u.mean, u.entropy, rates=RATES)
    random = random_referral_curve(labels, u.mean, rates=RATES, repeats=200, seed=0)
    auc = dict(zip(curve["rates"], curve["auc"], strict=True))
    random_auc = dict(zip(random["rates"], random["auc"], strict=True))
    assert curve["kept"] == [300, 270, 240]
    assert auc[0.0] == pytest.approx(roc_auc_score(labels, u.mean))
    assert auc[0.0] < auc[0.1] < auc[0.2]
    assert auc[0.2] > auc[0.0] + 0.01
    assert auc[0.2] > random_auc[0.2] + 0.01
    assert random_auc[0.2] == pytest.approx(auc[0.0], abs=0.01)  # random referral keeps the AUC where it was


def test_policy_fitted_on_validation_refers_the_ambiguous_cases(ensemble):
    val_labels, _, val_probs = ensemble["val"]
    _, ambiguous, probs = ensemble["test"]
    policy = DecisionPolicy.fit(val_labels, val_probs, referral_rate=0.2)
    assert policy.referral_measure == "entropy"
    assert np.mean(member_uncertainty(val_probs).entropy > policy.referral_cutoff) == pytest.approx(0.2, abs=0.01)
    u = member_uncertainty(probs)
    referred = np.array([policy.refer(u.row(i))["refer"] for i in range(len(probs))])
    assert 0.1 < referred.mean() < 0.3  # the validation cut-off carries over to the test split
    assert referred[ambiguous].mean() > 0.5
    assert referred[~ambiguous].mean() < 0.15
    assert referred[ambiguous].mean() > 4 * referred[~ambiguous].mean()
