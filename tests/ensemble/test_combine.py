"""Combining members (paper 000): averaged probabilities, the gain over members, its CIs, the curve."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray.ensemble.combine import average_members, ensemble_report
from mammo_ray.train.metrics import exam_level

N_EXAMS, N_MEMBERS = 100, 6


def member_frames(n_members: int = N_MEMBERS, n_exams: int = N_EXAMS, seed: int = 0) -> list[pd.DataFrame]:
    """``loop.evaluate``-shaped frames: CC + MLO per exam; logits = shared signal + own noise per member."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_exams) % 2)
    keys = pd.DataFrame(
        {
            "exam_key": np.repeat([f"P{i:03d}_LEFT_1" for i in range(n_exams)], 2),
            "view": np.tile(["CC", "MLO"], n_exams),
            "patient_id": np.repeat([f"P{i:03d}" for i in range(n_exams)], 2),
            "label": np.repeat(labels, 2),
        }
    )
    shared = 1.0 * (2 * keys["label"].to_numpy() - 1) + rng.normal(0, 1.0, len(keys))
    return [keys.assign(prob=1 / (1 + np.exp(-(shared + rng.normal(0, 2.0, len(keys)))))) for _ in range(n_members)]


def test_average_members_means_and_spreads():
    frames = member_frames(n_members=3)
    out = average_members(frames)
    probs = np.stack([f["prob"] for f in frames], axis=1)
    assert list(out.columns) == ["exam_key", "view", "patient_id", "label", "prob", "prob_std", "n_members"]
    np.testing.assert_allclose(out["prob"], probs.mean(axis=1))
    np.testing.assert_allclose(out["prob_std"], probs.std(axis=1))
    assert (out["n_members"] == 3).all()
    pd.testing.assert_frame_equal(out[["exam_key", "view", "label"]], frames[0][["exam_key", "view", "label"]])


def test_average_members_of_paired_frames():  # multimodal frames carry exam_key and label only
    frames = [f.iloc[::2][["exam_key", "prob", "label"]] for f in member_frames(n_members=2)]
    out = average_members(frames)
    assert list(out.columns) == ["exam_key", "label", "prob", "prob_std", "n_members"] and len(out) == N_EXAMS


@pytest.mark.parametrize(
    "break_member, message",
    [
        (lambda f: f.iloc[[1, 0, *range(2, len(f))]], r"member 2 row 0 has view='MLO', member 0 has 'CC'"),
        (lambda f: f.iloc[:-1], r"member 2 has 199 rows, member 0 has 200"),
        (lambda f: f.assign(label=1 - f["label"]), r"member 2 row 0 has label="),
        (lambda f: f.drop(columns="prob"), r"member 2 has columns"),
        (lambda f: f.assign(prob=f["prob"] * 2), r"member 2 row \d+ has prob"),
    ],
)
def test_misaligned_members_are_named(break_member, message):
    frames = member_frames(n_members=3)
    frames[2] = break_member(frames[2])
    with pytest.raises(ValueError, match=message):
        average_members(frames)


def test_no_members():
    with pytest.raises(ValueError, match="no member frames"):
        average_members([])


def test_single_view_report_per_image(tmp_path):
    frames = member_frames()
    result = ensemble_report(frames, "single", tmp_path, split="test", n_boot=200, seed=1)
    y = frames[0]["label"].to_numpy()
    ensemble = average_members(frames)["prob"].to_numpy()
    assert result["n"] == 2 * N_EXAMS and result["level"] == "image" and result["members"] == N_MEMBERS
    assert result["ensemble_auc"] == pytest.approx(roc_auc_score(y, ensemble))
    np.testing.assert_allclose(result["member_aucs"], [roc_auc_score(y, f["prob"]) for f in frames])
    assert result["mean_member_auc"] == pytest.approx(np.mean(result["member_aucs"]))
    # averaging members that share the signal and differ in noise helps, and more members help more
    assert result["ensemble_auc"] >= result["mean_member_auc"]
    assert result["diff"] == pytest.approx(result["ensemble_auc"] - result["mean_member_auc"])
    curve = result["curve"]
    assert [c["k"] for c in curve] == list(range(1, N_MEMBERS + 1))
    assert curve[-1]["mean"] == pytest.approx(result["ensemble_auc"]) and curve[-1]["std"] == 0
    assert curve[0]["mean"] == pytest.approx(result["mean_member_auc"], abs=0.03)  # k=1: random members
    assert curve[-1]["mean"] >= curve[0]["mean"] and curve[0]["std"] > 0
    for point, ci in (
        ("ensemble_auc", "ensemble_auc_ci"),
        ("mean_member_auc", "mean_member_auc_ci"),
        ("diff", "diff_ci"),
    ):
        low, high = result[ci]
        assert low <= result[point] <= high, (point, low, high)
    width = {ci: result[ci][1] - result[ci][0] for ci in ("diff_ci", "mean_member_auc_ci")}
    assert width["diff_ci"] < width["mean_member_auc_ci"]  # paired: the shared case noise cancels

    metrics = result["metrics"]
    assert metrics["test_ensemble_auc"] == pytest.approx(result["ensemble_auc"])
    assert metrics["test_ensemble_n"] == 2 * N_EXAMS and metrics["test_ensemble_members"] == N_MEMBERS
    assert {
        "test_ensemble_loss",
        "test_ensemble_acc",
        "test_ensemble_exam_auc",
        "test_ensemble_auc_ci_low",
        "test_ensemble_mean_member_auc",
        "test_ensemble_auc_gain_ci_high",
    } <= set(metrics)
    assert {p.split("/")[-1] for p in result["plots"]} == {"ensemble_auc_vs_members_test.png", "ensemble_roc_test.png"}
    for plot in result["plots"]:
        assert (tmp_path / plot.split("/")[-1]).stat().st_size > 1000
    saved = json.loads((tmp_path / "ensemble_test.json").read_text())
    assert saved["ensemble_auc"] == result["ensemble_auc"] and saved["curve"] == curve
    table = pd.read_csv(result["predictions"])
    assert len(table) == 2 * N_EXAMS and f"member_{N_MEMBERS - 1:03d}" in table
    np.testing.assert_allclose(table["prob"], ensemble)


def test_parallel_report_per_exam(tmp_path):
    frames = member_frames()
    result = ensemble_report(frames, "parallel", tmp_path, split="val", n_boot=100)
    exams = exam_level(average_members(frames))
    assert result["n"] == N_EXAMS and result["level"] == "exam"
    assert result["ensemble_auc"] == pytest.approx(roc_auc_score(exams["label"], exams["prob"]))
    member_exams = [exam_level(f) for f in frames]
    np.testing.assert_allclose(result["member_aucs"], [roc_auc_score(e["label"], e["prob"]) for e in member_exams])
    assert result["curve"][-1]["mean"] == pytest.approx(result["ensemble_auc"])
    assert result["metrics"]["val_ensemble_n"] == N_EXAMS
    assert (tmp_path / "ensemble_auc_vs_members_val.png").is_file() and (tmp_path / "ensemble_val.json").is_file()


def test_report_is_reproducible_from_its_seed(tmp_path):
    frames = member_frames(n_members=4)
    a = ensemble_report(frames, "single", tmp_path / "a", n_boot=100, seed=3, curve_orders=5)
    b = ensemble_report(frames, "single", tmp_path / "b", n_boot=100, seed=3, curve_orders=5)
    c = ensemble_report(frames, "single", tmp_path / "c", n_boot=100, seed=4, curve_orders=5)
    assert (a["mean_member_auc_ci"], a["diff_ci"], a["curve"]) == (b["mean_member_auc_ci"], b["diff_ci"], b["curve"])
    assert a["diff_ci"] != c["diff_ci"]


def test_one_member_and_no_bootstrap(tmp_path):
    result = ensemble_report(member_frames(n_members=1), "single", tmp_path, n_boot=0)
    assert result["diff"] == 0 and np.isnan(result["diff_ci"]).all() and np.isnan(result["ensemble_auc_ci"]).all()
    assert result["curve"] == [{"k": 1, "mean": pytest.approx(result["ensemble_auc"]), "std": 0.0}]


def test_unknown_view_mode(tmp_path):
    with pytest.raises(ValueError, match="unknown view_mode 'stereo'"):
        ensemble_report(member_frames(n_members=2), "stereo", tmp_path)
