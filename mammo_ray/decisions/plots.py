"""Figures of ``policy.assess``: reliability diagrams, precision-recall curves, referral curves.

Built like ``train.plots`` (``matplotlib.figure.Figure``, never pyplot; the disclaimer stamped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from mammo_ray.train.plots import _save


def plot_reliability(levels: dict[str, dict[str, Any]], path: str | Path, *, title: str = "Reliability") -> Path:
    """One panel per level (image, exam): fraction malignant against mean probability per equal-mass
    bin, before and after calibration, with the diagonal of perfect calibration."""
    fig = Figure(figsize=(5.2 * len(levels), 5.0))
    for k, (name, level) in enumerate(levels.items()):
        ax = fig.add_subplot(1, len(levels), k + 1)
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
        for key, what, ece in (
            ("reliability", "model", level["ece"]),
            ("reliability_calibrated", "calibrated", level["ece_calibrated"]),
        ):
            bins = level[key]
            ax.plot(
                [b["mean_probability"] for b in bins],
                [b["fraction_positive"] for b in bins],
                marker="o",
                label=f"{what} (ECE {ece:.3f})",
            )
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="mean predicted probability",
            ylabel="fraction malignant",
            title=f"{title}: per {name} (n={level['n']}, {level['ece_bins']} equal-mass bins)",
        )
        ax.title.set_fontsize(9)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_precision_recall(curves: dict[str, tuple[Any, Any, float]], path: str | Path, *, title: str) -> Path:
    """Precision-recall curves, ``name -> (labels, probabilities, average precision)`` (per image, per exam)."""
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    for name, (labels, probs, average_precision) in curves.items():
        y = np.asarray(labels, dtype=np.int64)
        if 0 < y.sum() < y.size:
            precision, recall, _ = precision_recall_curve(y, probs)
            line = ax.step(recall, precision, where="post", label=f"{name} (AP = {average_precision:.3f})")
            ax.axhline(y.mean(), color=line[0].get_color(), linestyle=":", linewidth=1, label=f"{name} prevalence")
    ax.legend(loc="lower left", fontsize=8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title)
    fig.tight_layout()
    return _save(fig, path)


def plot_referral(
    curves: dict[str, dict[str, list[float]]], path: str | Path, *, title: str, cutoff_rate: float
) -> Path:
    """AUC and accuracy of the retained cases against the share referred, one line per ranking."""
    fig = Figure(figsize=(10.5, 4.6))
    for k, metric in enumerate(("auc", "accuracy")):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, curve in curves.items():
            ax.plot(np.asarray(curve["rates"]) * 100, curve[metric], marker=".", label=curve.get("label", name))
        ax.axvline(cutoff_rate * 100, color="0.6", linestyle=":", linewidth=1, label=f"target {cutoff_rate:.0%}")
        ax.set(xlabel="cases referred (%)", ylabel=f"{metric.upper() if metric == 'auc' else metric} of kept cases")
        ax.set_title(f"{title}: {metric}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
