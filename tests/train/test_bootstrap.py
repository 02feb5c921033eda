"""The patient-clustered bootstrap: weighted AUC = sklearn's, patients resampled, not cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from mammo_ray.train.metrics import (
    MAX_DRAWS,
    auc_of_weights,
    binary_metrics,
    bootstrap_auc_ci,
    cluster_bootstrap,
    compare_auc,
    evaluate_predictions,
    exam_level,
    summarize_levels,
)


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and probs with a known signal (true AUC ~ 0.87)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    logits = 1.2 * (2 * y - 1) + rng.normal(0, 1.5, n)
    return y, 1 / (1 + np.exp(-logits))


def clustered(patients: int, per_patient: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_patient`` near-identical cases per patient: one label and one score per patient, plus jitter."""
    y, p = synthetic(patients, seed)
    jitter = np.random.default_rng(seed + 1).normal(0, 1e-3, patients * per_patient)
    groups = np.repeat([f"P_{i:05d}" for i in range(patients)], per_patient)
    return np.repeat(y, per_patient), np.clip(np.repeat(p, per_patient) + jitter, 0, 1), groups


def width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_auc_equals_sklearn_with_sample_weights(seed):
    rng = np.random.default_rng(seed)
    y, p = synthetic(200, seed)
    p = np.round(p, 1)  # heavy ties: they must count half, as in sklearn
    weights = rng.integers(0, 4, size=(5, y.size)).astype(float)  # bootstrap multiplicities, zeros included
    weights[0] = rng.random(y.size)  # and arbitrary real weights
    got = auc_of_weights(y, p)(weights)
    want = [roc_auc_score(y, p, sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert auc_of_weights(y, p)(np.ones(y.size))[0] == pytest.approx(roc_auc_score(y, p))


def test_weighted_auc_without_a_class_is_nan():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.3, 0.8])
    got = auc_of_weights(y, p)(np.array([[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]]))
    assert math.isnan(got[0]) and got[1] == pytest.approx(1.0)


def _scipy_case_bootstrap(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The case-level, class-stratified bootstrap of earlier versions (scipy), as a reference."""
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)

    def auc(n_idx, p_idx, axis=-1):
        u = scipy.stats.mannwhitneyu(p[p_idx], p[n_idx], axis=axis, method="asymptotic").statistic
        return u / (n_idx.shape[axis] * p_idx.shape[axis])

    result = scipy.stats.bootstrap(
        (neg, pos),
        auc,
        n_resamples=n_boot,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    return result.confidence_interval.low, result.confidence_interval.high


def test_one_case_per_patient_matches_the_case_bootstrap():
    y, p = synthetic(300)
    groups = [f"P_{i:05d}" for i in np.random.default_rng(3).permutation(300)]  # any order of distinct ids
    by_patient = bootstrap_auc_ci(y, p, groups=groups, n_boot=2000, seed=4)
    by_case = bootstrap_auc_ci(y, p, n_boot=2000, seed=4)
    assert by_patient == by_case  # distinct patients are the cases: the same resamples
    reference = _scipy_case_bootstrap(y, p, 2000, seed=9)
    assert by_case[0] == pytest.approx(reference[0], abs=0.015)
    assert by_case[1] == pytest.approx(reference[1], abs=0.015)
    assert width(by_case) == pytest.approx(width(reference), rel=0.15)


def test_near_identical_cases_of_a_patient_widen_the_ci():
    y, p, groups = clustered(patients=60, per_patient=10)
    naive = binary_metrics(y, p, n_boot=1000, seed=0)
    cluster = binary_metrics(y, p, groups=groups, n_boot=1000, seed=0)
    assert naive.auc == cluster.auc  # the point estimate does not depend on the bootstrap
    assert (naive.clusters, cluster.clusters) == (600, 60)
    assert cluster.auc_ci[0] <= cluster.auc <= cluster.auc_ci[1]
    ratio = width(cluster.auc_ci) / width(naive.auc_ci)
    assert ratio > 2  # ~sqrt(10): ten copies of a patient are one piece of evidence
    # ... and the cluster CI is what 60 independent cases give
    one_each = binary_metrics(y[::10], p[::10], n_boot=1000, seed=0)
    assert width(cluster.auc_ci) == pytest.approx(width(one_each.auc_ci), rel=0.25)


def test_paired_difference_resamples_patients_too():
    y, p, groups = clustered(patients=60, per_patient=10)
    noise = np.random.default_rng(7).random(60).repeat(10)
    naive = compare_auc(y, p, noise, n_boot=500, seed=1)
    cluster = compare_auc(y, p, noise, groups=groups, n_boot=500, seed=1)
    assert naive["diff"] == cluster["diff"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, noise))
    assert (cluster["clusters"], cluster["dropped"]) == (60, 0)
    assert width(cluster["ci"]) > 2 * width(naive["ci"])


def test_seed_reproduces_and_changes_the_resamples():
    y, p, groups = clustered(patients=40, per_patient=3)
    first = bootstrap_auc_ci(y, p, groups=groups, n_boot=300, seed=11)
    assert bootstrap_auc_ci(y, p, groups=groups, n_boot=300, seed=11) == first
    assert bootstrap_auc_ci(y, p, groups=groups, n_boot=300, seed=12) != first


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [1, 1, 1, 1]])
def test_one_class_gives_nan(labels):
    groups = ["A", "A", "B", "C"]
    assert all(math.isnan(v) for v in bootstrap_auc_ci(labels, [0.1, 0.2, 0.3, 0.4], groups=groups))
    m = binary_metrics(labels, [0.1, 0.2, 0.3, 0.4], groups=groups, n_boot=100)
    assert math.isnan(m.auc) and all(math.isnan(v) for v in m.auc_ci)
    assert (m.clusters, m.boot_dropped) == (3, 0)
    assert math.isnan(compare_auc(labels, [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], groups=groups)["diff"])


def test_resamples_without_negatives_are_dropped_redrawn_and_counted():
    # Every patient has a malignant case; only patient C has a benign one. A resample that does
    # not draw C (probability (2/3)^3 ~ 0.3) has no negative: dropped and drawn again.
    labels, probs, groups = [1, 1, 1, 0], [0.9, 0.8, 0.7, 0.2], ["A", "B", "C", "C"]
    [boot] = cluster_bootstrap(
        labels, auc_of_weights(np.array(labels), np.array(probs)), groups=groups, n_boot=400, seed=0
    )
    assert boot.resamples == 400 and boot.clusters == 3
    assert 0.15 * 400 < boot.dropped < 0.7 * 400  # ~0.3 / 0.7 of 400 = 171 expected
    assert boot.interval == (1.0, 1.0)
    m = binary_metrics(labels, probs, groups=groups, n_boot=400, seed=0)
    assert m.boot_dropped == boot.dropped and m.to_dict()["boot_dropped"] == boot.dropped


def test_the_number_of_draws_is_bounded():
    # Negatives only in patient E of 30: P(E drawn) ~ 1 - 1/e ~ 0.64 per resample, so some are dropped,
    # but never more than MAX_DRAWS x n_boot resamples are drawn in all.
    labels = [1] * 30 + [0]
    groups = [f"P{i}" for i in range(30)] + ["P29"]
    y, p = np.array(labels), np.linspace(0.5, 1, 31)
    [boot] = cluster_bootstrap(y, auc_of_weights(y, p), groups=groups, n_boot=50, seed=0)
    assert boot.resamples + boot.dropped <= MAX_DRAWS * 50
    assert boot.resamples == 50 and boot.dropped > 0


@pytest.mark.parametrize(
    "groups, needle",
    [
        (["A", "B"], "2 entries but labels have 3"),
        (["A", None, "B"], "missing at index 1"),
        (["A", "B", " "], "missing at index 2"),
    ],
)
def test_bad_groups_are_named(groups, needle):
    with pytest.raises(ValueError, match=needle):
        bootstrap_auc_ci([0, 1, 1], [0.1, 0.5, 0.7], groups=groups)


def frame_of_patients() -> pd.DataFrame:
    """Four patients, two lesions each, CC + MLO per lesion."""
    rows = []
    for patient, label in (("P1", 0), ("P2", 1), ("P3", 0), ("P4", 1)):
        for lesion, shift in ((1, 0.0), (2, 0.1)):
            for view, prob in (("CC", 0.2 + 0.5 * label + shift), ("MLO", 0.3 + 0.4 * label + shift)):
                rows.append(
                    {
                        "exam_key": f"{patient}_LEFT_MASS_{lesion}",
                        "view": view,
                        "patient_id": patient,
                        "prob": prob,
                        "label": label,
                    }
                )
    return pd.DataFrame(rows)


def test_exam_level_keeps_the_patient():
    exams = exam_level(frame_of_patients())
    assert list(exams.columns) == ["exam_key", "prob", "label", "n_images", "patient_id"]
    assert exams["patient_id"].tolist() == ["P1", "P1", "P2", "P2", "P3", "P3", "P4", "P4"]
    assert exams["prob"].tolist()[:2] == pytest.approx([0.25, 0.35])


def test_exam_level_errors_say_how_to_fix_the_manifest():
    frame = frame_of_patients()
    frame.loc[1, "label"] = 1  # MLO of P1's lesion 1 disagrees with its CC
    with pytest.raises(ValueError, match=r"'P1_LEFT_MASS_1'.*re-index with this version"):
        exam_level(frame)
    frame = frame_of_patients()
    frame.loc[1, "patient_id"] = "P9"
    with pytest.raises(ValueError, match=r"more than one 'patient_id'.*re-index"):
        exam_level(frame)


def test_evaluate_predictions_clusters_by_patient_at_both_levels():
    frame = frame_of_patients()
    levels = evaluate_predictions(frame, n_boot=200)
    assert (levels["image"].n, levels["image"].clusters) == (16, 4)
    assert (levels["exam"].n, levels["exam"].clusters) == (8, 4)
    without = evaluate_predictions(frame.drop(columns="patient_id"), n_boot=200)
    assert (without["image"].clusters, without["exam"].clusters) == (16, 8)  # no ids: every case its own


def test_summarize_levels_reports_exam_loss_for_every_view_mode():
    frame = frame_of_patients()
    levels = evaluate_predictions(frame, n_boot=100)
    exams = exam_level(frame)
    p, y = exams["prob"].to_numpy(), exams["label"].to_numpy()
    exam_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    for view_mode in ("single", "parallel", "multimodal"):
        flat = summarize_levels(levels, view_mode, with_ci=True)
        assert flat["val_exam_loss"] == pytest.approx(exam_loss)
        assert flat["val_image_loss"] == pytest.approx(levels["image"].log_loss)
        assert flat["val_clusters"] == 4.0
    assert summarize_levels(levels, "single")["val_loss"] == pytest.approx(levels["image"].log_loss)
    assert summarize_levels(levels, "parallel")["val_loss"] == pytest.approx(exam_loss)
    assert "val_auc_ci_low" not in summarize_levels(levels, "single")
    with pytest.raises(ValueError, match="unknown view_mode 'stereo'"):
        summarize_levels(levels, "stereo")
