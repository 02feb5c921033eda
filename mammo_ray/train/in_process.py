"""A 1-worker training run in the calling process: the plain loop with Ray Train's checkpoint policy.

A search trial, an ensemble member or a cross-validation fold that trains on one worker needs
no Ray Train. A ``TorchTrainer`` starts a controller, a placement group and a worker actor
every time, about 15 s on 2 cores, which is most of a small trial and a real share of a large
one. So a Tune trial (or a fold's Ray task) whose config says ``train.num_workers: 1`` (and
``train.in_process: true``, the default) holds the worker's CPUs and GPU share itself
(``trial_resources``) and runs ``loop.fit`` here, keeping what Ray Train gave it:

- one checkpoint per epoch under ``<storage_path>/<run name>/``, of which the
  ``train.keep_checkpoints`` best by ``train.monitor`` are kept, and the latest too. The storage
  path may be object storage (``s3://``, ``gs://``): each checkpoint is written to a local temporary
  folder and uploaded, and the resume downloads the latest (``storage.py``);
- resume: a run of the same name continues from its latest checkpoint, with the optimizer,
  scheduler, history and early-stopping state. A trial that Tune restarts after a failure
  (``train.max_failures``) or after ``--resume`` finds it there;
- every epoch's metrics, with ``checkpoint_path``, handed to ``report`` (Tune's, so ASHA sees
  each epoch), and logged to the MLflow run;
- the fault injection of ``ray_train.inject_fault``, which here kills the trial's own process.

Multi-worker runs, and every ``mammo-ray train``, keep the ``TorchTrainer`` of ``ray_train.py``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mammo_ray.config import Config, metric_mode
from mammo_ray.train import storage
from mammo_ray.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from mammo_ray.train.loop import EarlyStopping, build_training, epoch_line, fit, restore_training, training_payload
from mammo_ray.train.progress import announce
from mammo_ray.train.ray_train import FaultInjection, maybe_inject_fault
from mammo_ray.train.tracking import log_metrics

CHECKPOINT_PREFIX = "checkpoint_epoch_"
METRICS_FILE = "metrics.json"

Report = Callable[[dict[str, Any]], None]


def runs_in_process(config: Config) -> bool:
    """Whether a Tune trial or fold task of ``config`` trains in its own process instead of a ``TorchTrainer``."""
    return config.train.in_process and config.train.num_workers == 1


def trial_resources(config: Config, *, driver_cpu: float) -> dict[str, float]:
    """What a Tune trial of ``config`` holds: the worker's CPUs and GPU share when it trains itself,
    else a sliver of a CPU (``driver_cpu``) to drive the ``TorchTrainer`` whose workers hold the rest."""
    t = config.train
    if not runs_in_process(config):
        return {"cpu": driver_cpu}
    resources = {"cpu": t.cpus_per_worker}
    if t.use_gpu:
        resources["gpu"] = t.gpus_per_worker
    return resources


@dataclass(frozen=True)
class SavedCheckpoint:
    directory: storage.Location  # a local folder (a ``Path``), or a URI on object storage
    metrics: dict[str, float]

    @property
    def epoch(self) -> int:
        return int(self.metrics["epoch"])


def _score(checkpoint: SavedCheckpoint, metric: str) -> float:
    """``metric`` signed so that higher is better; -inf for a missing or NaN value (it never wins)."""
    value = float(checkpoint.metrics.get(metric, math.nan))
    return -math.inf if math.isnan(value) else (-value if metric_mode(metric) == "min" else value)


@dataclass(frozen=True)
class CheckpointFolder:
    """``<storage_path>/<run name>``: the run's checkpoints, one folder per epoch (a local folder or a URI)."""

    path: storage.Location

    def checkpoints(self) -> list[SavedCheckpoint]:
        """The complete checkpoints, oldest first (a folder without its metrics file was cut short)."""
        files = storage.list_files(self.path)  # one listing, also on object storage
        found = []
        for name in sorted({f.split("/")[0] for f in files if f.startswith(CHECKPOINT_PREFIX)}):
            if f"{name}/{CHECKPOINT_FILE}" in files and f"{name}/{METRICS_FILE}" in files:
                directory = storage.join(self.path, name)
                metrics = json.loads(storage.read_text(storage.join(directory, METRICS_FILE)))
                found.append(SavedCheckpoint(directory, metrics))
        return found

    def latest(self) -> SavedCheckpoint | None:
        saved = self.checkpoints()
        return saved[-1] if saved else None

    def best(self, metric: str) -> SavedCheckpoint | None:
        """The checkpoint with the best finite ``metric`` (a NaN never wins); None when none has one."""
        best = max(self.checkpoints(), key=lambda c: (_score(c, metric), c.epoch), default=None)
        return best if best is not None and _score(best, metric) > -math.inf else None

    def save(self, payload: dict[str, Any], metrics: dict[str, float]) -> SavedCheckpoint:
        """Write epoch ``metrics["epoch"]``'s checkpoint; the metrics file last, so it marks a complete one."""
        directory = storage.join(self.path, f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}")
        with storage.staged(directory) as local:
            save_checkpoint(payload, local)
        storage.write_text(storage.join(directory, METRICS_FILE), json.dumps(metrics))
        return SavedCheckpoint(directory, metrics)

    def prune(self, keep: int, metric: str) -> None:
        """Keep the ``keep`` best by ``metric`` (NaN last) and the latest; delete the rest."""
        saved = self.checkpoints()
        kept = {c.directory for c in sorted(saved, key=lambda c: _score(c, metric), reverse=True)[:keep]}
        if saved:
            kept.add(saved[-1].directory)
        for c in saved:
            if c.directory not in kept:
                storage.delete_dir(c.directory)


def _device(config: Config) -> torch.device:
    if not config.train.use_gpu:
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))  # the trial holds that many CPUs
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "train.use_gpu=true but this trial's process sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    torch.cuda.set_device(0)  # Ray makes the trial's GPU the only visible one
    return torch.device("cuda", 0)


def train_in_process(cfg: dict[str, Any], folder: CheckpointFolder, report: Report | None = None) -> CheckpointFolder:
    """Train one worker here from ``cfg`` (``ray_train.loop_config``), resuming from ``folder``'s latest checkpoint.

    ``report(metrics)`` gets every epoch's metrics with ``checkpoint_path``; returns ``folder``."""
    config = Config.model_validate(cfg["config"])
    fault = FaultInjection(**cfg["fault"]) if cfg.get("fault") else None
    device = _device(config)
    training = build_training(config, cfg["cache_dir"], device=device, fold=cfg["fold"], splits_path=cfg["splits_path"])
    t = config.train
    stopper = EarlyStopping(t.monitor, t.early_stop_patience)
    start_epoch, resumed_from = 0, -1
    latest = folder.latest()
    if latest is not None:
        with storage.fetched(latest.directory) as directory:
            payload = load_checkpoint(directory, map_location=device)
        start_epoch = resumed_from = restore_training(training, payload, stopper)

    def on_epoch(epoch: int, metrics: dict[str, float], last: bool) -> None:
        metrics = {**metrics, "epochs_done": float(epoch + 1), "resumed_from_epoch": float(resumed_from)}
        announce(cfg, epoch_line(config, epoch, metrics))
        if cfg["run_id"]:
            log_metrics(cfg["mlflow_uri"], cfg["run_id"], metrics, step=epoch)
        saved = folder.save(training_payload(training, stopper, epoch, rank0_pid=os.getpid()), metrics)
        folder.prune(t.keep_checkpoints, t.monitor)
        if report is not None:
            report({**metrics, "checkpoint_path": str(saved.directory)})

    fit(
        training,
        start_epoch=start_epoch,
        stopper=stopper,
        on_epoch=on_epoch,
        before_epoch=lambda epoch: maybe_inject_fault(fault, 0, epoch),
    )
    return folder
