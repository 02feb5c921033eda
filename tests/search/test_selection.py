"""Choosing the best configuration of a search: one metric at one level (per exam) for every view mode."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from mammo_ray.config import load_config, metric_mode
from mammo_ray.search.leaderboard import write_leaderboard
from mammo_ray.search.search import SELECTION_METRIC, best_row, select_best, selection_text, trial_table
from mammo_ray.search.trial import Plan

TUNE_CONFIGS = Path(__file__).resolve().parents[2] / "tune_configs"


def trials_frame() -> pd.DataFrame:
    """Two cells. The single-view cell's val_loss is per image and looks better (0.40), but per
    exam (its CC and MLO averaged) it is worse than the parallel cell's."""
    return pd.DataFrame(
        [
            {
                "cell": "resnet18-single-aug_on",
                "trial_id": "s1",
                "val_loss": 0.40,
                "val_exam_loss": 0.62,
                "val_auc": 0.80,
            },
            {
                "cell": "resnet18-single-aug_on",
                "trial_id": "s2",
                "val_loss": 0.45,
                "val_exam_loss": 0.58,
                "val_auc": 0.78,
            },
            {
                "cell": "resnet18-parallel-aug_on",
                "trial_id": "p1",
                "val_loss": 0.50,
                "val_exam_loss": 0.50,
                "val_auc": 0.79,
            },
            {
                "cell": "resnet18-parallel-aug_on",
                "trial_id": "p2",
                "val_loss": 0.70,
                "val_exam_loss": 0.70,
                "val_auc": 0.70,
            },
            {
                "cell": "levynet-single-aug_on",
                "trial_id": "l1",
                "val_loss": math.nan,
                "val_exam_loss": math.nan,
                "val_auc": math.nan,
            },  # errored before its first epoch
        ]
    )


def test_better_image_loss_loses_to_better_exam_loss():
    best = select_best(trials_frame(), "val_exam_loss")
    assert (best["cell"], best["trial_id"]) == ("resnet18-parallel-aug_on", "p1")
    assert best[SELECTION_METRIC] == pytest.approx(0.50)


def test_cell_winners_by_the_tune_metric_then_exam_loss_across_cells():
    # Ranking cells by val_loss (per image for single, per exam for parallel) would pick s1 (0.40).
    # Within a cell val_loss is fine (one level); across cells the exam loss decides.
    trials = trials_frame()
    assert best_row(trials, "val_loss")["trial_id"] == "s1"  # what the search used to pick
    best = select_best(trials, "val_loss")
    assert best["trial_id"] == "p1"
    # With val_auc per cell the single cell's winner is s1 (exam loss 0.62): parallel still wins.
    assert select_best(trials, "val_auc")["trial_id"] == "p1"


def test_no_scored_trial_gives_none():
    trials = trials_frame().assign(val_exam_loss=math.nan)
    assert select_best(trials, "val_loss") is None
    assert select_best(trials.iloc[:0], "val_exam_loss") is None
    assert "none (no cell's best trial reported val_exam_loss)" in selection_text("val_loss", None)


def test_selection_text_names_metric_and_level():
    best = select_best(trials_frame(), "val_exam_loss")
    text = selection_text("val_exam_loss", best)
    assert text.startswith("Each cell's best trial: lowest val_exam_loss (validation log loss per exam")
    assert "in every view mode" in text
    assert text.endswith("resnet18-parallel-aug_on trial p1 (val_exam_loss 0.5000).")
    auc_text = selection_text("val_auc", best)
    assert "highest val_auc (validation ROC AUC at the view mode's primary level: per image for single" in auc_text


def test_leaderboard_says_what_chose_the_winners(tmp_path):
    rows = [
        {
            "backbone": "resnet18",
            "column": "parallel w/ aug",
            "view_mode": "parallel",
            "augment": "on",
            "status": "ok",
            "test_acc": 0.7,
            "test_auc": 0.8,
            "test_auc_ci_low": 0.7,
            "test_auc_ci_high": 0.9,
            "test_loss": 0.5,
            "test_n": 40,
            "val_metric": 0.5,
            "val_exam_loss": 0.5,
        }
    ]
    note = selection_text("val_exam_loss", select_best(trials_frame(), "val_exam_loss"))
    board = write_leaderboard(rows, tmp_path, title="t", selection=note)
    text = (tmp_path / "leaderboard.md").read_text()
    assert note in text and "bootstrap over patients" in text and "Not for use in diagnostic procedures" in text
    assert pd.read_csv(board["long_csv"])["val_exam_loss"].tolist() == [0.5]


def test_trial_table_keeps_the_exam_loss_of_the_best_epoch():
    history = pd.DataFrame(
        {
            "epochs_done": [1, 2, 3],
            "val_exam_loss": [0.7, 0.5, 0.6],
            "val_loss": [0.6, 0.55, 0.4],
            "val_auc": [0.6, 0.7, 0.72],
            "checkpoint_path": ["c1", "c2", "c3"],
        }
    )
    results = [
        SimpleNamespace(
            config={"cell": "A", "model.dropout": 0.1},
            metrics_dataframe=history,
            metrics={"trial_id": "t1"},
            path="/x/t1",
            error=None,
        ),
        SimpleNamespace(
            config={"cell": "B"}, metrics_dataframe=None, metrics={}, path="/x/t2", error=RuntimeError("boom")
        ),
    ]
    plan = Plan(
        kind="search",
        name="s",
        workdir="w",
        experiment_dir="e",
        tracking_uri="u",
        experiment="x",
        parent_run_id="",
        metric="val_exam_loss",
        mode="min",
    )
    table = trial_table(results, plan).set_index("trial_id")
    assert table.loc["t1", "best_epoch"] == 2 and table.loc["t1", "checkpoint"] == "c2"
    assert table.loc["t1", "val_exam_loss"] == 0.5 and table.loc["t1", "val_loss"] == 0.55
    assert math.isnan(table.loc["t2", "val_exam_loss"]) and table.loc["t2", "error"] == "RuntimeError"


def test_exam_loss_is_the_default_search_metric():
    config = load_config(None)
    assert config.tune.metric == "val_exam_loss" and metric_mode(config.tune.metric) == "min"
    assert [metric_mode(m) for m in ("val_loss", "val_auc", "val_exam_loss")] == ["min", "max", "min"]
    for name in ("search.yaml", "search_smoke.yaml"):
        assert load_config(TUNE_CONFIGS / name).tune.metric == "val_exam_loss"
