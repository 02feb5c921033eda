"""The decision report of one split, as ``evaluate``, ``train`` and ``ensemble`` write it.

``decision_report`` runs ``policy.assess`` and writes what people would rather see than read: the
reliability diagram (image and exam level, before and after calibration), the precision-recall
curve and the referral curves, with ``decisions_<split>.json`` beside them. Its flat ``metrics``
go to MLflow (``<split>_brier``, ``<split>_ece_calibrated``, ``<split>_sensitivity_at_specificity_0.90``,
``<split>_referral_auc_at_10``...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray.config import DecisionsConfig
from mammo_ray.decisions.plots import plot_precision_recall, plot_referral, plot_reliability
from mammo_ray.decisions.policy import DecisionPolicy, assess, retained_at
from mammo_ray.train.metrics import exam_level


def fit_policy(labels: Any, member_probs: Any, config: DecisionsConfig) -> DecisionPolicy:
    """``DecisionPolicy.fit`` with the config's ``decisions`` section (validation cases only)."""
    return DecisionPolicy.fit(
        labels,
        member_probs,
        calibration=config.calibration,
        referral_rate=config.referral_rate,
        referral_measure=config.referral_measure,
        ece_bins=config.ece_bins,
    )


def _flat(result: dict[str, Any], split: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for level, values in result["calibration"].items():
        stem = f"{split}_" if level == "image" else f"{split}_exam_"
        for key in ("brier", "brier_calibrated", "ece", "ece_calibrated", "average_precision"):
            out[f"{stem}{key}"] = float(values[key])
    for point in result["operating_points"]:
        measured = "sensitivity" if point["kind"] == "specificity" else "specificity"
        out[f"{split}_{point['name']}"] = float(point[measured])
        out[f"{split}_{point['name']}_threshold"] = float(point["threshold"])
    referral = result["referral"]
    rate = referral["target_rate"]
    for key, curve in referral["curves"].items():
        if any(abs(r - rate) < 1e-9 for r in curve["rates"]):
            out[f"{split}_referral_{key}_auc_at_{round(rate * 100)}"] = retained_at(curve, rate)
    out[f"{split}_referred_rate"] = float(referral["referred_rate"])
    return out


def decision_report(
    frame: pd.DataFrame,
    member_probs: Any,
    policy: DecisionPolicy,
    out_dir: str | Path,
    *,
    split: str,
    n_boot: int = 1000,
    seed: int = 0,
    policy_source: str = "checkpoint",
    plots: bool = True,
) -> dict[str, Any]:
    """``assess`` on ``split`` with its plots (none when ``plots`` is False) and ``decisions_<split>.json`` in
    ``out_dir``.

    ``policy_source`` says where the policy came from ("checkpoint", "registered model", "fitted on
    val now"); on the val split itself every figure is in-sample, and ``in_sample`` says so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = assess(frame, member_probs, policy, n_boot=n_boot, seed=seed)
    levels = result["calibration"]
    probs = np.asarray(member_probs, dtype=np.float64)
    calibrated = frame.assign(prob=policy.calibration(probs.mean(axis=1) if probs.ndim == 2 else probs))
    curves = {f"per image (n={levels['image']['n']})": (calibrated["label"], calibrated["prob"], levels["image"])}
    if "exam" in levels:
        exams = exam_level(calibrated)
        curves[f"per exam (n={levels['exam']['n']})"] = (exams["label"], exams["prob"], levels["exam"])
    drawn = (
        []
        if not plots
        else [
            plot_reliability(levels, out_dir / f"reliability_{split}.png", title=f"{split} split"),
            plot_precision_recall(
                {name: (y, p, level["average_precision"]) for name, (y, p, level) in curves.items()},
                out_dir / f"precision_recall_{split}.png",
                title=f"Precision-recall, {split} split (calibrated)",
            ),
            plot_referral(
                result["referral"]["curves"],
                out_dir / f"referral_{split}.png",
                title=f"Referral, {split} split",
                cutoff_rate=policy.referral_rate,
            ),
        ]
    )
    result.update(
        split=split,
        policy_source=policy_source,
        in_sample=split == "val",
        metrics=_flat(result, split),
        plots=[str(p) for p in drawn],
    )
    path = out_dir / f"decisions_{split}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    result["json"] = str(path)
    return result
