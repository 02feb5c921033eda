"""report_predictions: both levels, CIs over patients, and the level-independent exam loss."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_ray.train.evaluation import report_predictions


def predictions(patients: int = 30, seed: int = 0) -> pd.DataFrame:
    """``loop.evaluate``-shaped: CC + MLO of two lesions per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = p % 2
        for lesion in (1, 2):
            for view in ("CC", "MLO"):
                prob = float(np.clip(0.3 + 0.3 * label + rng.normal(0, 0.2), 0.01, 0.99))
                rows.append(
                    {
                        "exam_key": f"P_{p:05d}_LEFT_MASS_{lesion}",
                        "view": view,
                        "patient_id": f"P_{p:05d}",
                        "prob": prob,
                        "label": label,
                    }
                )
    return pd.DataFrame(rows)


def test_report_resamples_patients_and_reports_exam_loss(tmp_path):
    frame = predictions()
    result = report_predictions(frame, "single", "test", tmp_path, n_boot=200)
    assert result.bootstrap_unit == "patient"
    assert (result.image.n, result.image.clusters) == (120, 30)
    assert (result.exam.n, result.exam.clusters) == (60, 30)
    flat = result.metrics
    assert flat["test_loss"] == pytest.approx(result.image.log_loss)  # single: primary level is the image
    assert flat["test_exam_loss"] == pytest.approx(result.exam.log_loss)
    assert flat["test_clusters"] == 30 and flat["test_auc_ci_low"] <= flat["test_auc"] <= flat["test_auc_ci_high"]
    saved = json.loads((tmp_path / "metrics_test.json").read_text())
    assert saved["bootstrap_unit"] == "patient" and saved["exam"]["clusters"] == 30


def test_report_without_patient_ids_resamples_cases(tmp_path):
    result = report_predictions(predictions().drop(columns="patient_id"), "parallel", "val", tmp_path, n_boot=100)
    assert result.bootstrap_unit == "case"
    assert (result.exam.clusters, result.metrics["val_clusters"]) == (60, 60)


def test_without_plots_the_metrics_and_decisions_are_the_same_and_no_png_is_drawn(tmp_path):
    from mammo_ray.decisions.policy import DecisionPolicy

    frame = predictions(seed=1)
    policy = DecisionPolicy.fit(predictions(seed=2)["label"], predictions(seed=2)["prob"])
    history = [{"epoch": 0, "train_loss": 0.7, "val_loss": 0.6, "val_auc": 0.7}]
    drawn = report_predictions(frame, "single", "test", tmp_path / "a", n_boot=50, history=history, policy=policy)
    bare = report_predictions(
        frame, "single", "test", tmp_path / "b", n_boot=50, history=history, policy=policy, plots=False
    )
    assert len(drawn.plots) == 6 and all(p.endswith(".png") for p in drawn.plots)
    assert bare.plots == [] and not list((tmp_path / "b").glob("*.png"))
    assert bare.metrics == drawn.metrics and bare.to_dict()["referral"] == drawn.to_dict()["referral"]
    assert (tmp_path / "b" / "decisions_test.json").is_file()  # the decision report itself is still written


def test_ensemble_members_draw_no_plots_and_log_no_model_unless_asked(tiny_config):
    from mammo_ray.search.members import member_config

    assert member_config(tiny_config()).train.plots is False
    assert member_config(tiny_config("ensemble.member_plots=true")).train.plots is True
    assert tiny_config().train.plots is True  # a training run of its own draws them
    assert member_config(tiny_config()).train.log_model is False  # nor log a model of their own
    assert member_config(tiny_config("ensemble.member_models=true")).train.log_model is True
    assert tiny_config().train.log_model is True
