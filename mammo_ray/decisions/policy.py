"""The decision policy of a model, fitted on the validation split, and its report on another split.

``DecisionPolicy.fit`` sees the validation labels and the members' validation probabilities and
nothing else. It freezes:
- the calibration (``Calibrator``: temperature scaling by default),
- the operating-point thresholds, on the calibrated probability (``choose_thresholds``),
- the referral cut-off on the chosen uncertainty measure, for the target referral rate,
- which member is best by validation AUC (the single-network baseline of the referral curve).
It is plain data (``to_dict``): stored in a checkpoint (``payload["decisions"]``) and with a
registered ensemble, so evaluation, ``mammo_ray.load`` and the Serve app apply the same numbers.

``assess`` applies a frozen policy to a split (the test split) and reports, at image and exam level,
the Brier score and ECE before and after calibration, average precision, the operating points with
patient-bootstrap CIs, and the referral curves. Nothing in it changes the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from mammo_ray.decisions.calibration import ECE_BINS, Calibrator, brier, expected_calibration_error, reliability_bins
from mammo_ray.decisions.operating_points import OperatingPoint, choose_thresholds, report_operating_points
from mammo_ray.decisions.referral import (
    DEFAULT_REFERRAL_RATE,
    MEASURES,
    confidence_uncertainty,
    member_uncertainty,
    random_referral_curve,
    referral_curve,
    referral_cutoff,
)
from mammo_ray.train.metrics import CLUSTER, exam_level

VERSION = 1  # of the stored policy's layout


@dataclass(frozen=True)
class DecisionPolicy:
    """Calibration, thresholds and the referral rule of one model, all from its validation split."""

    calibration: Calibrator
    operating_points: tuple[OperatingPoint, ...]
    referral_measure: str  # one of referral.MEASURES
    referral_rate: float  # the target share of referred validation cases
    referral_cutoff: float  # refer when the measure is above this
    members: int  # the members the policy was fitted for
    best_member: int  # the member with the best validation AUC (0 for one network)
    ece_bins: int = ECE_BINS

    @classmethod
    def fit(
        cls,
        labels: Any,
        member_probs: Any,
        *,
        calibration: str = "temperature",
        referral_rate: float = DEFAULT_REFERRAL_RATE,
        referral_measure: str = "entropy",
        ece_bins: int = ECE_BINS,
    ) -> DecisionPolicy:
        """Fit on validation ``labels`` and ``member_probs`` (cases, members); never on the test split."""
        if referral_measure not in MEASURES:
            raise ValueError(f"unknown referral measure {referral_measure!r}; expected one of {MEASURES}")
        y = np.asarray(labels, dtype=np.int64).ravel()
        probs = np.asarray(member_probs, dtype=np.float64)
        probs = probs[:, None] if probs.ndim == 1 else probs
        uncertainty = member_uncertainty(probs)
        calibrator = Calibrator.fit(y, uncertainty.mean, calibration, split="val")
        aucs = [roc_auc_score(y, probs[:, m]) for m in range(probs.shape[1])]
        return cls(
            calibration=calibrator,
            operating_points=tuple(choose_thresholds(y, calibrator(uncertainty.mean))),
            referral_measure=referral_measure,
            referral_rate=float(referral_rate),
            referral_cutoff=referral_cutoff(uncertainty.measure(referral_measure), referral_rate),
            members=int(probs.shape[1]),
            best_member=int(np.argmax(aucs)),
            ece_bins=int(ece_bins),
        )

    def refer(self, uncertainty: dict[str, float]) -> dict[str, Any]:
        """The referral decision of one prediction (its ``Uncertainty.row``), with its reason."""
        value = uncertainty[self.referral_measure]
        refer = bool(value > self.referral_cutoff)
        relation = "above" if refer else "at or below"
        return {
            "refer": refer,
            "reason": (
                f"{self.referral_measure} {value:.4f} is {relation} the cut-off {self.referral_cutoff:.4f}, "
                f"chosen on validation to refer {self.referral_rate:.0%} of cases"
            ),
            "measure": self.referral_measure,
            "value": float(value),
            "cutoff": self.referral_cutoff,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "fitted_on": "val",
            "calibration": self.calibration.to_dict(),
            "operating_points": [p.to_dict() for p in self.operating_points],
            "referral": {"measure": self.referral_measure, "rate": self.referral_rate, "cutoff": self.referral_cutoff},
            "members": self.members,
            "best_member": self.best_member,
            "ece_bins": self.ece_bins,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecisionPolicy:
        if values.get("version") != VERSION:
            raise ValueError(f"decision policy version {values.get('version')!r}: this mammo-ray reads {VERSION}")
        referral = values["referral"]
        return cls(
            calibration=Calibrator.from_dict(values["calibration"]),
            operating_points=tuple(OperatingPoint.from_dict(p) for p in values["operating_points"]),
            referral_measure=referral["measure"],
            referral_rate=float(referral["rate"]),
            referral_cutoff=float(referral["cutoff"]),
            members=int(values["members"]),
            best_member=int(values["best_member"]),
            ece_bins=int(values.get("ece_bins", ECE_BINS)),
        )


def _calibration_level(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, bins: int) -> dict[str, Any]:
    both = 0 < y.sum() < y.size
    before, after = reliability_bins(y, raw, bins), reliability_bins(y, calibrated, bins)
    return {
        "n": int(y.size),
        "brier": brier(y, raw),
        "brier_calibrated": brier(y, calibrated),
        "ece": expected_calibration_error(y, raw, bins),
        "ece_calibrated": expected_calibration_error(y, calibrated, bins),
        "ece_bins": len(before),  # equal-mass bins used (fewer than asked where probabilities tie)
        "ece_bins_calibrated": len(after),
        "average_precision": float(average_precision_score(y, calibrated)) if both else float("nan"),
        "prevalence": float(y.mean()) if y.size else float("nan"),
        "reliability": [vars(b) for b in before],
        "reliability_calibrated": [vars(b) for b in after],
    }


def assess(
    frame: pd.DataFrame,
    member_probs: Any,
    policy: DecisionPolicy,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The frozen ``policy`` on one split's cases.

    Args:
        frame: one row per case with ``label`` and ``prob`` (the members' mean), and ``exam_key`` /
            ``patient_id`` where known (exam level; bootstrap clusters).
        member_probs: (cases, members) probabilities in the frame's row order.
    """
    y = frame["label"].to_numpy(dtype=np.int64)
    probs = np.asarray(member_probs, dtype=np.float64)
    probs = probs[:, None] if probs.ndim == 1 else probs
    if probs.shape != (len(frame), policy.members):
        raise ValueError(
            f"member probabilities have shape {probs.shape}; the policy was fitted for {policy.members} member(s) "
            f"and the frame has {len(frame)} case(s)"
        )
    uncertainty = member_uncertainty(probs)
    calibrated = policy.calibration(uncertainty.mean)
    groups = frame[CLUSTER].to_numpy() if CLUSTER in frame.columns else None
    levels = {"image": _calibration_level(y, uncertainty.mean, calibrated, policy.ece_bins)}
    if "exam_key" in frame.columns:
        exams_raw = exam_level(frame.assign(prob=uncertainty.mean))
        exams_cal = exam_level(frame.assign(prob=calibrated))
        levels["exam"] = _calibration_level(
            exams_raw["label"].to_numpy(dtype=np.int64),
            exams_raw["prob"].to_numpy(),
            exams_cal["prob"].to_numpy(),
            policy.ece_bins,
        )
    measure = uncertainty.measure(policy.referral_measure)
    refer = measure > policy.referral_cutoff
    what = "ensemble" if policy.members > 1 else "model"
    curves = {  # by key: the policy's ranking, the single-network baseline, random referral
        "policy": {"label": f"{what} {policy.referral_measure}", **referral_curve(y, calibrated, measure, seed=seed)},
        "best_member": {
            "label": f"best member's confidence |p - 0.5| (member {policy.best_member}, by val AUC)",
            **referral_curve(
                y, probs[:, policy.best_member], confidence_uncertainty(probs[:, policy.best_member]), seed=seed
            ),
        },
        "random": {"label": "random referral", **random_referral_curve(y, calibrated, seed=seed)},
    }
    return {
        "policy": policy.to_dict(),
        "calibration": levels,
        "brier": levels["image"]["brier"],
        "ece": levels["image"]["ece"],
        "ece_calibrated": levels["image"]["ece_calibrated"],
        "operating_points": report_operating_points(
            y, calibrated, list(policy.operating_points), groups=groups, n_boot=n_boot, seed=seed
        ),
        "referral": {
            "measure": policy.referral_measure,
            "target_rate": policy.referral_rate,
            "cutoff": policy.referral_cutoff,
            "referred": int(refer.sum()),
            "referred_rate": float(refer.mean()) if refer.size else float("nan"),
            "curves": curves,
        },
    }


def retained_at(curve: dict[str, Any], rate: float) -> float:
    """A referral curve's AUC at ``rate`` (one of its rates)."""
    rates = np.asarray(curve["rates"])
    i = int(np.argmin(np.abs(rates - rate)))
    if abs(rates[i] - rate) > 1e-9:
        raise ValueError(f"the curve has no rate {rate}; it has {curve['rates']}")
    return float(curve["auc"][i])


def save_policy(policy: DecisionPolicy, path: str | Path) -> Path:
    import json

    path = Path(path)
    path.write_text(json.dumps(policy.to_dict(), indent=2))
    return path
