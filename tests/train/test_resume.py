"""Resuming a Ray Train worker from its checkpoint continues the run it interrupted, exactly.

``train_loop_per_worker`` runs here in-process with Ray Train's worker calls (context, device,
checkpoint, report, prepare) stood in for by a recorder, so the resume path is checked
deterministically and in seconds: an uninterrupted run, and a run restarted from its epoch-1
checkpoint, must agree on every later epoch (weights, optimizer moments, learning rates, scheduler,
history, early-stopping state). tests/train/test_ray_train.py checks the same after a real SIGKILL
on a 2-worker Ray run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train
import ray.train.torch
import torch
from crop_caches import mlo_signal_cache

from mammo_ray.config import load_config
from mammo_ray.train.checkpoint import load_checkpoint, save_checkpoint
from mammo_ray.train.in_process import CheckpointFolder, train_in_process
from mammo_ray.train.ray_train import loop_config, train_loop_per_worker

pytestmark = pytest.mark.slow

EPOCHS, RESUME_AFTER = 4, 1  # the restarted run gets the checkpoint of epoch 1 and trains epochs 2 and 3
# Deterministic training: no dropout, no random crop (input_px == cache_px), no flips, so a resumed
# epoch must reproduce the uninterrupted one bit for bit. The poly schedule depends on the
# scheduler's own epoch count, so a scheduler that is not restored shows in the learning rate.
DETERMINISTIC = [
    "data.cache_px=32",
    "data.input_px=32",
    "data.normalization=global",
    "data.hflip=false",
    "data.num_workers=0",
    "model.name=levynet",
    "model.dropout=0.0",
    "optim.name=adam",
    "optim.lr=0.003",
    "optim.schedule=poly",
    "train.batch_size=8",
    f"train.epochs={EPOCHS}",
    "train.monitor=val_loss",
]
TIMING = ("train_images_per_s", "epoch_seconds")  # the metrics that are not a function of the data and weights


class FakeTrainWorker:
    """Rank 0 of 1 on the CPU: hands out ``checkpoint`` and records what the loop reports."""

    def __init__(self, store: Path, checkpoint: Path | None = None) -> None:
        self.store, self.checkpoint = store, checkpoint
        self.reports: list[tuple[dict[str, float], Path]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
        monkeypatch.setattr(ray.train, "get_context", lambda: context)
        monkeypatch.setattr(ray.train, "get_checkpoint", self._get_checkpoint)
        monkeypatch.setattr(ray.train, "report", self._report)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
        monkeypatch.setattr(ray.train.torch, "prepare_data_loader", lambda loader, **_: loader)

    def _get_checkpoint(self):
        return None if self.checkpoint is None else ray.train.Checkpoint(str(self.checkpoint))

    def _report(self, metrics, checkpoint=None) -> None:
        assert checkpoint is not None  # rank 0 reports every epoch with its checkpoint
        kept = self.store / f"epoch-{len(self.reports)}"
        with checkpoint.as_directory() as directory:  # the loop deletes its directory after reporting
            shutil.copytree(directory, kept)
        self.reports.append((dict(metrics), kept))

    def payload(self, i: int) -> dict:
        return load_checkpoint(self.reports[i][1])


@pytest.fixture
def threads():
    """The worker sets torch's thread count to its CPUs; give the test process its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return mlo_signal_cache(tmp_path_factory.mktemp("cache") / "cache", {"train": 24, "val": 12}, px=32)


def _run(monkeypatch, tmp_path: Path, cache_dir: Path, name: str, checkpoint: Path | None = None, *overrides: str):
    worker = FakeTrainWorker(tmp_path / name, checkpoint)
    worker.install(monkeypatch)
    config = load_config(None, [*DETERMINISTIC, *overrides])
    train_loop_per_worker(loop_config(config, cache_dir))
    return worker


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def _assert_same_state(a, b) -> None:
    """Equal nested state: tensors bit for bit, numbers exactly (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


def test_a_resumed_worker_continues_the_interrupted_run_exactly(monkeypatch, tmp_path, cache_dir, threads):
    whole = _run(monkeypatch, tmp_path, cache_dir, "whole")
    assert len(whole.reports) == EPOCHS
    resumed = _run(monkeypatch, tmp_path, cache_dir, "resumed", whole.reports[RESUME_AFTER][1])
    assert len(resumed.reports) == EPOCHS - RESUME_AFTER - 1  # no finished epoch is trained again
    config = load_config(None, DETERMINISTIC)
    schedule = [config.optim.lr * (1 - epoch / EPOCHS) ** config.optim.poly_power for epoch in range(EPOCHS)]
    for (metrics, _), epoch in zip(resumed.reports, range(RESUME_AFTER + 1, EPOCHS), strict=True):
        assert metrics["epoch"] == epoch and metrics["resumed_from_epoch"] == RESUME_AFTER + 1
        assert metrics["lr"] == pytest.approx(schedule[epoch], rel=1e-12)  # the schedule goes on where it was
        expected = {k: v for k, v in whole.reports[epoch][0].items() if k not in (*TIMING, "resumed_from_epoch")}
        got = {k: v for k, v in metrics.items() if k not in (*TIMING, "resumed_from_epoch")}
        _assert_same_state(got, expected)  # same losses and AUCs: same weights and optimizer moments
    last_whole, last_resumed = whole.payload(EPOCHS - 1), resumed.payload(-1)
    assert [h["lr"] for h in last_resumed["history"]] == pytest.approx(schedule, rel=1e-12)
    _assert_same_state(_without_timing(last_resumed["history"]), _without_timing(last_whole["history"]))
    for part in ("model", "optimizer", "scheduler", "epoch"):
        _assert_same_state(last_resumed[part], last_whole[part])
    _assert_same_state(last_resumed["extra"]["stopper"], last_whole["extra"]["stopper"])


def test_a_resumed_worker_keeps_its_early_stopping_count(monkeypatch, tmp_path, cache_dir, threads):
    """A checkpoint whose stopper has waited one epoch already, with patience 2, stops after one more."""
    first = _run(monkeypatch, tmp_path, cache_dir, "first", None, "optim.schedule=constant", "train.epochs=1")
    payload = first.payload(0)
    payload["extra"]["stopper"] = {"best": 0.0, "bad_epochs": 1}  # a val loss of 0: never beaten
    waited = tmp_path / "waited"
    save_checkpoint(payload, waited)
    resumed = _run(
        monkeypatch, tmp_path, cache_dir, "resumed", waited, "optim.schedule=constant", "train.early_stop_patience=2"
    )
    assert [m["epoch"] for m, _ in resumed.reports] == [1.0]  # stopped at its first epoch, not at EPOCHS
    assert resumed.payload(0)["extra"]["stopper"] == {"best": 0.0, "bad_epochs": 2}
    assert len(resumed.payload(0)["history"]) == 2  # epoch 0 from the checkpoint, epoch 1 trained here


class Interrupted(Exception):
    """Stands in for a trial process that dies once its epoch-``RESUME_AFTER`` checkpoint is saved."""


def test_an_in_process_trial_resumes_from_its_checkpoint_folder_exactly(tmp_path, cache_dir, threads):
    """The in-process path of a 1-worker Tune trial (train/in_process.py) keeps the same promise, with
    its own checkpoint folder: a rerun of the same name continues where the interrupted run stopped."""
    config = load_config(None, [*DETERMINISTIC, "train.keep_checkpoints=1"])
    whole_reports: list[dict] = []
    whole = train_in_process(loop_config(config, cache_dir), CheckpointFolder(tmp_path / "whole"), whole_reports.append)
    assert [m["epoch"] for m in whole_reports] == list(range(EPOCHS))
    best = min(whole_reports, key=lambda m: m["val_loss"])
    kept = {c.directory for c in whole.checkpoints()}  # keep_checkpoints=1: the best by val_loss, and the latest
    assert kept == {Path(best["checkpoint_path"]), Path(whole_reports[-1]["checkpoint_path"])}
    assert whole.best("val_loss").epoch == best["epoch"]

    folder, cut_reports = CheckpointFolder(tmp_path / "cut"), []

    def report_then_die(metrics: dict) -> None:
        cut_reports.append(metrics)
        if metrics["epoch"] == RESUME_AFTER:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_in_process(loop_config(config, cache_dir), folder, report_then_die)
    resumed_reports: list[dict] = []
    train_in_process(loop_config(config, cache_dir), folder, resumed_reports.append)
    assert [m["epoch"] for m in resumed_reports] == list(range(RESUME_AFTER + 1, EPOCHS))
    schedule = [config.optim.lr * (1 - epoch / EPOCHS) ** config.optim.poly_power for epoch in range(EPOCHS)]
    skip = (*TIMING, "resumed_from_epoch", "checkpoint_path")
    for metrics in resumed_reports:
        epoch = int(metrics["epoch"])
        assert metrics["resumed_from_epoch"] == RESUME_AFTER + 1 and metrics["lr"] == pytest.approx(schedule[epoch])
        _assert_same_state(
            {k: v for k, v in metrics.items() if k not in skip},
            {k: v for k, v in whole_reports[epoch].items() if k not in skip},
        )
    last_whole, last_resumed = (load_checkpoint(f.latest().directory) for f in (whole, folder))
    _assert_same_state(_without_timing(last_resumed["history"]), _without_timing(last_whole["history"]))
    for part in ("model", "optimizer", "scheduler", "epoch"):
        _assert_same_state(last_resumed[part], last_whole[part])
