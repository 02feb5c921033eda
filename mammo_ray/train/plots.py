"""Evaluation figures logged as MLflow artifacts: ROC curves, confusion matrix, training curves.

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas, never ``pyplot``: no
global figure registry to leak into (nothing to close), no display needed, safe in Ray workers.
Each function creates the parent folder, saves a PNG (or whatever ``path``'s suffix names),
returns the path, and stamps the research-use disclaimer in a corner.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score, roc_curve

from mammo_ray.constants import DISCLAIMER
from mammo_ray.train.metrics import check_predictions

__all__ = ["plot_roc", "plot_rocs", "plot_confusion", "plot_training_curves"]

DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    """Stamp the disclaimer, write ``fig`` to ``path`` (parents created) and return the path."""
    fig.text(0.995, 0.005, DISCLAIMER, ha="right", va="bottom", fontsize=5, color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _auc_label(name: str | None, auc: float, ci: tuple[float, float] | None) -> str:
    text = "AUC n/a (one class)" if np.isnan(auc) else f"AUC = {auc:.3f}"
    if ci is not None and not np.isnan(ci[0]):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{name} ({text})" if name else text


def plot_rocs(curves: Mapping[str, Sequence[Any]], path: str | Path, *, title: str = "ROC curve") -> Path:
    """Several ROC curves on one axes, AUC (and CI) of each in the legend.

    Args:
        curves: ``name -> (labels, probs)`` or ``name -> (labels, probs, (ci_low, ci_high))``;
            an empty name gives an unnamed curve (legend shows the AUC only).
        path: where to save the figure.
        title: axes title.
    """
    if not curves:
        raise ValueError("plot_rocs: no curves given")
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        labels, probs = curve[0], curve[1]
        ci = curve[2] if len(curve) > 2 else None
        y, p = check_predictions(labels, probs)
        with warnings.catch_warnings():  # one class: sklearn warns and returns a nan axis
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            fpr, tpr, _ = roc_curve(y, p)
        auc = float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else float("nan")
        ax.plot(fpr, tpr, lw=1.8, label=_auc_label(name, auc, ci))
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.5", label="chance")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        title=title,
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(
    labels: Any,
    probs: Any,
    path: str | Path,
    *,
    label: str | None = None,
    ci: tuple[float, float] | None = None,
    title: str = "ROC curve",
) -> Path:
    """One ROC curve with its AUC (and ``ci``, e.g. ``BinaryMetrics.auc_ci``) in the legend."""
    return plot_rocs({label or "": (labels, probs, ci)}, path, title=title)


def plot_confusion(
    confusion: Any,
    path: str | Path,
    class_names: Sequence[str] = ("benign", "malignant"),
    *,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix ``[[tn, fp], [fn, tp]]`` (or a ``BinaryMetrics``) with counts and row %.

    Row percentages are the per-class recall: specificity on the benign row, sensitivity on
    the malignant row.
    """
    matrix = np.asarray(getattr(confusion, "confusion", confusion), dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(class_names):
        raise ValueError(
            f"plot_confusion: matrix of shape {matrix.shape} does not match "
            f"{len(class_names)} class names {tuple(class_names)}"
        )
    row_totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{count}\n({fractions[i, j]:.0%})",
            ha="center",
            va="center",
            color="white" if fractions[i, j] > 0.5 else "black",
        )
    ticks = np.arange(len(class_names))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="Predicted",
        ylabel="True",
        title=title,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    metrics: Sequence[str] = ("train_loss", "val_loss", "val_auc", "val_accuracy"),
    *,
    title: str = "Training curves",
) -> Path:
    """Per-epoch curves of whichever ``metrics`` the history holds.

    Losses go on the left panel, other metrics (AUC, accuracy, ...) on the right; a panel with
    nothing to show is left out. Epochs where a metric is absent or None are skipped for it.

    Args:
        history: one dict per epoch, with ``"epoch"`` (its position is used when absent).
        path: where to save the figure.
        metrics: names to plot; those found in no epoch are ignored.

    Raises:
        ValueError: when none of ``metrics`` occurs in ``history``.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name in metrics:
        points = [
            (float(row.get("epoch", i)), float(row[name])) for i, row in enumerate(history) if row.get(name) is not None
        ]
        if points:
            series[name] = tuple(map(list, zip(*points, strict=True)))  # type: ignore[assignment]
    if not series:
        raise ValueError(f"plot_training_curves: none of {list(metrics)} in the history ({len(history)} epochs)")
    panels = [group for group in ([n for n in series if "loss" in n], [n for n in series if "loss" not in n]) if group]
    fig = Figure(figsize=(5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, names in zip(axes, panels, strict=True):
        for name in names:
            epochs, values = series[name]
            ax.plot(epochs, values, marker="o", ms=3, label=name)
        ax.set(xlabel="epoch", ylabel="loss" if "loss" in names[0] else "metric")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
