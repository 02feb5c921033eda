"""Operating points: the threshold that gives a screening programme its specificity (or sensitivity),
chosen on the validation split and then reported on the test split.

A threshold read off the test split's own ROC curve reports the best case, not what a deployed
model would do, so ``choose_thresholds`` sees validation labels only and returns plain numbers;
``report_operating_points`` then applies those frozen numbers to the test cases. Each test
sensitivity and specificity carries a percentile CI from the same patient-clustered bootstrap as
the AUC (``train.metrics.cluster_bootstrap``): a patient's cases are resampled together.

A case is called positive when its probability is at or above the threshold. For a specificity
target the threshold is the lowest one whose validation specificity reaches the target (the most
sensitivity it allows); for a sensitivity target, the highest one whose validation sensitivity
reaches it (the most specificity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mammo_ray.train.metrics import cluster_bootstrap

SPECIFICITY_TARGETS = (0.80, 0.90, 0.95)  # sensitivity at these specificities
SENSITIVITY_TARGETS = (0.90, 0.95)  # specificity at these sensitivities


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold frozen on validation: what it targets and what it gave there."""

    kind: str  # "specificity" (sensitivity at a fixed specificity) or "sensitivity"
    target: float
    threshold: float  # positive when probability >= threshold
    val_sensitivity: float
    val_specificity: float

    @property
    def name(self) -> str:
        other = "sensitivity" if self.kind == "specificity" else "specificity"
        return f"{other}_at_{self.kind}_{self.target:.2f}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OperatingPoint:
        return cls(**{k: values[k] for k in ("kind", "target", "threshold", "val_sensitivity", "val_specificity")})


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    called = p >= threshold
    sens = float(called[y == 1].mean()) if (y == 1).any() else float("nan")
    spec = float((~called[y == 0]).mean()) if (y == 0).any() else float("nan")
    return sens, spec


def choose_thresholds(
    labels: Any,
    probs: Any,
    specificity_targets: tuple[float, ...] = SPECIFICITY_TARGETS,
    sensitivity_targets: tuple[float, ...] = SENSITIVITY_TARGETS,
) -> list[OperatingPoint]:
    """One ``OperatingPoint`` per target, from validation ``labels`` and ``probs`` only.

    Raises:
        ValueError: the cases lack one of the classes (no specificity or no sensitivity to aim at).
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if not 0 < y.sum() < y.size:
        raise ValueError(f"operating points need both classes; the cases have {int(y.sum())} positive(s) of {y.size}")
    # every distinct probability, and one above them all (nothing called positive)
    candidates = np.append(np.unique(p), np.nextafter(p.max(), np.inf))
    negatives, positives = np.sort(p[y == 0]), np.sort(p[y == 1])
    specificity = np.searchsorted(negatives, candidates, side="left") / negatives.size  # below t: called negative
    sensitivity = 1 - np.searchsorted(positives, candidates, side="left") / positives.size
    points = []
    for target in specificity_targets:
        t = float(candidates[np.flatnonzero(specificity >= target - 1e-12)[0]])
        points.append(OperatingPoint("specificity", float(target), t, *_rates(y, p, t)))
    for target in sensitivity_targets:
        t = float(candidates[np.flatnonzero(sensitivity >= target - 1e-12)[-1]])
        points.append(OperatingPoint("sensitivity", float(target), t, *_rates(y, p, t)))
    return points


def report_operating_points(
    labels: Any,
    probs: Any,
    points: list[OperatingPoint],
    *,
    groups: Any = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each frozen threshold applied to these (test) cases: sensitivity and specificity with bootstrap CIs."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    called = np.stack([p >= point.threshold for point in points], axis=1).astype(np.float64)  # (n, k)
    true_pos = called * y[:, None]
    true_neg = (1 - called) * (1 - y)[:, None]

    def statistic(weights: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = (weights @ true_pos) / (weights @ y)[:, None]
            spec = (weights @ true_neg) / (weights @ (1 - y))[:, None]
        return np.concatenate([sens, spec], axis=1)

    cis = cluster_bootstrap(y, statistic, groups=groups, n_boot=n_boot, ci=ci, seed=seed, outputs=2 * len(points))
    out = []
    for j, point in enumerate(points):
        sens, spec = _rates(y, p, point.threshold)
        out.append(
            {
                **point.to_dict(),
                "sensitivity": sens,
                "sensitivity_ci": list(cis[j].interval),
                "specificity": spec,
                "specificity_ci": list(cis[len(points) + j].interval),
                "n": int(y.size),
                "clusters": cis[j].clusters,
            }
        )
    return out
