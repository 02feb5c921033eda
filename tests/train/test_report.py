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
