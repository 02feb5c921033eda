"""The leaderboard's numbers are the test split's: ``evaluate_cells`` and ``write_leaderboard`` without Ray.

Two cells share one trained levynet: the single-view cell is scored per image, the parallel cell (the
same weights, ``view_mode=parallel``) per exam, its CC and MLO probabilities averaged. Each row's
``test_n`` must be the test split's size at that level and ``test_auc`` sklearn's AUC on the test
predictions the cell saved, so a leaderboard that scored the validation split would fail here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from setups import TINY_TRAIN
from sklearn.metrics import roc_auc_score

from mammo_ray.config import load_config
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.search.cells import make_cells
from mammo_ray.search.leaderboard import write_leaderboard
from mammo_ray.search.search import SELECTION_METRIC, evaluate_cells
from mammo_ray.search.trial import Plan, PlanCell
from mammo_ray.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def leaderboard(lesion_model, tiny_workdir, tmp_path_factory):
    """(rows of evaluate_cells, leaderboard_long.csv, the plan) for a single and a parallel cell."""
    checkpoint, prepared = lesion_model
    out = tmp_path_factory.mktemp("leaderboard")
    payload = load_checkpoint(checkpoint)
    payload["config"]["model"]["view_mode"] = "parallel"  # the same network, scored per exam
    parallel = save_checkpoint(payload, out / "parallel")
    config = load_config(None, [*TINY_TRAIN, "tune.backbones=[levynet]", "tune.view_modes=[single, parallel]"])
    cells = {cell.key: PlanCell(cell, cell_config, prepared) for cell, cell_config in make_cells(config)}
    plan = Plan(
        kind="search",
        name="values",
        workdir=str(tiny_workdir),
        experiment_dir=str(out / "experiment"),
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
        experiment="values",
        parent_run_id="",
        metric=SELECTION_METRIC,
        mode="min",
        cells=cells,
    )
    checkpoints = {"single": str(checkpoint), "parallel": str(parallel)}
    trials = pd.DataFrame(
        [
            {
                "cell": key,
                "trial_id": f"t-{cell.cell.view_mode}",
                "checkpoint": checkpoints[cell.cell.view_mode],
                "best_epoch": 2,
                SELECTION_METRIC: 0.6,
            }
            for key, cell in cells.items()
        ]
    )
    rows = evaluate_cells(plan, trials, n_boot=20)
    written = write_leaderboard(rows, out / "board", title="values")
    return rows, pd.read_csv(written["long_csv"]), plan


def _expected(plan: Plan, key: str, view_mode: str) -> tuple[int, float, pd.DataFrame]:
    """(test_n, test_auc, predictions) recomputed from the test split and the cell's saved predictions."""
    predictions = pd.read_csv(Path(plan.experiment_dir) / "cells" / key / "predictions_test.csv")
    if view_mode == "single":
        return len(predictions), roc_auc_score(predictions["label"], predictions["prob"]), predictions
    assert (predictions["exam_key"].fillna("") != "").all()  # every lesion has its exam key here
    exams = predictions.groupby("exam_key").agg(prob=("prob", "mean"), label=("label", "first"))
    return len(exams), roc_auc_score(exams["label"], exams["prob"]), predictions


@pytest.mark.parametrize("view_mode", ["single", "parallel"])
def test_leaderboard_rows_are_the_test_splits_numbers(leaderboard, lesion_model, view_mode):
    rows, long, plan = leaderboard
    key = f"levynet-{view_mode}-aug_as-configured"
    assert key in plan.cells
    test_cases = SingleViewDataset(CropCache(lesion_model[1].cache_dir), "test", "pathology").frame
    test_n = len(test_cases) if view_mode == "single" else test_cases["exam_key"].nunique()
    row = next(r for r in rows if r["cell"] == key)
    written = long[(long["backbone"] == "levynet") & (long["view_mode"] == view_mode)].iloc[0]
    for found in (row, written):
        assert found["status"] == "ok" and found["test_n"] == test_n
    n, auc, predictions = _expected(plan, key, view_mode)
    assert list(zip(predictions["exam_key"], predictions["view"], strict=True)) == list(
        zip(test_cases["exam_key"], test_cases["view"], strict=True)
    )  # the saved predictions are the test split's cases, all of them, and no others
    assert n == test_n
    brier = float(((predictions["prob"] - predictions["label"]) ** 2).mean())  # per image, before calibration
    for found in (row, written):
        assert found["test_auc"] == pytest.approx(auc, abs=1e-9)
        assert found["test_auc_ci_low"] <= found["test_auc"] <= found["test_auc_ci_high"]
        assert found["test_brier"] == pytest.approx(brier, abs=1e-9)
        assert 0 <= found["test_ece_calibrated"] <= 1 and 0 <= found["test_exam_ece"] <= 1


def test_the_two_levels_count_different_cases(leaderboard):
    rows, _, _ = leaderboard
    n = {r["view_mode"]: r["test_n"] for r in rows}
    assert n["single"] > n["parallel"]  # CC and MLO of one lesion are one exam
