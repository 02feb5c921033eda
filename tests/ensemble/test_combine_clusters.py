"""The ensemble report's CIs resample patients: a patient's exams come (and go) together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_ray.ensemble.combine import ensemble_report
from mammo_ray.train.metrics import bootstrap_auc_ci, exam_level

PATIENTS, EXAMS_PER_PATIENT, MEMBERS = 40, 5, 4


def patient_frames(with_patient: bool = True, seed: int = 0) -> list[pd.DataFrame]:
    """CC + MLO of 5 near-identical exams per patient: the patient, not the exam, is the unit of evidence."""
    rng = np.random.default_rng(seed)
    patient_label = rng.permutation(np.arange(PATIENTS) % 2)
    patient_signal = 1.0 * (2 * patient_label - 1) + rng.normal(0, 1.2, PATIENTS)
    n_rows = PATIENTS * EXAMS_PER_PATIENT * 2
    patient = np.repeat(np.arange(PATIENTS), EXAMS_PER_PATIENT * 2)
    keys = pd.DataFrame(
        {
            "exam_key": [
                f"P{p:03d}_LEFT_MASS_{e}" for p in range(PATIENTS) for e in range(EXAMS_PER_PATIENT) for _ in (0, 1)
            ],
            "view": np.tile(["CC", "MLO"], n_rows // 2),
            "patient_id": [f"P{p:03d}" for p in patient],
            "label": patient_label[patient],
        }
    )
    if not with_patient:
        keys = keys.drop(columns="patient_id")
    return [
        keys.assign(
            prob=1 / (1 + np.exp(-(patient_signal[patient] + rng.normal(0, 0.05, n_rows) + rng.normal(0, 0.5, n_rows))))
        )
        for _ in range(MEMBERS)
    ]


def width(pair) -> float:
    return pair[1] - pair[0]


@pytest.mark.parametrize(
    "view_mode, n", [("single", PATIENTS * EXAMS_PER_PATIENT * 2), ("parallel", PATIENTS * EXAMS_PER_PATIENT)]
)
def test_report_resamples_patients(tmp_path, view_mode, n):
    clustered = ensemble_report(patient_frames(), view_mode, tmp_path / "p", n_boot=400, seed=2)
    naive = ensemble_report(patient_frames(with_patient=False), view_mode, tmp_path / "c", n_boot=400, seed=2)
    assert (clustered["bootstrap_unit"], clustered["clusters"], clustered["n"]) == ("patient", PATIENTS, n)
    assert (naive["bootstrap_unit"], naive["clusters"]) == ("case", n)
    assert clustered["ensemble_auc"] == naive["ensemble_auc"]  # the point estimates do not depend on the bootstrap
    for ci in ("ensemble_auc_ci", "mean_member_auc_ci"):
        assert width(clustered[ci]) > 1.5 * width(naive[ci]), ci  # ~sqrt(5 or 10) with near-copies
    for point, ci in (
        ("ensemble_auc", "ensemble_auc_ci"),
        ("mean_member_auc", "mean_member_auc_ci"),
        ("diff", "diff_ci"),
    ):
        assert clustered[ci][0] <= clustered[point] <= clustered[ci][1], point
    assert clustered["metrics"]["test_ensemble_clusters"] == PATIENTS


def test_ensemble_ci_is_the_patient_bootstrap_of_the_averaged_exams(tmp_path):
    frames = patient_frames()
    result = ensemble_report(frames, "parallel", tmp_path, n_boot=300, seed=5)
    averaged = frames[0].drop(columns="prob").assign(prob=np.mean([f["prob"] for f in frames], axis=0))
    exams = exam_level(averaged)
    expected = bootstrap_auc_ci(exams["label"], exams["prob"], groups=exams["patient_id"], n_boot=300, seed=5)
    assert tuple(result["ensemble_auc_ci"]) == pytest.approx(expected)
