"""Ray Train (V2, Ray 2.60): the plain loop of ``loop.py`` inside a ``TorchTrainer``.

Ray appears in three marked places in the worker: preparing the model (DDP), preparing the
loaders (device placement), and reporting each epoch with a checkpoint from rank 0. A new
trainer with the same ``RunConfig(name, storage_path)`` restores itself after a worker
failure, and ``ray.train.get_checkpoint()`` then hands the worker the latest checkpoint, so
finished epochs are not repeated. (An epoch counts as finished once the controller has
collected its report; it polls every 2 s, so a worker that dies within 2 s of reporting
can cost that one epoch.)

Fault injection, for the tests of that resume: ``inject_fault(FaultInjection(...))`` around a
``run_training`` call has one worker SIGKILL itself once, mid-epoch. It is a context manager, not
a parameter of ``run_training``, so the public call stays what a user runs.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

# The Train V2 classes, which `ray.train` and `ray.train.torch` re-export at run time (V2 is the default in
# Ray 2.60); imported from their own modules so that type checks see them too.
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2.torch.torch_trainer import TorchTrainer

from mammo_ray.config import Config, metric_mode
from mammo_ray.train.checkpoint import load_checkpoint, save_checkpoint
from mammo_ray.train.loop import EarlyStopping, build_training, epoch_line, fit, restore_training, training_payload
from mammo_ray.train.progress import announce
from mammo_ray.train.storage import is_uri
from mammo_ray.train.tracking import log_metrics


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: worker ``rank`` SIGKILLs itself once, ``delay_s`` into epoch ``epoch``.

    The marker file makes it once: the worker writes its pid there before dying, and a restarted
    worker that finds it carries on. The delay matters: the controller collects reports when it
    polls the workers (every 2 s), so a report made just before a worker dies can be lost, and that
    epoch is trained again. Killing the worker well after its last report tests a kill of an epoch
    in progress.
    """

    rank: int  # the world rank that dies
    epoch: int  # the epoch (0-based) it dies in
    marker: str  # file written once the kill happened
    delay_s: float = 0.0  # seconds into the epoch


_FAULT: ContextVar[FaultInjection | None] = ContextVar("mammo_ray_fault", default=None)


@contextmanager
def inject_fault(fault: FaultInjection) -> Iterator[FaultInjection]:
    """Runs started inside this block (``run_training``) carry ``fault`` to their workers."""
    token = _FAULT.set(fault)
    try:
        yield fault
    finally:
        _FAULT.reset(token)


def loop_config(
    config: Config,
    cache_dir: str | Path,
    *,
    mlflow_uri: str | None = None,
    run_id: str | None = None,
    fold: int | None = None,
    splits_path: str | Path | None = None,
) -> dict[str, Any]:
    """The plain-data ``train_loop_config`` handed to every worker (with the ``inject_fault`` in effect)."""
    fault = _FAULT.get()
    return {
        "config": config.model_dump(mode="json"),
        "cache_dir": str(cache_dir),
        "mlflow_uri": mlflow_uri,
        "run_id": run_id,
        "fold": fold,
        "splits_path": str(splits_path) if splits_path else None,
        "fault": asdict(fault) if fault is not None else None,
    }


def maybe_inject_fault(fault: FaultInjection | None, rank: int, epoch: int) -> None:
    """Kill this worker if ``fault`` says so for this rank and epoch, and it has not happened yet."""
    if fault is None or rank != fault.rank or epoch != fault.epoch:
        return
    marker = Path(fault.marker)
    if marker.exists():
        return
    time.sleep(fault.delay_s)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore the latest checkpoint if any, train, report."""
    config = Config.model_validate(cfg["config"])
    fault = FaultInjection(**cfg["fault"]) if cfg.get("fault") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # one worker per CPU: more threads would fight over the cores
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    training = build_training(
        config,
        cfg["cache_dir"],
        device=device,
        rank=rank,
        world=world,
        fold=cfg["fold"],
        splits_path=cfg["splits_path"],
    )
    stopper = EarlyStopping(config.train.monitor, config.train.early_stop_patience)
    start_epoch, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch = restore_training(training, load_checkpoint(directory, map_location=device), stopper)
        resumed_from = start_epoch

    training.model = ray.train.torch.prepare_model(training.model)  # Ray 1/3: DDP (and device placement)
    training.train_loader = ray.train.torch.prepare_data_loader(
        training.train_loader,  # Ray 2/3: device
        add_dist_sampler=False,
    )  # EpochSampler shards
    training.val_loader = ray.train.torch.prepare_data_loader(training.val_loader, add_dist_sampler=False)

    def on_epoch(epoch: int, metrics: dict[str, float], last: bool) -> None:
        metrics = {
            **metrics,
            "epochs_done": float(epoch + 1),
            "resumed_from_epoch": float(-1 if resumed_from is None else resumed_from),
        }
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)  # Ray 3/3: every rank reports (a barrier)
            return
        announce(cfg, epoch_line(config, epoch, metrics))  # the driver prints it (train/progress.py)
        if cfg["run_id"]:
            log_metrics(cfg["mlflow_uri"], cfg["run_id"], metrics, step=epoch)
        payload = training_payload(training, stopper, epoch, rank0_pid=os.getpid())
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(payload, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(
        training,
        start_epoch=start_epoch,
        stopper=stopper,
        on_epoch=on_epoch,
        before_epoch=lambda epoch: maybe_inject_fault(fault, rank, epoch),
    )


def build_trainer(
    config: Config,
    train_loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` whose scaling, failure and checkpoint policies come from the config.

    ``callbacks`` go to the ``RunConfig`` (a Tune trial passes ``TuneReportCallback``)."""
    t = config.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    # A URI (s3://, gs://) goes to Ray as the string it is (pyarrow.fs resolves it); a local path must be
    # absolute, since a relative one fails obscurely in Ray.
    if not is_uri(storage_path) and not Path(storage_path).is_absolute():
        raise ValueError(f"train.storage_path must be absolute or a URI (s3://, gs://), got {storage_path!r}")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # progress: one line per epoch from rank 0
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=t.monitor,
                checkpoint_score_order=metric_mode(t.monitor),
            ),
        ),
    )
