"""Binary malignancy metrics per image and per exam, with patient-level bootstrap CIs.

Everything takes ``labels`` (1 malignant, 0 benign) and ``probs`` = P(malignant); numpy arrays,
lists or torch tensors. Recall (sensitivity) is what clinicians care most about (paper 001),
specificity is its benign-side twin, and every AUC that is compared carries a bootstrap CI.

Bootstrap CIs resample *patients*, not cases (a cluster bootstrap). In CBIS-DDSM one patient
contributes several cases (CC and MLO of a lesion, several lesions, both breasts) and those cases
are correlated: the same tissue, often the same film, the same mistakes of the model. Resampling
cases as if they were independent counts ten near-copies as ten pieces of evidence, and the CI
comes out too narrow. So each resample draws patients with replacement, stratified by the
patient's class (the max label over their cases: the positive patients and the negative patients
are each drawn to their own count, which keeps positives in every resample and the class balance
of the evaluation set), and a case counts as many times as its patient was drawn. Stratifying
patients cannot always guarantee a negative case (when every patient has a malignant case, the
negatives come only from mixed patients): a resample without both classes is dropped and drawn
again, at most ``MAX_DRAWS`` x ``n_boot`` draws in all, and the number dropped is reported
(``BootstrapCI.dropped``, ``BinaryMetrics.boot_dropped``). ``groups=None`` makes every case its
own cluster: the class-stratified case bootstrap of earlier versions.

The AUC of a resample is the Mann-Whitney statistic with the multiplicities as case weights,
which equals ``sklearn.metrics.roc_auc_score(y, p, sample_weight=w)``, ties included. It is
vectorised over a batch of resamples: the scores are sorted once; per resample, the weight of the
negatives strictly below each tie group of positives is a cumulative sum, and ties count half.
Batches hold at most ``_BOOT_CELLS`` resample x case weights, so memory stays bounded. The CI is
the percentile interval, seeded by ``numpy.random.default_rng(seed)``.

Undefined values are ``nan``, never an exception: AUC and its CI when only one class is present,
precision with no positive predictions, recall without positives, specificity without negatives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_score, recall_score, roc_auc_score

__all__ = [
    "BinaryMetrics",
    "BootstrapCI",
    "PRIMARY_LEVEL",
    "auc_of_weights",
    "binary_metrics",
    "bootstrap_auc_ci",
    "check_predictions",
    "cluster_bootstrap",
    "compare_auc",
    "exam_level",
    "evaluate_predictions",
    "summarize_levels",
]

NAN = float("nan")
PROB_EPS = 1e-7  # log loss clips probs to [eps, 1 - eps]: one confident mistake must not be inf
_BOOT_CELLS = 2_000_000  # resamples x cases weighted at once (bounds bootstrap memory)
MAX_DRAWS = 4  # at most MAX_DRAWS x n_boot resamples are drawn to find n_boot with both classes
CLUSTER = "patient_id"  # the column whose values are the bootstrap's clusters
PRIMARY_LEVEL = {"single": "image", "parallel": "exam", "multimodal": "exam"}  # a view mode's primary level
REINDEX_HINT = (
    "re-index with this version (`mammo-ray index`, then `mammo-ray prepare`): its pairing rule gives "
    "the CC and MLO rows of a lesion whose labels disagree an exam key of their own"
)

Statistic = Callable[[np.ndarray], np.ndarray]  # (resamples, cases) weights -> (resamples,) or (resamples, k)


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval and what it was computed from."""

    low: float
    high: float
    resamples: int  # resamples with both classes, the interval's sample
    dropped: int  # resamples drawn without one of the classes, left out and drawn again
    clusters: int  # independent units resampled: patients, or cases without groups

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high


@dataclass
class BinaryMetrics:
    """Metrics of one set of binary predictions; see ``binary_metrics``."""

    n: int  # cases (images or exams)
    positives: int  # malignant cases
    accuracy: float
    auc: float  # ROC AUC; nan when only one class is present
    auc_ci: tuple[float, float]  # bootstrap CI of the AUC; (nan, nan) when undefined or n_boot=0
    log_loss: float
    precision: float  # PPV; nan when nothing is predicted malignant
    recall: float  # sensitivity; nan without positives
    specificity: float  # true-negative rate; nan without negatives
    confusion: list[list[int]]  # [[tn, fp], [fn, tp]]
    threshold: float  # predicted malignant when prob >= threshold
    clusters: int = 0  # bootstrap units: patients (cluster bootstrap), or n without groups
    boot_dropped: int = 0  # resamples dropped for lacking a class (see the module docstring)

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for MLflow / Ray ``report``: ``{prefix}accuracy``, ``{prefix}tp``, ..."""
        (tn, fp), (fn, tp) = self.confusion
        values = {
            "n": self.n,
            "positives": self.positives,
            "accuracy": self.accuracy,
            "auc": self.auc,
            "auc_ci_low": self.auc_ci[0],
            "auc_ci_high": self.auc_ci[1],
            "log_loss": self.log_loss,
            "precision": self.precision,
            "recall": self.recall,
            "specificity": self.specificity,
            "threshold": self.threshold,
            "tn": tn,
            "fp": fp,
            "fn": fn,
            "tp": tp,
            "clusters": self.clusters,
            "boot_dropped": self.boot_dropped,
        }
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
            raise ValueError(
                f"probs must lie in [0, 1]; found {p[bad][0].item()!r} at index {int(np.flatnonzero(bad)[0])}"
            )
        out.append(p)
    return tuple(out)


def cluster_codes(groups: Any, n: int) -> np.ndarray:
    """The cluster of every case as 0..G-1 in order of first appearance; ``groups=None``: each
    case its own. Raises ValueError for a length mismatch or a missing (None, NaN, "") group."""
    if groups is None:
        return np.arange(n)
    values = pd.Series(np.asarray(_to_numpy(groups), dtype=object))
    if len(values) != n:
        raise ValueError(f"groups (patient ids) have {len(values)} entries but labels have {n}")
    missing = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        raise ValueError(
            f"groups (patient ids) must name every case's patient; missing at index "
            f"{int(np.flatnonzero(missing)[0])} ({int(missing.sum())} case(s) without one)"
        )
    return pd.factorize(values)[0]


def auc_of_weights(labels: np.ndarray, scores: np.ndarray) -> Statistic:
    """ROC AUC of ``scores`` under case weights, one AUC per row of a ``(resamples, n)`` weight matrix.

    The weighted Mann-Whitney statistic: sum over (positive i, negative j) of ``w_i w_j`` when
    ``s_i > s_j`` (half when tied), over ``sum(w_pos) * sum(w_neg)``; equal to
    ``roc_auc_score(labels, scores, sample_weight=w)``. The scores are sorted here, once, so a
    bootstrap pays only a few passes over its weight matrix per batch. Rows without both
    classes give nan.
    """
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first case of each tie group
    positive = labels[order] == 1

    def auc(weights: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, order]
        pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)  # (resamples, tie groups)
        neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each tie group
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, NAN)

    return auc


def _resampled_weights(
    y: np.ndarray, clusters: np.ndarray, n_boot: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of ``(case weights (b, n) of resamples with both classes, resamples drawn)``.

    Patients are drawn with replacement within their class (max label over their cases); a
    case's weight is how often its patient was drawn. Stops at ``n_boot`` kept resamples or
    ``MAX_DRAWS * n_boot`` drawn.
    """
    n_clusters = int(clusters.max()) + 1
    cluster_class = np.zeros(n_clusters, dtype=np.int64)
    np.maximum.at(cluster_class, clusters, y)
    strata = [np.flatnonzero(cluster_class == c) for c in (0, 1)]
    batch = max(1, _BOOT_CELLS // max(y.size, n_clusters))
    kept = drawn = 0
    while kept < n_boot and drawn < MAX_DRAWS * n_boot:
        size = min(batch, n_boot - kept, MAX_DRAWS * n_boot - drawn)
        counts = np.zeros(size * n_clusters, dtype=np.int64)
        offsets = (np.arange(size) * n_clusters)[:, None]
        for stratum in strata:
            if stratum.size:
                chosen = stratum[rng.integers(0, stratum.size, size=(size, stratum.size))]
                counts += np.bincount((offsets + chosen).ravel(), minlength=counts.size)
        weights = counts.reshape(size, n_clusters)[:, clusters].astype(np.float64)
        both = (weights @ y > 0) & (weights @ (1 - y) > 0)
        drawn += size
        kept += int(both.sum())
        yield weights[both], size


def cluster_bootstrap(
    labels: Any,
    statistic: Statistic,
    *,
    groups: Any = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    outputs: int = 1,
) -> list[BootstrapCI]:
    """Percentile CIs of ``statistic`` over patient-clustered, class-stratified resamples.

    Args:
        labels: 0/1 per case.
        statistic: ``(resamples, n)`` case weights -> ``(resamples,)`` or ``(resamples, outputs)``
            values (e.g. ``auc_of_weights(y, p)``); every output sees the same resamples, which
            makes differences between them paired.
        groups: the cluster (patient id) of every case; None: every case its own cluster.
        n_boot: resamples with both classes to collect; 0 skips the bootstrap (nan CIs).
        ci: confidence level, e.g. 0.95.
        seed: seeds ``numpy.random.default_rng``; the same seed, labels and groups give the same
            resamples, so CIs of different statistics on the same cases are consistent.
        outputs: the number of columns ``statistic`` returns.

    Returns:
        One ``BootstrapCI`` per output; (nan, nan) when only one class is present or n_boot=0.
    """
    y = check_predictions(labels)[0]
    clusters = cluster_codes(groups, y.size)
    n_clusters = int(clusters.max()) + 1
    if n_boot <= 0 or not 0 < y.sum() < y.size:
        return [BootstrapCI(NAN, NAN, 0, 0, n_clusters)] * outputs
    values, drawn = [], 0
    for weights, size in _resampled_weights(y, clusters, n_boot, np.random.default_rng(seed)):
        drawn += size
        if len(weights):
            values.append(np.asarray(statistic(weights), dtype=np.float64).reshape(len(weights), outputs))
    if not values:
        return [BootstrapCI(NAN, NAN, 0, drawn, n_clusters)] * outputs
    stacked = np.concatenate(values)
    alpha = (1 - ci) / 2
    low, high = np.quantile(stacked, [alpha, 1 - alpha], axis=0)
    return [
        BootstrapCI(float(lo), float(hi), len(stacked), drawn - len(stacked), n_clusters)
        for lo, hi in zip(low, high, strict=True)
    ]


def bootstrap_auc_ci(
    labels: Any, probs: Any, *, groups: Any = None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Patient-clustered, class-stratified percentile bootstrap CI of the ROC AUC.

    Args:
        labels: 0/1 per case.
        probs: P(class 1) per case.
        groups: the patient of every case (see the module docstring); None: every case its own.
        n_boot: number of resamples; 0 skips the bootstrap and returns (nan, nan).
        ci: confidence level, e.g. 0.95.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when only one class is present.
    """
    y, p = check_predictions(labels, probs)
    return cluster_bootstrap(y, auc_of_weights(y, p), groups=groups, n_boot=n_boot, ci=ci, seed=seed)[0].interval


def binary_metrics(
    labels: Any,
    probs: Any,
    *,
    groups: Any = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> BinaryMetrics:
    """Every ``BinaryMetrics`` value of one set of predictions.

    A case is predicted malignant when ``prob >= threshold``. With a single class present the
    AUC and its CI are nan (no exception), and so are the ratios that class leaves undefined.
    Log loss is computed over both classes (``labels=[0, 1]``) on probs clipped to
    ``[PROB_EPS, 1 - PROB_EPS]``. The AUC CI resamples ``groups`` (patients; None: cases).
    ``n_boot=0`` skips the CI (cheap per-epoch validation).
    """
    y, p = check_predictions(labels, probs)
    pred = (p >= threshold).astype(np.int64)
    positives = int(y.sum())
    both_classes = 0 < positives < y.size
    clipped = np.clip(p, PROB_EPS, 1 - PROB_EPS)
    boot = cluster_bootstrap(y, auc_of_weights(y, p), groups=groups, n_boot=n_boot, ci=ci, seed=seed)[0]
    return BinaryMetrics(
        n=int(y.size),
        positives=positives,
        accuracy=float(accuracy_score(y, pred)),
        auc=float(roc_auc_score(y, p)) if both_classes else NAN,
        auc_ci=boot.interval,
        log_loss=float(log_loss(y, clipped, labels=[0, 1])),
        precision=float(precision_score(y, pred, labels=[0, 1], pos_label=1, zero_division=np.nan)),
        recall=float(recall_score(y, pred, labels=[0, 1], pos_label=1, zero_division=np.nan)),
        specificity=float(recall_score(y, pred, labels=[0, 1], pos_label=0, zero_division=np.nan)),
        confusion=confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        threshold=float(threshold),
        clusters=boot.clusters,
        boot_dropped=boot.dropped,
    )


def compare_auc(
    labels: Any, probs_a: Any, probs_b: Any, *, groups: Any = None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap of ``AUC(a) - AUC(b)`` on the same cases (e.g. ensemble vs one member).

    Each resample draws the same patients (``groups``; None: cases) for both predictors, so the
    CI accounts for the correlation between them; a CI excluding 0 means a difference at level ``ci``.

    Returns:
        ``{"auc_a", "auc_b", "diff", "ci": (low, high), "clusters", "dropped"}``; nan entries
        when one class only.
    """
    y, pa, pb = check_predictions(labels, probs_a, probs_b)
    auc_a, auc_b = auc_of_weights(y, pa), auc_of_weights(y, pb)
    boot = cluster_bootstrap(y, lambda w: auc_a(w) - auc_b(w), groups=groups, n_boot=n_boot, ci=ci, seed=seed)[0]
    if not 0 < y.sum() < y.size:
        return {"auc_a": NAN, "auc_b": NAN, "diff": NAN, "ci": (NAN, NAN), "clusters": boot.clusters, "dropped": 0}
    point_a, point_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    return {
        "auc_a": point_a,
        "auc_b": point_b,
        "diff": point_a - point_b,
        "ci": boot.interval,
        "clusters": boot.clusters,
        "dropped": boot.dropped,
    }


def exam_level(
    frame: pd.DataFrame, *, key: str = "exam_key", prob: str = "prob", label: str = "label", cluster: str = CLUSTER
) -> pd.DataFrame:
    """Average the image probabilities of each exam (CC + MLO of one lesion, paper 000).

    Rows whose key is empty (``""`` or missing) are exams of their own. Every exam must carry
    one label, and one patient when the frame has a ``cluster`` column; otherwise ``ValueError``
    names the offending exam key(s): the manifest was indexed before the pairing rule that
    keeps disagreeing views apart, and must be indexed again.

    Returns:
        One row per exam with columns ``[key, prob, label, "n_images"]`` (plus ``cluster``, the
        exam's patient, when the frame has it): keyed exams in order of first appearance, then
        the unkeyed rows (their key written as ``""``).
    """
    missing = [column for column in (key, prob, label) if column not in frame.columns]
    if missing:
        raise ValueError(f"exam_level: frame lacks column(s) {missing}; has {list(frame.columns)}")
    bad = frame[prob].isna()
    if bad.any():  # a NaN would silently drop out of the mean
        raise ValueError(f"exam_level: {prob!r} is missing in row {frame.index[bad.to_numpy()][0]!r}")
    extra = [cluster] if cluster in frame.columns else []
    empty = (frame[key].fillna("").astype(str).str.strip() == "").to_numpy()
    keyed = frame.loc[~empty, [key, prob, label, *extra]]
    groups = keyed.groupby(key, sort=False)
    for column, what in ((label, "different"), *((c, "more than one") for c in extra)):
        counts = groups[column].nunique(dropna=False)
        inconsistent = counts.index[counts > 1].tolist()
        if inconsistent:
            raise ValueError(
                f"exam_level: images of exam {key} {inconsistent[0]!r} have {what} {column!r} "
                f"values ({len(inconsistent)} exam(s) inconsistent: {inconsistent[:5]}); "
                f"{REINDEX_HINT}"
            )
    exams = groups.agg(
        **{
            prob: (prob, "mean"),
            label: (label, "first"),
            "n_images": (prob, "size"),
            **{c: (c, "first") for c in extra},
        }
    ).reset_index()
    single = frame.loc[empty, [key, prob, label, *extra]].assign(**{key: "", "n_images": 1})
    out = pd.concat([exams, single[exams.columns]], ignore_index=True) if len(single) else exams
    return out.astype({key: object, prob: np.float64, "n_images": np.int64})


def evaluate_predictions(
    frame: pd.DataFrame,
    *,
    key: str = "exam_key",
    prob: str = "prob",
    label: str = "label",
    cluster: str = CLUSTER,
    threshold: float = 0.5,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, BinaryMetrics]:
    """Metrics per image and per exam (``exam_level``) of one prediction table.

    The CIs resample the frame's ``cluster`` column (patients) when it has one, and single
    cases otherwise (a frame without patient ids cannot say which cases are correlated).

    Returns:
        ``{"image": BinaryMetrics, "exam": BinaryMetrics}``.
    """
    exams = exam_level(frame, key=key, prob=prob, label=label, cluster=cluster)
    return {
        level: binary_metrics(
            rows[label].to_numpy(),
            rows[prob].to_numpy(),
            groups=rows[cluster].to_numpy() if cluster in rows.columns else None,
            threshold=threshold,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
        )
        for level, rows in (("image", frame), ("exam", exams))
    }


def summarize_levels(
    levels: dict[str, BinaryMetrics], view_mode: str, *, prefix: str = "val_", with_ci: bool = False
) -> dict[str, float]:
    """Flat metrics of ``evaluate_predictions``' two levels for one view mode.

    ``<prefix>auc`` / ``loss`` / ``acc`` / ... are the view mode's primary level (``PRIMARY_LEVEL``:
    per image for ``single``, per exam for ``parallel`` and ``multimodal``); ``<prefix>image_*``
    and ``<prefix>exam_*`` are the same level for every view mode. ``<prefix>exam_loss`` is what
    compares models of different view modes (the search's selection metric): for a single-view
    model the exam probability is the mean of its CC and MLO probabilities, as ``exam_level`` makes it.
    """
    if view_mode not in PRIMARY_LEVEL:
        raise ValueError(f"unknown view_mode {view_mode!r}; expected one of {list(PRIMARY_LEVEL)}")
    image, exam = levels["image"], levels["exam"]
    m = levels[PRIMARY_LEVEL[view_mode]]
    out = {
        "loss": m.log_loss,
        "auc": m.auc,
        "acc": m.accuracy,
        "recall": m.recall,
        "specificity": m.specificity,
        "precision": m.precision,
        "image_auc": image.auc,
        "exam_auc": exam.auc,
        "image_loss": image.log_loss,
        "exam_loss": exam.log_loss,
        "n": m.n,
    }
    if with_ci:
        out.update(auc_ci_low=m.auc_ci[0], auc_ci_high=m.auc_ci[1], clusters=m.clusters, boot_dropped=m.boot_dropped)
    return {f"{prefix}{name}": float(value) for name, value in out.items()}
