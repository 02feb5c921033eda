"""Combining ensemble members' predictions, and how much the ensemble gains (paper 000; see docs/papers.md).

Paper 000 trains an ensemble of 100 networks that differ only in their random seed and
averages their malignancy probabilities; per exam it further averages the CC and MLO views.
Here the members' prediction frames (``loop.evaluate`` on one split, same rows in the same
order) are averaged per image, then taken to the view mode's primary level (per image for
``single``, per exam for ``parallel`` and ``multimodal``, as in ``loop.summarize_predictions``).
Averaging is linear, so averaging members then views equals averaging views then members.

The report compares the ensemble with its members on the same cases: each member's AUC, the
mean member AUC with a bootstrap CI, a paired bootstrap of the gain (ensemble AUC minus mean
member AUC) and the curve of ensemble AUC against the number of members. The bootstraps are
cluster bootstraps over patients (``train.metrics``): a resample draws patients, stratified by
class, and all of a patient's cases come with them, because one patient's cases are correlated
(a frame without ``patient_id`` resamples cases). Every bootstrap draws the same resamples (same
cases, patients and ``seed``), so the three CIs are consistent and the gain is paired.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mammo_ray.train.metrics import (
    CLUSTER,
    PRIMARY_LEVEL,
    auc_of_weights,
    check_predictions,
    cluster_bootstrap,
    evaluate_predictions,
    exam_level,
    summarize_levels,
)
from mammo_ray.train.plots import _save, plot_rocs

__all__ = ["KEY_COLUMNS", "average_members", "ensemble_report", "member_matrix"]

KEY_COLUMNS = ("exam_key", "view", "patient_id", "label")  # what identifies a row (paired frames lack "view")
NAN = float("nan")


def member_matrix(frames: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray]:
    """The shared key columns (of member 0) and the (rows, members) probability matrix.

    Raises ValueError naming the member (and the first differing row) whose rows do not match
    member 0's: a different length, key columns, or values.
    """
    if len(frames) == 0:
        raise ValueError("average_members: no member frames given")
    first = frames[0]
    keys = [c for c in KEY_COLUMNS if c in first.columns]
    if "label" not in keys or "prob" not in first.columns:
        raise ValueError(f"average_members: member 0 lacks 'prob' or 'label'; has {list(first.columns)}")
    reference = first[keys].reset_index(drop=True)
    probs = []
    for i, frame in enumerate(frames):
        if "prob" not in frame.columns or [c for c in KEY_COLUMNS if c in frame.columns] != keys:
            raise ValueError(
                f"average_members: member {i} has columns {list(frame.columns)}; member 0 has "
                f"{keys + ['prob']} (every member must be evaluated on the same split)"
            )
        if len(frame) != len(first):
            raise ValueError(f"average_members: member {i} has {len(frame)} rows, member 0 has {len(first)}")
        own = frame[keys].reset_index(drop=True)
        for column in keys:
            a, b = reference[column].astype(object), own[column].astype(object)
            differs = ~((a == b) | (a.isna() & b.isna())).to_numpy()
            if differs.any():
                row = int(np.flatnonzero(differs)[0])
                raise ValueError(
                    f"average_members: member {i} row {row} has {column}={b[row]!r}, member 0 has "
                    f"{a[row]!r} ({int(differs.sum())} rows differ; frames must list the same "
                    "cases in the same order)"
                )
        p = frame["prob"].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(p) | (p < 0) | (p > 1)
        if bad.any():
            raise ValueError(
                f"average_members: member {i} row {int(np.flatnonzero(bad)[0])} has prob {p[bad][0]!r}, not in [0, 1]"
            )
        probs.append(p)
    return reference, np.stack(probs, axis=1)


def average_members(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Average the members' per-row probabilities (paper 000: the ensemble's prediction).

    Args:
        frames: one ``loop.evaluate`` frame per member, all on the same split, same rows in the
            same order (checked on ``exam_key``, ``view``, ``patient_id`` and ``label``,
            whichever the frames carry).

    Returns:
        The key columns plus ``prob`` (mean over members), ``prob_std`` (their standard
        deviation, ddof 0) and ``n_members``.
    """
    keys, probs = member_matrix(frames)
    return keys.assign(prob=probs.mean(axis=1), prob_std=probs.std(axis=1), n_members=probs.shape[1])


def _column_aucs(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every column of ``scores`` (n, k), ties averaged: equals ``roc_auc_score`` per column."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(scores.shape[1], NAN)
    ranks = scipy.stats.rankdata(scores, axis=0)
    return (ranks[y == 1].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _gain_statistic(y: np.ndarray, ensemble: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Case weights (resamples, n) -> columns (mean member AUC, ensemble AUC - mean member AUC).

    One member at a time, each vectorised over the resamples: the memory of one batch stays at
    what ``cluster_bootstrap`` bounds for a single predictor, whatever the ensemble size.
    """
    members = [auc_of_weights(y, np.ascontiguousarray(probs[:, m])) for m in range(probs.shape[1])]
    ensemble_auc = auc_of_weights(y, ensemble)

    def statistic(weights: np.ndarray) -> np.ndarray:
        mean = sum(auc(weights) for auc in members) / len(members)
        return np.stack([mean, ensemble_auc(weights) - mean], axis=1)

    return statistic


def _primary_level(keys: pd.DataFrame, probs: np.ndarray, view_mode: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Cases at the view mode's primary level: (ensemble frame, member probability matrix)."""
    ensemble = keys.assign(prob=probs.mean(axis=1))
    if PRIMARY_LEVEL[view_mode] == "image":
        return ensemble, probs
    exams = exam_level(ensemble)  # CC and MLO averaged per exam (paper 000)
    member_exams = [exam_level(keys.assign(prob=probs[:, m]))["prob"].to_numpy() for m in range(probs.shape[1])]
    return exams, np.stack(member_exams, axis=1)


def _auc_curve(
    y: np.ndarray, probs: np.ndarray, ensemble_auc: float, orders: int, rng: np.random.Generator
) -> list[dict[str, float]]:
    """Ensemble AUC of the first k members, k = 1..M, mean and std over ``orders`` random orders.

    k = M is the whole ensemble whatever the order: its point is ``ensemble_auc`` with std 0
    (summing in another order would only add rounding noise).
    """
    n_members = probs.shape[1]
    aucs = np.empty((max(orders, 1), n_members))
    counts = np.arange(1, n_members + 1)
    for r in range(aucs.shape[0]):
        order = rng.permutation(n_members)
        aucs[r] = _column_aucs(y, np.cumsum(probs[:, order], axis=1) / counts)
    curve = [
        {"k": int(k), "mean": float(aucs[:, k - 1].mean()), "std": float(aucs[:, k - 1].std())} for k in counts[:-1]
    ]
    return [*curve, {"k": n_members, "mean": float(ensemble_auc), "std": 0.0}]


def _plot_curve(curve: list[dict[str, float]], mean_member_auc: float, path: Path, title: str) -> Path:
    k = np.array([c["k"] for c in curve])
    mean = np.array([c["mean"] for c in curve])
    std = np.array([c["std"] for c in curve])
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    ax.fill_between(k, mean - std, mean + std, alpha=0.25, label="± 1 std over member orders")
    ax.plot(k, mean, marker="o", ms=3, label="ensemble of k members")
    ax.axhline(mean_member_auc, ls="--", color="0.4", label=f"mean member AUC = {mean_member_auc:.3f}")
    ax.set(xlabel="members averaged (k)", ylabel="AUC", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _flat_metrics(
    keys: pd.DataFrame, probs: np.ndarray, view_mode: str, prefix: str, n_boot: int, seed: int
) -> dict[str, float]:
    """``loop.summarize_predictions``' keys for the ensemble frame (without importing torch)."""
    levels = evaluate_predictions(keys.assign(prob=probs.mean(axis=1)), n_boot=n_boot, seed=seed)
    return summarize_levels(levels, view_mode, prefix=prefix, with_ci=n_boot > 0)


def ensemble_report(
    frames: Sequence[pd.DataFrame],
    view_mode: str,
    out_dir: str | Path,
    *,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    curve_orders: int = 20,
) -> dict[str, Any]:
    """How the averaged ensemble compares with its members on one split; writes JSON, CSV and PNGs.

    Args:
        frames: the members' ``loop.evaluate`` frames (see ``average_members``).
        view_mode: ``single`` (cases are images) or ``parallel`` / ``multimodal`` (cases are exams).
        out_dir: receives ``ensemble_<split>.json``, ``ensemble_predictions_<split>.csv`` (per image,
            with every member's probability), ``ensemble_auc_vs_members_<split>.png`` and
            ``ensemble_roc_<split>.png``.
        n_boot: bootstrap resamples of every CI (0: CIs are nan).
        seed: seeds the bootstraps and ``np.random.default_rng(seed)``, which draws the member orders.
        curve_orders: random member orders averaged in the AUC-vs-members curve.

    Returns:
        ``ensemble_auc``, ``ensemble_auc_ci``, ``mean_member_auc``, ``mean_member_auc_ci``, ``diff``
        (ensemble minus mean member AUC), ``diff_ci`` (paired), ``member_aucs``, ``curve`` (one
        ``{k, mean, std}`` per k), ``metrics`` (flat, ``<split>_ensemble_*``), ``plots``,
        ``predictions``, ``n`` (cases at the primary level), ``bootstrap_unit`` ("patient", or
        "case" for frames without ``patient_id``), ``clusters`` (units resampled), ``boot_dropped``
        (resamples left out for lacking a class), plus ``split``, ``view_mode``, ``level`` and
        ``members``. Undefined values (one class only) are nan.
    """
    if view_mode not in PRIMARY_LEVEL:
        raise ValueError(f"ensemble_report: unknown view_mode {view_mode!r}; expected one of {list(PRIMARY_LEVEL)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, image_probs = member_matrix(frames)
    cases, probs = _primary_level(keys, image_probs, view_mode)
    y, ensemble = check_predictions(cases["label"].to_numpy(), cases["prob"].to_numpy())
    n_members = probs.shape[1]

    prefix = f"{split}_ensemble_"
    metrics = _flat_metrics(keys, image_probs, view_mode, prefix, n_boot, seed)
    ensemble_auc = metrics[f"{prefix}auc"]
    ensemble_ci = (metrics.get(f"{prefix}auc_ci_low", NAN), metrics.get(f"{prefix}auc_ci_high", NAN))
    member_aucs = _column_aucs(y, probs)
    mean_member_auc = float(member_aucs.mean())
    groups = cases[CLUSTER].to_numpy() if CLUSTER in cases.columns else None
    mean_boot, gain_boot = cluster_bootstrap(
        y, _gain_statistic(y, ensemble, probs), groups=groups, n_boot=n_boot, ci=0.95, seed=seed, outputs=2
    )
    mean_ci, diff_ci = mean_boot.interval, gain_boot.interval
    curve = _auc_curve(y, probs, ensemble_auc, curve_orders, np.random.default_rng(seed))
    metrics.update(
        {
            f"{prefix}mean_member_auc": mean_member_auc,
            f"{prefix}mean_member_auc_ci_low": mean_ci[0],
            f"{prefix}mean_member_auc_ci_high": mean_ci[1],
            f"{prefix}auc_gain": ensemble_auc - mean_member_auc,
            f"{prefix}auc_gain_ci_low": diff_ci[0],
            f"{prefix}auc_gain_ci_high": diff_ci[1],
            f"{prefix}members": float(n_members),
        }
    )

    level = PRIMARY_LEVEL[view_mode]
    ranked = np.argsort(np.nan_to_num(member_aucs, nan=-1.0), kind="stable")
    best, median = int(ranked[-1]), int(ranked[(n_members - 1) // 2])
    rocs: dict[str, tuple[Any, ...]] = {
        f"ensemble of {n_members}": (y, ensemble, ensemble_ci),
        f"best member #{best}": (y, probs[:, best]),
    }
    if median != best:
        rocs[f"median member #{median}"] = (y, probs[:, median])
    plots = [
        _plot_curve(
            curve,
            mean_member_auc,
            out_dir / f"ensemble_auc_vs_members_{split}.png",
            f"Ensemble AUC vs members, {split} split (per {level}, n={y.size})",
        ),
        plot_rocs(rocs, out_dir / f"ensemble_roc_{split}.png", title=f"ROC, {split} split ({view_mode}, per {level})"),
    ]
    predictions = out_dir / f"ensemble_predictions_{split}.csv"
    table = keys.assign(prob=image_probs.mean(axis=1), prob_std=image_probs.std(axis=1), n_members=n_members)
    members = pd.DataFrame(image_probs, columns=[f"member_{m:03d}" for m in range(n_members)])
    pd.concat([table, members], axis=1).to_csv(predictions, index=False)

    result = {
        "split": split,
        "view_mode": view_mode,
        "level": level,
        "members": n_members,
        "n": int(y.size),
        "ensemble_auc": float(ensemble_auc),
        "ensemble_auc_ci": [float(v) for v in ensemble_ci],
        "mean_member_auc": mean_member_auc,
        "mean_member_auc_ci": [float(v) for v in mean_ci],
        "diff": float(ensemble_auc - mean_member_auc),
        "diff_ci": [float(v) for v in diff_ci],
        "member_aucs": [float(v) for v in member_aucs],
        "curve": curve,
        "metrics": metrics,
        "bootstrap_unit": "case" if groups is None else "patient",
        "clusters": mean_boot.clusters,
        "boot_dropped": mean_boot.dropped,
        "plots": [str(p) for p in plots],
        "predictions": str(predictions),
    }
    (out_dir / f"ensemble_{split}.json").write_text(json.dumps(result, indent=2))
    return result
