"""Binary malignancy metrics per image and per exam, with bootstrap confidence intervals (SPEC §5).

Everything takes ``labels`` (1 malignant, 0 benign) and ``probs`` = P(malignant); numpy arrays,
lists or torch tensors. Recall (sensitivity) is what clinicians care most about (paper 001),
specificity is its benign-side twin, and every AUC that is compared carries a bootstrap CI.

Bootstrap CIs resample cases *stratified by class* (positives and negatives separately, each
to its own count) with ``scipy.stats.bootstrap``, percentile method, seeded. Stratification
keeps both classes in every resample, so no resample has to be skipped and the class balance of
the evaluation set is preserved. Inside the bootstrap the AUC is the Mann-Whitney U statistic
divided by ``n_pos * n_neg`` (``scipy.stats.mannwhitneyu``, vectorised over resamples), which
equals ``sklearn.metrics.roc_auc_score`` exactly, ties included, at a fraction of the cost.

Undefined values are ``nan``, never an exception: AUC and its CI when only one class is present,
precision with no positive predictions, recall without positives, specificity without negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.metrics import (accuracy_score, confusion_matrix, log_loss, precision_score,
                             recall_score, roc_auc_score)

__all__ = ["BinaryMetrics", "binary_metrics", "bootstrap_auc_ci", "check_predictions", "compare_auc",
           "exam_level", "evaluate_predictions"]

NAN = float("nan")
PROB_EPS = 1e-7  # log loss clips probs to [eps, 1 - eps]: one confident mistake must not be inf
_BOOT_CELLS = 4_000_000  # resamples x cases evaluated at once (bounds bootstrap memory)


@dataclass
class BinaryMetrics:
    """Metrics of one set of binary predictions; see ``binary_metrics``."""

    n: int                        # cases (images or exams)
    positives: int                # malignant cases
    accuracy: float
    auc: float                    # ROC AUC; nan when only one class is present
    auc_ci: tuple[float, float]   # bootstrap CI of the AUC; (nan, nan) when undefined or n_boot=0
    log_loss: float
    precision: float              # PPV; nan when nothing is predicted malignant
    recall: float                 # sensitivity; nan without positives
    specificity: float            # true-negative rate; nan without negatives
    confusion: list[list[int]]    # [[tn, fp], [fn, tp]]
    threshold: float              # predicted malignant when prob >= threshold

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for MLflow / Ray ``report``: ``{prefix}accuracy``, ``{prefix}tp``, ..."""
        (tn, fp), (fn, tp) = self.confusion
        values = {"n": self.n, "positives": self.positives, "accuracy": self.accuracy,
                  "auc": self.auc, "auc_ci_low": self.auc_ci[0], "auc_ci_high": self.auc_ci[1],
                  "log_loss": self.log_loss, "precision": self.precision, "recall": self.recall,
                  "specificity": self.specificity, "threshold": self.threshold,
                  "tn": tn, "fp": fp, "fn": fn, "tp": tp}
        return {f"{prefix}{name}": float(value) for name, value in values.items()}


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    return array[:, 0] if array.ndim == 2 and array.shape[1] == 1 else array  # (n, 1) model outputs


def check_predictions(labels: Any, *probs: Any) -> tuple[np.ndarray, ...]:
    """Validate 0/1 labels and [0, 1] probability arrays of one length (lists, arrays, tensors,
    ``(n, 1)`` squeezed); return them as int64 and float64 arrays, or raise ValueError naming the
    first bad value and its index."""
    y = _to_numpy(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 or 1; found {y[bad][0].item()!r} at index {int(np.flatnonzero(bad)[0])}")
    out = [y.astype(np.int64)]
    for p in map(_to_numpy, probs):
        p = p.astype(np.float64)
        if p.shape != y.shape:
            raise ValueError(f"probs have shape {p.shape} but labels have shape {y.shape}")
        bad = ~np.isfinite(p) | (p < 0) | (p > 1)
        if bad.any():
            raise ValueError(f"probs must lie in [0, 1]; found {p[bad][0].item()!r} at index {int(np.flatnonzero(bad)[0])}")
        out.append(p)
    return tuple(out)


def _auc_statistic(scores: np.ndarray) -> Callable[..., np.ndarray]:
    """AUC of ``scores`` over resampled case indices, vectorised over leading axes."""
    def auc(neg: np.ndarray, pos: np.ndarray, axis: int = -1) -> np.ndarray:
        u = scipy.stats.mannwhitneyu(scores[pos], scores[neg], axis=axis, method="asymptotic").statistic
        return u / (neg.shape[axis] * pos.shape[axis])
    return auc


def _stratified_bootstrap(y: np.ndarray, statistic: Callable[..., np.ndarray], *, n_boot: int,
                          ci: float, seed: int) -> tuple[float, float]:
    """Percentile CI of ``statistic(neg_idx, pos_idx, axis)`` over class-stratified resamples."""
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    if neg.size == 0 or pos.size == 0 or n_boot <= 0:
        return NAN, NAN
    # scipy wants two observations per sample. A lone case passed twice resamples to itself, as it
    # would alone, and a duplicated case leaves the AUC (a mean over pos-neg pairs) unchanged.
    neg, pos = (np.repeat(idx, 2) if idx.size == 1 else idx for idx in (neg, pos))
    result = scipy.stats.bootstrap(
        (neg, pos), statistic, n_resamples=n_boot, confidence_level=ci, method="percentile",
        vectorized=True, batch=max(1, _BOOT_CELLS // y.size), random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_auc_ci(labels: Any, probs: Any, *, n_boot: int = 1000, ci: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Class-stratified percentile bootstrap CI of the ROC AUC.

    Args:
        labels: 0/1 per case.
        probs: P(class 1) per case.
        n_boot: number of resamples; 0 skips the bootstrap and returns (nan, nan).
        ci: confidence level, e.g. 0.95.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when only one class is present.
    """
    y, p = check_predictions(labels, probs)
    return _stratified_bootstrap(y, _auc_statistic(p), n_boot=n_boot, ci=ci, seed=seed)


def binary_metrics(labels: Any, probs: Any, *, threshold: float = 0.5, n_boot: int = 1000,
                   ci: float = 0.95, seed: int = 0) -> BinaryMetrics:
    """All SPEC §5 metrics of one set of predictions.

    A case is predicted malignant when ``prob >= threshold``. With a single class present the
    AUC and its CI are nan (no exception), and so are the ratios that class leaves undefined.
    Log loss is computed over both classes (``labels=[0, 1]``) on probs clipped to
    ``[PROB_EPS, 1 - PROB_EPS]``. ``n_boot=0`` skips the CI (cheap per-epoch validation).
    """
    y, p = check_predictions(labels, probs)
    pred = (p >= threshold).astype(np.int64)
    positives = int(y.sum())
    both_classes = 0 < positives < y.size
    clipped = np.clip(p, PROB_EPS, 1 - PROB_EPS)
    return BinaryMetrics(
        n=int(y.size), positives=positives,
        accuracy=float(accuracy_score(y, pred)),
        auc=float(roc_auc_score(y, p)) if both_classes else NAN,
        auc_ci=bootstrap_auc_ci(y, p, n_boot=n_boot, ci=ci, seed=seed),
        log_loss=float(log_loss(y, clipped, labels=[0, 1])),
        precision=float(precision_score(y, pred, labels=[0, 1], pos_label=1, zero_division=np.nan)),
        recall=float(recall_score(y, pred, labels=[0, 1], pos_label=1, zero_division=np.nan)),
        specificity=float(recall_score(y, pred, labels=[0, 1], pos_label=0, zero_division=np.nan)),
        confusion=confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        threshold=float(threshold),
    )


def compare_auc(labels: Any, probs_a: Any, probs_b: Any, *, n_boot: int = 1000, ci: float = 0.95,
                seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``AUC(a) - AUC(b)`` on the same cases (e.g. ensemble vs one member).

    Each resample draws the same cases for both predictors (class-stratified), so the CI
    accounts for the correlation between them; a CI excluding 0 means a difference at level ``ci``.

    Returns:
        ``{"auc_a", "auc_b", "diff", "ci": (low, high)}``; nan entries when one class only.
    """
    y, pa, pb = check_predictions(labels, probs_a, probs_b)
    if not 0 < y.sum() < y.size:
        return {"auc_a": NAN, "auc_b": NAN, "diff": NAN, "ci": (NAN, NAN)}
    auc_a, auc_b = _auc_statistic(pa), _auc_statistic(pb)

    def diff(neg: np.ndarray, pos: np.ndarray, axis: int = -1) -> np.ndarray:
        return auc_a(neg, pos, axis) - auc_b(neg, pos, axis)

    point_a, point_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    return {"auc_a": point_a, "auc_b": point_b, "diff": point_a - point_b,
            "ci": _stratified_bootstrap(y, diff, n_boot=n_boot, ci=ci, seed=seed)}


def exam_level(frame: pd.DataFrame, *, key: str = "exam_key", prob: str = "prob",
               label: str = "label") -> pd.DataFrame:
    """Average the image probabilities of each exam (CC + MLO of one lesion, paper 000).

    Rows whose key is empty (``""`` or missing) are exams of their own. Every exam must carry
    one label; otherwise ``ValueError`` names the offending exam key(s).

    Returns:
        One row per exam with columns ``[key, prob, label, "n_images"]``: keyed exams in order of
        first appearance, then the unkeyed rows (their key written as ``""``).
    """
    missing = [column for column in (key, prob, label) if column not in frame.columns]
    if missing:
        raise ValueError(f"exam_level: frame lacks column(s) {missing}; has {list(frame.columns)}")
    bad = frame[prob].isna()
    if bad.any():  # a NaN would silently drop out of the mean
        raise ValueError(f"exam_level: {prob!r} is missing in row {frame.index[bad.to_numpy()][0]!r}")
    empty = (frame[key].fillna("").astype(str).str.strip() == "").to_numpy()
    keyed = frame.loc[~empty, [key, prob, label]]
    groups = keyed.groupby(key, sort=False)
    n_labels = groups[label].nunique(dropna=False)
    inconsistent = n_labels.index[n_labels > 1].tolist()
    if inconsistent:
        raise ValueError(f"exam_level: images of exam {key} {inconsistent[0]!r} have different "
                         f"{label!r} values ({len(inconsistent)} exam(s) inconsistent: {inconsistent[:5]})")
    exams = groups.agg(**{prob: (prob, "mean"), label: (label, "first"),
                          "n_images": (prob, "size")}).reset_index()
    single = frame.loc[empty, [key, prob, label]].assign(**{key: "", "n_images": 1})
    out = pd.concat([exams, single], ignore_index=True) if len(single) else exams
    return out.astype({key: object, prob: np.float64, "n_images": np.int64})


def evaluate_predictions(frame: pd.DataFrame, *, key: str = "exam_key", prob: str = "prob",
                         label: str = "label", threshold: float = 0.5, n_boot: int = 1000,
                         ci: float = 0.95, seed: int = 0) -> dict[str, BinaryMetrics]:
    """Metrics per image and per exam (``exam_level``) of one prediction table.

    Returns:
        ``{"image": BinaryMetrics, "exam": BinaryMetrics}``.
    """
    options = dict(threshold=threshold, n_boot=n_boot, ci=ci, seed=seed)
    exams = exam_level(frame, key=key, prob=prob, label=label)
    return {"image": binary_metrics(frame[label].to_numpy(), frame[prob].to_numpy(), **options),
            "exam": binary_metrics(exams[label].to_numpy(), exams[prob].to_numpy(), **options)}
