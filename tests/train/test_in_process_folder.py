"""The checkpoint folder of an in-process trial (train/in_process.py): which checkpoints it keeps,
which one is best, and that a checkpoint cut short is never taken for a complete one."""

from __future__ import annotations

import math

import pytest

from mammo_ray.config import Config, load_config
from mammo_ray.train.in_process import CheckpointFolder, runs_in_process, trial_resources


def _save(folder: CheckpointFolder, epoch: int, val_loss: float, val_auc: float = 0.5):
    return folder.save(
        {"config": {}, "epoch": epoch}, {"epoch": float(epoch), "val_loss": val_loss, "val_auc": val_auc}
    )


def test_prune_keeps_the_best_by_the_monitor_and_the_latest(tmp_path):
    folder = CheckpointFolder(tmp_path)
    for epoch, loss in enumerate([0.9, 0.4, math.nan, 0.6, 0.7]):
        _save(folder, epoch, loss)
        folder.prune(2, "val_loss")
    assert [c.epoch for c in folder.checkpoints()] == [1, 3, 4]  # the best two (0.4, 0.6), and the latest
    assert folder.best("val_loss").epoch == 1
    assert folder.latest().epoch == 4
    folder.prune(1, "val_loss")
    assert [c.epoch for c in folder.checkpoints()] == [1, 4]


def test_best_follows_the_metric_direction_and_never_picks_nan(tmp_path):
    folder = CheckpointFolder(tmp_path)
    _save(folder, 0, 0.3, val_auc=math.nan)
    _save(folder, 1, 0.5, val_auc=0.8)
    _save(folder, 2, math.nan, val_auc=0.7)
    assert folder.best("val_loss").epoch == 0  # lower is better
    assert folder.best("val_auc").epoch == 1  # higher is better; NaN skipped
    only_nan = CheckpointFolder(tmp_path / "nan")
    _save(only_nan, 0, math.nan)
    assert only_nan.best("val_loss") is None and only_nan.latest().epoch == 0
    folder.prune(1, "val_auc")  # NaN ranks last: epoch 1 (best) and epoch 2 (latest) stay
    assert [c.epoch for c in folder.checkpoints()] == [1, 2]


def test_a_checkpoint_without_its_metrics_file_is_not_complete(tmp_path):
    folder = CheckpointFolder(tmp_path)
    _save(folder, 0, 0.5)
    cut = _save(folder, 1, 0.4)
    (cut.directory / "metrics.json").unlink()  # the process died between the two writes
    assert [c.epoch for c in folder.checkpoints()] == [0]
    assert folder.latest().epoch == 0
    assert CheckpointFolder(tmp_path / "missing").latest() is None


@pytest.mark.parametrize(
    ("overrides", "in_process", "resources"),
    [
        ([], True, {"cpu": 1.0}),
        (
            ["train.use_gpu=true", "train.cpus_per_worker=2", "train.gpus_per_worker=0.25"],
            True,
            {"cpu": 2.0, "gpu": 0.25},
        ),
        (["train.num_workers=2"], False, {"cpu": 0.01}),
        (["train.in_process=false"], False, {"cpu": 0.01}),
    ],
)
def test_a_one_worker_trial_holds_its_workers_resources(overrides, in_process, resources):
    config: Config = load_config(None, overrides)
    assert runs_in_process(config) is in_process
    assert trial_resources(config, driver_cpu=0.01) == resources
