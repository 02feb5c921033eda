"""The search's plain parts, without Ray running: cells, the per-cell searcher and scheduler, the leaderboard."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from mammo_ray.config import ConfigError, load_config
from mammo_ray.search.cells import make_cells, trial_config
from mammo_ray.search.leaderboard import write_leaderboard
from mammo_ray.search.search import cell_resources
from mammo_ray.search.searcher import CellScheduler, CellSearcher

SEARCH = [
    "tune.backbones=[levynet, resnet18]",
    "tune.view_modes=[single, parallel]",
    "tune.augment=[on, off]",
    "tune.num_samples=3",
]


def test_cells_cover_the_grid_with_validated_configs():
    config = load_config(None, [*SEARCH, "tune.backbone_overrides={resnet18: {data.input_px: 200}}"])
    cells = make_cells(config)
    assert len(cells) == 2 * 2 * 2
    keys = {cell.key for cell, _ in cells}
    assert "resnet18-parallel-aug_off" in keys and "levynet-single-aug_on" in keys
    for cell, cell_config in cells:
        assert cell_config.model.name == cell.backbone and cell_config.model.view_mode == cell.view_mode
        assert cell_config.data.hflip is (cell.augment == "on")
        assert cell_config.data.rotation_deg == (25 if cell.augment == "on" else 0)
        assert cell_config.data.input_px == (200 if cell.backbone == "resnet18" else 224)
        assert cell_config.train.monitor == "val_exam_loss"  # the kept checkpoints are the ones the search ranks
    assert {cell.column for cell, _ in cells} == {
        "single w/ aug",
        "single w/o aug",
        "parallel w/ aug",
        "parallel w/o aug",
    }


def test_every_cell_must_ask_for_the_same_trial_resources():
    same = {cell.key: c for cell, c in make_cells(load_config(None, [*SEARCH, "train.cpus_per_worker=2"]))}
    assert cell_resources(same) == {"cpu": 2.0}  # 1-worker trials train in process: the worker's CPUs
    override = "tune.backbone_overrides={resnet18: {train.num_workers: 2}}"
    differ = {cell.key: c for cell, c in make_cells(load_config(None, [*SEARCH, override]))}
    with pytest.raises(ValueError, match="different trial resources.*tune.backbone_overrides"):
        cell_resources(differ)


def test_cells_reject_impossible_combinations_by_name():
    with pytest.raises(ConfigError, match="unknown model"):
        make_cells(load_config(None, ["tune.backbones=[levynet, nosuchnet]"]))
    with pytest.raises(ConfigError, match="search cell levynet-parallel-aug_as-configured"):
        make_cells(
            load_config(
                None,
                [
                    "tune.backbones=[levynet]",
                    "tune.view_modes=[parallel]",
                    "data.task=mass_presence",
                    "data.crop=patch",
                ],
            )
        )
    with pytest.raises(ConfigError, match="backbone_overrides"):
        make_cells(load_config(None, ["tune.backbones=[levynet]", "tune.backbone_overrides={vgg16: {}}"]))


def test_trial_config_sets_sampled_values_and_names_the_trial():
    _, cell_config = make_cells(load_config(None, SEARCH))[0]
    config = trial_config(cell_config, {"cell": "x", "model.dropout": 0.25, "optim.lr": 3e-4}, "t1")
    assert config.model.dropout == 0.25 and config.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="trial t2"):
        trial_config(cell_config, {"model.dropout": 1.5}, "t2")


def _drain(searcher: CellSearcher) -> list[dict]:
    suggestions = []
    for i in range(100):
        s = searcher.suggest(f"t{i}")
        if s == Searcher.FINISHED:
            break
        suggestions.append(s)
    return suggestions


def test_cell_searcher_gives_every_cell_the_same_budget_in_range_and_reproducibly():
    config = load_config(None, SEARCH)
    cells = [cell.key for cell, _ in make_cells(config)]
    first = _drain(CellSearcher(cells, config.tune, metric="val_loss", mode="min"))
    assert len(first) == len(cells) * 3
    counts = pd.Series([s["cell"] for s in first]).value_counts()
    assert set(counts.index) == set(cells) and (counts == 3).all()
    assert [s["cell"] for s in first[: len(cells)]] == cells  # round-robin: no cell waits for another's budget
    for s in first:
        assert 0.0 <= s["model.dropout"] <= 0.6
        assert 1e-5 <= s["optim.lr"] <= 1e-2 and 1e-7 <= s["optim.weight_decay"] <= 1e-3
    again = _drain(CellSearcher(cells, config.tune, metric="val_loss", mode="min"))
    assert first == again  # seeded
    assert len({round(s["optim.lr"], 12) for s in first}) == len(first)


def test_cell_searcher_save_restore_continues_where_it_stopped(tmp_path):
    config = load_config(None, SEARCH)
    cells = [cell.key for cell, _ in make_cells(config)]
    searcher = CellSearcher(cells, config.tune, metric="val_loss", mode="min")
    issued = [searcher.suggest(f"t{i}") for i in range(5)]
    for i in range(3):
        searcher.on_trial_result(f"t{i}", {"val_loss": 0.5 + i, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", {"val_loss": 0.5 + i, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = CellSearcher(cells, config.tune, metric="val_loss", mode="min")
    restored.restore(str(tmp_path / "searcher.pkl"))
    rest = _drain_from(restored, 5)
    assert len(issued) + len(rest) == len(cells) * 3


def _drain_from(searcher: CellSearcher, start: int) -> list[dict]:
    out = []
    for i in range(start, start + 100):
        s = searcher.suggest(f"t{i}")
        if s == Searcher.FINISHED:
            return out
        out.append(s)
    raise AssertionError("searcher never finished")


class _Trial:
    def __init__(self, trial_id: str, cell: str):
        self.trial_id, self.config = trial_id, {"cell": cell}


def test_cell_scheduler_compares_trials_only_within_their_cell():
    config = load_config(None, [*SEARCH, "tune.grace_period=1", "tune.reduction_factor=2"])
    scheduler = CellScheduler(config.tune, metric="val_loss", mode="min", max_epochs=4)
    good_a, bad_a = _Trial("a1", "A"), _Trial("a2", "A")
    lone_b = _Trial("b1", "B")  # much worse than cell A, but alone in its cell
    for trial in (good_a, bad_a, lone_b):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good_a, {"epochs_done": 1, "val_loss": 0.3}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad_a, {"epochs_done": 1, "val_loss": 0.9}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, lone_b, {"epochs_done": 1, "val_loss": 5.0}) == TrialScheduler.CONTINUE
    assert scheduler.stopped == {"a2"}
    # never stopped at its last epoch: it is finishing and still has to write its final evaluation
    late = _Trial("a3", "A")
    scheduler.on_trial_add(None, late)
    assert scheduler.on_trial_result(None, late, {"epochs_done": 4, "val_loss": 9.0}) == TrialScheduler.CONTINUE


def test_fifo_scheduler_never_stops():
    config = load_config(None, [*SEARCH, "tune.scheduler=fifo"])
    scheduler = CellScheduler(config.tune, metric="val_loss", mode="min", max_epochs=4)
    trials = [_Trial(f"t{i}", "A") for i in range(3)]
    for i, trial in enumerate(trials):
        scheduler.on_trial_add(None, trial)
        assert scheduler.on_trial_result(None, trial, {"epochs_done": 1, "val_loss": float(i)}) == "CONTINUE"


def test_leaderboard_is_shaped_like_table_1(tmp_path):
    rows = []
    for backbone in ("alexnet", "googlenet"):
        for column, view, aug in (("parallel w/ aug", "parallel", "on"), ("parallel w/o aug", "parallel", "off")):
            rows.append(
                {
                    "backbone": backbone,
                    "column": column,
                    "view_mode": view,
                    "augment": aug,
                    "status": "ok",
                    "test_acc": 0.7,
                    "test_auc": 0.81,
                    "test_auc_ci_low": 0.7,
                    "test_auc_ci_high": 0.9,
                    "test_loss": 0.55,
                    "test_n": 40,
                }
            )
    rows.append(
        {
            "backbone": "texture + LDA (non-deep)",
            "column": "parallel w/o aug",
            "view_mode": "parallel",
            "augment": "off",
            "status": "ok",
            "test_acc": 0.6,
            "test_auc": 0.64,
            "test_auc_ci_low": 0.5,
            "test_auc_ci_high": 0.77,
            "test_loss": 0.7,
            "test_n": 40,
        }
    )
    rows[0].update(test_brier=0.191, test_ece=0.123, test_ece_calibrated=0.041)
    rows[1]["status"] = "no finished trial"
    board = write_leaderboard(rows, tmp_path, title="t")
    wide = pd.read_csv(board["csv"], index_col="method")
    assert list(wide.index) == ["alexnet", "googlenet", "texture + LDA (non-deep)"]
    assert wide.loc["googlenet", "parallel w/ aug auc"] == pytest.approx(0.81)
    assert math.isnan(wide.loc["alexnet", "parallel w/o aug auc"])
    text = (tmp_path / "leaderboard.md").read_text()
    assert "| alexnet | 0.70 / 0.81 (0.70-0.90) / 0.55 | no finished trial |" in text
    assert "| texture + LDA (non-deep) |  | 0.60 / 0.64 (0.50-0.77) / 0.70 |" in text
    assert "| alexnet | 0.19 / 0.12 -> 0.04 | no finished trial |" in text  # the calibration table
    assert "Not for use in diagnostic procedures" in text
    assert len(pd.read_csv(board["long_csv"])) == 5


def test_an_ensemble_from_a_search_keeps_the_search_model_and_its_own_runtime(tmp_path, tiny_config):
    from mlflow import MlflowClient

    from mammo_ray import tags
    from mammo_ray.config import save_config
    from mammo_ray.search.members import config_from_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("s", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={tags.KIND: "search"})
    best = tiny_config("model.dropout=0.37", "data.num_workers=2", "optim.lr=0.0042")
    client.log_artifact(run.info.run_id, str(save_config(best, tmp_path / "best", "best_config.yaml")), "best")
    ensemble = tiny_config(f"train.mlflow_uri={uri}", "data.num_workers=1", "ensemble.members=5")
    members = config_from_search(ensemble, run.info.run_id, tmp_path)
    assert (members.model.dropout, members.optim.lr) == (0.37, 0.0042)  # what the search found
    assert members.data.num_workers == 1 and members.ensemble.members == 5  # what the ensemble config decides
    assert members.data.cache_px == best.data.cache_px  # the crops are the search's
