"""When should the model say "I don't know"? The ensemble's uncertainty, and referral by it.

An ensemble's M members give M probabilities per case. Their spread says how much the members
disagree (``std``), and information theory splits the total uncertainty of the mean prediction
(its entropy) into two parts: the expected entropy of the members (aleatoric: each member is
unsure, the case is ambiguous) and the mutual information between the members and the
prediction (epistemic: the members are each sure, of different things). All in bits, in [0, 1].

Referral hands the most uncertain cases to a reader: a cut-off is chosen on the validation split
so that a target share of cases (10% by default) lies above it, and a case above it is referred.
``referral_curve`` shows what that buys: AUC and accuracy on the cases kept, against the share
referred (0 to 50%). Two baselines go beside it: the best single member's own confidence
|p - 0.5| (what a single network can do), and random referral (which keeps the AUC where it was,
in expectation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mammo_ray.train.metrics import auc_of_weights

MEASURES = ("entropy", "mutual_information", "std")  # what ``refer`` can rank cases by
REFERRAL_RATES = tuple(round(r, 2) for r in np.arange(0.0, 0.501, 0.05))  # the curve's x axis
DEFAULT_REFERRAL_RATE = 0.10


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p): 0 at p in {0, 1}, 1 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


@dataclass(frozen=True)
class Uncertainty:
    """Per case: the members' mean probability and the measures of their uncertainty."""

    mean: np.ndarray
    std: np.ndarray  # the members' standard deviation
    entropy: np.ndarray  # total: the entropy of the mean probability
    expected_entropy: np.ndarray  # aleatoric: the members' mean entropy
    mutual_information: np.ndarray  # epistemic: entropy - expected entropy (0 for one member)

    def measure(self, name: str) -> np.ndarray:
        if name not in MEASURES:
            raise ValueError(f"unknown uncertainty measure {name!r}; expected one of {MEASURES}")
        return getattr(self, name)

    def row(self, i: int) -> dict[str, float]:
        """Case ``i`` as JSON (``/v1/predict``'s ``uncertainty``)."""
        return {
            "std": float(self.std[i]),
            "entropy": float(self.entropy[i]),
            "expected_entropy": float(self.expected_entropy[i]),
            "mutual_information": float(self.mutual_information[i]),
        }


def member_uncertainty(member_probs: Any) -> Uncertainty:
    """The uncertainty of every case from its members' probabilities, ``(cases, members)``."""
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"member probabilities must be (cases, members), got shape {probs.shape}")
    mean = probs.mean(axis=1)
    total = binary_entropy(mean)
    expected = binary_entropy(probs).mean(axis=1)
    return Uncertainty(
        mean=mean,
        std=probs.std(axis=1),
        entropy=total,
        expected_entropy=expected,
        mutual_information=np.clip(total - expected, 0.0, None),
    )


def referral_cutoff(uncertainty: Any, rate: float = DEFAULT_REFERRAL_RATE) -> float:
    """The cut-off above which ``rate`` of these (validation) cases lie: refer when uncertainty > cut-off."""
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    if not 0 <= rate < 1:
        raise ValueError(f"the referral rate must be in [0, 1), got {rate}")
    if not u.size:
        raise ValueError("a referral cut-off needs validation cases")
    return float(np.quantile(u, 1 - rate)) if rate > 0 else float(u.max())


def _kept_metrics(y: np.ndarray, p: np.ndarray, keep: np.ndarray, threshold: float) -> tuple[float, float]:
    yk, pk = y[keep], p[keep]
    auc = float(roc_auc_score(yk, pk)) if 0 < yk.sum() < yk.size else float("nan")
    return auc, float(((pk >= threshold) == yk).mean()) if yk.size else float("nan")


def referral_curve(
    labels: Any,
    probs: Any,
    uncertainty: Any,
    *,
    rates: tuple[float, ...] = REFERRAL_RATES,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """AUC and accuracy (at ``threshold``) of the cases kept when the most uncertain share ``rate`` is
    referred, for each rate. Ties in uncertainty are broken at random (``seed``), not by case order."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    order = np.lexsort((np.random.default_rng(seed).random(y.size), u))  # most certain first
    auc, accuracy, kept = [], [], []
    for rate in rates:
        keep = order[: int(round((1 - rate) * y.size))]
        a, acc = _kept_metrics(y, p, keep, threshold)
        auc.append(a)
        accuracy.append(acc)
        kept.append(int(keep.size))
    return {"rates": list(rates), "auc": auc, "accuracy": accuracy, "kept": kept}


def random_referral_curve(
    labels: Any,
    probs: Any,
    *,
    rates: tuple[float, ...] = REFERRAL_RATES,
    threshold: float = 0.5,
    repeats: int = 200,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """``referral_curve`` of random referral: the mean over ``repeats`` random choices of who is referred.

    All repeats of a rate at once: each is a 0/1 weight row over the cases, and ``auc_of_weights``
    gives the AUC of every row in one pass (the weighted Mann-Whitney statistic)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    correct = ((p >= threshold) == y).astype(np.float64)
    auc_of = auc_of_weights(y, p)
    ranks = np.argsort(np.random.default_rng(seed).random((repeats, y.size)), axis=1)  # a random order per repeat
    auc, accuracy, kept = [], [], []
    for rate in rates:
        n_kept = int(round((1 - rate) * y.size))
        weights = (ranks < n_kept).astype(np.float64)  # (repeats, cases): 1 where the case is kept
        with np.errstate(invalid="ignore", divide="ignore"):
            auc.append(float(np.nanmean(auc_of(weights))) if n_kept else float("nan"))
            accuracy.append(float((weights @ correct).mean() / n_kept) if n_kept else float("nan"))
        kept.append(n_kept)
    return {"rates": list(rates), "auc": auc, "accuracy": accuracy, "kept": kept}


def confidence_uncertainty(probs: Any) -> np.ndarray:
    """A single network's own uncertainty: 0.5 - |p - 0.5| (referring the least confident first)."""
    return 0.5 - np.abs(np.asarray(probs, dtype=np.float64) - 0.5)
