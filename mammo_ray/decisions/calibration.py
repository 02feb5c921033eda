"""Can the probability be read as a probability? Brier score, expected calibration error with
equal-mass bins, and post-hoc calibration fitted on the validation split.

A network trained with cross-entropy ranks cases well (its AUC) and still says 0.95 where one
case in three is malignant. Two things tell how far off it is: the Brier score (mean squared error
of the probability, lower is better; 0.25 is a constant 0.5) and the expected calibration error:
sort the cases by probability, cut them into ``bins`` bins of equal count (equal mass: each bin
holds the same number of cases, so no bin is a handful of outliers), and average
|mean probability - fraction malignant| over the bins, weighted by their size.

Calibration maps the probability through a monotone function fitted on validation cases only:
- temperature scaling (the default): ``sigmoid(logit(p) / T)``, one parameter by maximum likelihood.
  It cannot change the ranking, so the AUC stays exactly what it was.
- isotonic regression (``sklearn``): a step function, more flexible, which needs more validation
  cases and can tie cases the raw probability told apart.
A ``Calibrator`` is plain data (``to_dict``), stored in the checkpoint and with a registered ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression

Method = Literal["temperature", "isotonic", "none"]
METHODS: tuple[str, ...] = ("temperature", "isotonic", "none")
ECE_BINS = 10  # equal-mass bins of the ECE and the reliability diagram
EPS = 1e-7  # the likelihood of temperature scaling clips its probabilities to [EPS, 1 - EPS]


def _arrays(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1], without nan")
    return y, p


def brier(labels: Any, probs: Any) -> float:
    """Mean squared error of the probability against the 0/1 label (nan for no cases)."""
    y, p = _arrays(labels, probs)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def logit(probs: Any) -> np.ndarray:
    # clipped only at 0 and 1 (to the nearest doubles inside): a wider clip would tie distinct
    # probabilities, and temperature scaling would then change the ranking (and the AUC)
    p = np.clip(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny, 1 - np.finfo(np.float64).epsneg)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-mass bin: its cases, their mean probability and their fraction malignant."""

    n: int
    mean_probability: float
    fraction_positive: float
    low: float  # the lowest and highest probability in the bin
    high: float


def reliability_bins(labels: Any, probs: Any, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """The cases sorted by probability and cut into ``min(bins, n)`` bins of (almost) equal count.

    Cases of equal probability stay in one bin (a cut inside such a run moves to its start), so the
    bins do not depend on the cases' order; where probabilities tie there are fewer, unequal bins.
    """
    y, p = _arrays(labels, probs)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    order = np.argsort(p, kind="stable")
    cuts = np.cumsum([chunk.size for chunk in np.array_split(order, max(1, min(bins, y.size)))])[:-1]
    cuts = np.searchsorted(p[order], p[order][cuts], side="left")
    return [
        ReliabilityBin(
            n=int(chunk.size),
            mean_probability=float(p[chunk].mean()),
            fraction_positive=float(y[chunk].mean()),
            low=float(p[chunk].min()),
            high=float(p[chunk].max()),
        )
        for chunk in np.split(order, cuts)
        if chunk.size
    ]


def expected_calibration_error(labels: Any, probs: Any, bins: int = ECE_BINS) -> float:
    """Size-weighted mean of |mean probability - fraction malignant| over equal-mass bins (nan: no cases)."""
    found = reliability_bins(labels, probs, bins)
    total = sum(b.n for b in found)
    if not total:
        return float("nan")
    return float(sum(b.n * abs(b.mean_probability - b.fraction_positive) for b in found) / total)


@dataclass(frozen=True)
class Calibrator:
    """A monotone map of the model's probability, fitted on validation cases (``fit``)."""

    method: str = "none"
    temperature: float = 1.0  # temperature scaling: p -> sigmoid(logit(p) / T)
    knots_x: tuple[float, ...] = ()  # isotonic: the step function's knots (raw -> calibrated),
    knots_y: tuple[float, ...] = ()  # interpolated linearly between them and clipped at the ends
    fitted_on: dict[str, Any] = field(default_factory=dict)  # split, cases, positives

    @classmethod
    def fit(cls, labels: Any, probs: Any, method: str = "temperature", *, split: str = "val") -> Calibrator:
        """Fit ``method`` on ``labels`` / ``probs`` (the validation split's: never the test split's).

        Raises:
            ValueError: an unknown method, or cases without both classes (nothing to fit).
        """
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
        y, p = _arrays(labels, probs)
        fitted_on = {"split": split, "n": int(y.size), "positives": int(y.sum())}
        if method == "none":
            return cls("none", fitted_on=fitted_on)
        if not 0 < y.sum() < y.size:
            raise ValueError(
                f"calibration needs both classes in the {split} split; it has {int(y.sum())} positive(s) of {y.size}"
            )
        if method == "temperature":
            z = logit(p)

            def nll(log_t: float) -> float:
                q = np.clip(sigmoid(z / np.exp(log_t)), EPS, 1 - EPS)
                return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

            best = minimize_scalar(nll, bounds=(np.log(0.02), np.log(50.0)), method="bounded")
            return cls("temperature", temperature=float(np.exp(best.x)), fitted_on=fitted_on)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return cls(
            "isotonic",
            knots_x=tuple(float(v) for v in iso.X_thresholds_),
            knots_y=tuple(float(v) for v in iso.y_thresholds_),
            fitted_on=fitted_on,
        )

    def __call__(self, probs: Any) -> np.ndarray:
        """The calibrated probabilities (same shape as ``probs``)."""
        p = np.asarray(probs, dtype=np.float64)
        if self.method == "temperature":
            return sigmoid(logit(p) / self.temperature)
        if self.method == "isotonic":
            return np.interp(p, self.knots_x, self.knots_y)
        return p.copy()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "temperature": self.temperature,
            "knots_x": list(self.knots_x),
            "knots_y": list(self.knots_y),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibrator:
        if values.get("method") not in METHODS:
            raise ValueError(f"calibration: unknown method {values.get('method')!r}; expected one of {METHODS}")
        return cls(
            method=values["method"],
            temperature=float(values.get("temperature", 1.0)),
            knots_x=tuple(values.get("knots_x", ())),
            knots_y=tuple(values.get("knots_y", ())),
            fitted_on=dict(values.get("fitted_on", {})),
        )
