"""Metrics and plots: hand-computed values, bootstrap CIs, exam-level averaging, PNG output.
(The patient-clustered bootstrap itself: test_bootstrap.py.)"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from mammo_ray.train.metrics import (
    BinaryMetrics,
    auc_of_weights,
    binary_metrics,
    bootstrap_auc_ci,
    compare_auc,
    evaluate_predictions,
    exam_level,
)
from mammo_ray.train.plots import plot_confusion, plot_roc, plot_rocs, plot_training_curves

# Hand example: pos scores .9 .8 .6 .3, neg scores .7 .4 .2 .1 .55 .05.
HAND_LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
HAND_PROBS = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.55, 0.05]


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and probs with a known signal (true AUC = Phi(1.6 / sqrt 2) ~ 0.87)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    logits = 1.2 * (2 * y - 1) + rng.normal(0, 1.5, n)
    return y, 1 / (1 + np.exp(-logits))


def test_perfect_separation():
    m = binary_metrics([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.95], n_boot=200)
    assert (m.n, m.positives) == (5, 2)
    assert m.auc == 1.0 and m.accuracy == 1.0
    assert m.confusion == [[3, 0], [0, 2]]
    assert m.precision == m.recall == m.specificity == 1.0
    assert m.auc_ci == (1.0, 1.0)


def test_reversed_predictions():
    m = binary_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], n_boot=200)
    assert m.auc == 0.0 and m.accuracy == 0.0
    assert m.confusion == [[0, 2], [2, 0]]
    assert m.auc_ci == (0.0, 0.0)


@pytest.mark.parametrize(
    "threshold, confusion, precision, recall, specificity",
    [
        (0.5, [[4, 2], [1, 3]], 3 / 5, 3 / 4, 4 / 6),
        (0.65, [[5, 1], [2, 2]], 2 / 3, 2 / 4, 5 / 6),
    ],
)
def test_hand_computed_example(threshold, confusion, precision, recall, specificity):
    m = binary_metrics(HAND_LABELS, HAND_PROBS, threshold=threshold, n_boot=0)
    assert m.confusion == confusion
    assert m.precision == pytest.approx(precision)
    assert m.recall == pytest.approx(recall)
    assert m.specificity == pytest.approx(specificity)
    (tn, _), (_, tp) = confusion
    assert m.accuracy == pytest.approx((tn + tp) / 10)
    assert m.auc == pytest.approx(20 / 24)  # pairs ranked right: 6 + 6 + 5 + 3 of 4 * 6
    y, p = np.array(HAND_LABELS), np.array(HAND_PROBS)
    assert m.log_loss == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert m.threshold == threshold
    assert math.isnan(m.auc_ci[0]) and math.isnan(m.auc_ci[1])  # n_boot=0 skips the bootstrap


def test_to_dict_is_flat_and_prefixed():
    d = binary_metrics(HAND_LABELS, HAND_PROBS, n_boot=100).to_dict("val_")
    assert set(d) == {
        f"val_{k}"
        for k in (
            "n",
            "positives",
            "accuracy",
            "auc",
            "auc_ci_low",
            "auc_ci_high",
            "log_loss",
            "precision",
            "recall",
            "specificity",
            "threshold",
            "tn",
            "fp",
            "fn",
            "tp",
            "clusters",
            "boot_dropped",
        )
    }
    assert all(type(v) is float for v in d.values())
    assert (d["val_tn"], d["val_fp"], d["val_fn"], d["val_tp"]) == (4.0, 2.0, 1.0, 3.0)
    assert (d["val_clusters"], d["val_boot_dropped"]) == (10.0, 0.0)  # no groups: every case its own cluster
    assert d["val_auc_ci_low"] <= d["val_auc"] <= d["val_auc_ci_high"]


def test_log_loss_clips_confident_mistakes():
    m = binary_metrics([0, 1], [1.0, 0.0], n_boot=0)
    assert math.isfinite(m.log_loss) and m.log_loss > 10


def test_ci_contains_point_and_narrows_with_more_cases():
    widths = {}
    for n in (50, 2000):
        y, p = synthetic(n)
        m = binary_metrics(y, p, n_boot=500, seed=1)
        low, high = m.auc_ci
        assert low <= m.auc <= high
        widths[n] = high - low
    assert 0 < widths[2000] < widths[50] / 3  # ~sqrt(40) narrower in theory
    y, p = synthetic(2000)
    assert 0.83 < roc_auc_score(y, p) < 0.91  # the signal is what the test thinks it is


def test_ci_is_deterministic_for_a_seed_and_handles_ties():
    y, p = synthetic(300)
    p = np.round(p, 1)  # heavy ties: the bootstrap's Mann-Whitney AUC must agree with sklearn's
    first = bootstrap_auc_ci(y, p, n_boot=300, seed=7)
    assert bootstrap_auc_ci(y, p, n_boot=300, seed=7) == first
    assert bootstrap_auc_ci(y, p, n_boot=300, seed=8) != first
    assert first[0] <= roc_auc_score(y, p) <= first[1]
    # the bootstrap's statistic itself equals sklearn's AUC on the full, tied data
    assert auc_of_weights(y, p)(np.ones(y.size))[0] == pytest.approx(roc_auc_score(y, p))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_single_class_gives_nan_without_exception(labels):
    m = binary_metrics(labels, [0.2, 0.7, 0.4])
    assert math.isnan(m.auc) and all(math.isnan(v) for v in m.auc_ci)
    assert m.accuracy == pytest.approx(2 / 3 if labels[0] == 0 else 1 / 3)
    assert math.isnan(m.recall if labels[0] == 0 else m.specificity)
    assert all(math.isnan(v) for v in bootstrap_auc_ci(labels, [0.2, 0.7, 0.4]))
    result = compare_auc(labels, [0.2, 0.7, 0.4], [0.1, 0.1, 0.1])
    assert math.isnan(result["diff"])


def test_lone_positive_gets_a_ci():
    low, high = bootstrap_auc_ci([0, 0, 0, 1], [0.1, 0.5, 0.9, 0.6], n_boot=200)
    assert 0 <= low <= 2 / 3 <= high <= 1


@pytest.mark.parametrize(
    "labels, probs, needle",
    [
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1; found 2 at index 1"),
        ([0, 1], [0.1, 1.2], "probs must lie in \\[0, 1\\]; found 1.2 at index 1"),
        ([0, 1], [0.1, float("nan")], "index 1"),
        ([0, 1, 1], [0.1, 0.2], "shape"),
        ([], [], "non-empty"),
    ],
)
def test_bad_input_is_named(labels, probs, needle):
    with pytest.raises(ValueError, match=needle):
        binary_metrics(labels, probs)


def test_accepts_tensors():
    m = binary_metrics(torch.tensor(HAND_LABELS), torch.tensor(HAND_PROBS).unsqueeze(1), n_boot=0)
    assert m.confusion == [[4, 2], [1, 3]]


def prediction_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "exam_key": ["A", "B", "A", "B", "", None, "C"],
            "view": ["CC", "CC", "MLO", "MLO", "CC", "MLO", "CC"],
            "prob": [0.2, 0.9, 0.6, 0.7, 0.3, 0.65, 0.1],
            "label": [0, 1, 0, 1, 0, 1, 0],
        }
    )


def test_exam_level_averages_cc_and_mlo():
    exams = exam_level(prediction_frame())
    assert list(exams.columns) == ["exam_key", "prob", "label", "n_images"]
    assert exams["exam_key"].tolist() == ["A", "B", "C", "", ""]
    assert exams["prob"].tolist() == pytest.approx([0.4, 0.8, 0.1, 0.3, 0.65])
    assert exams["label"].tolist() == [0, 1, 0, 0, 1]
    assert exams["n_images"].tolist() == [2, 2, 1, 1, 1]


def test_exam_level_custom_columns():
    frame = prediction_frame().rename(columns={"exam_key": "k", "prob": "p", "label": "y"})
    exams = exam_level(frame, key="k", prob="p", label="y")
    assert exams["p"].tolist()[:2] == pytest.approx([0.4, 0.8])


def test_exam_level_rejects_inconsistent_labels_naming_the_key():
    frame = prediction_frame()
    frame.loc[2, "exam_key"] = "P_00001_LEFT_MASS_1"
    frame.loc[0, "exam_key"] = "P_00001_LEFT_MASS_1"
    frame.loc[2, "label"] = 1
    with pytest.raises(ValueError, match="P_00001_LEFT_MASS_1"):
        exam_level(frame)
    with pytest.raises(ValueError, match="lacks column"):
        exam_level(frame.drop(columns="prob"))
    frame = prediction_frame()
    frame.loc[3, "prob"] = np.nan
    with pytest.raises(ValueError, match="'prob' is missing in row 3"):
        exam_level(frame)


def test_evaluate_predictions_gives_both_levels():
    result = evaluate_predictions(prediction_frame(), n_boot=100)
    assert set(result) == {"image", "exam"}
    image, exam = result["image"], result["exam"]
    assert isinstance(image, BinaryMetrics) and isinstance(exam, BinaryMetrics)
    assert (image.n, image.positives, exam.n, exam.positives) == (7, 3, 5, 2)
    # exams: A .4/0, B .8/1, C .1/0, "" .3/0, "" .65/1 -> all positives above all negatives
    assert exam.auc == 1.0 and exam.confusion == [[3, 0], [0, 2]]
    assert image.auc == pytest.approx(roc_auc_score([0, 1, 0, 1, 0, 1, 0], [0.2, 0.9, 0.6, 0.7, 0.3, 0.65, 0.1]))


def test_compare_auc():
    y, p = synthetic(400)
    same = compare_auc(y, p, p, n_boot=200)
    assert same["diff"] == 0.0 and same["ci"] == (0.0, 0.0)
    noise = np.random.default_rng(5).random(400)
    better = compare_auc(y, p, noise, n_boot=300, seed=3)
    assert better["diff"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, noise))
    assert 0 < better["ci"][0] <= better["diff"] <= better["ci"][1]
    assert compare_auc(y, p, noise, n_boot=300, seed=3) == better


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


def test_plots_write_pngs(tmp_path):
    import matplotlib.pyplot as plt

    y, p = synthetic(200)
    m = binary_metrics(y, p, n_boot=100)
    assert_png(plot_roc(y, p, tmp_path / "new" / "dir" / "roc.png", label="resnet50", ci=m.auc_ci))
    assert_png(
        plot_rocs({"ensemble": (y, p), "member 1": (y, np.clip(p + 0.2, 0, 1), (0.6, 0.7))}, tmp_path / "rocs.png")
    )
    assert_png(plot_roc([0, 0, 0], [0.1, 0.5, 0.2], tmp_path / "one_class.png"))
    assert_png(plot_confusion(m.confusion, tmp_path / "confusion.png"))
    assert_png(plot_confusion(m, tmp_path / "confusion_from_metrics.png"))
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.69, "val_auc": 0.6},
        {"epoch": 2, "train_loss": 0.5, "val_auc": 0.7, "val_accuracy": 0.65},
        {"epoch": 3, "train_loss": 0.4, "val_loss": 0.5, "val_auc": 0.75, "val_accuracy": 0.7},
    ]
    assert_png(plot_training_curves(history, tmp_path / "curves.png"))
    assert_png(plot_training_curves(history, tmp_path / "loss_only.png", metrics=("train_loss",)))
    assert plt.get_fignums() == []  # nothing left open


def test_plot_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="none of"):
        plot_training_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plot_confusion([[1, 2, 3]], tmp_path / "x.png")
