"""One tracked training run, driven from the Ray driver: data, MLflow run, ``TorchTrainer.fit``,
final evaluation, artifacts. Also K-fold cross-validation (paper 004), with one Ray task per fold.

Every output goes under ``<workdir>/runs/<run name>/``: the resolved config, the reported
checkpoint, predictions, metrics and plots. The same files are logged to MLflow, with the network
as a logged model of the run (``log_model``) that ``mlflow.pytorch.load_model("models:/<model_id>")``
loads back. Ray's own state (the Train run's checkpoints, or the in-process run's) goes under
``train.storage_path``, a local folder or object storage (``storage.py``).

Which checkpoint a run reports (``checkpoint_rule``): a plain run reports its best epoch by
``train.monitor`` on the val split. A cross-validation fold cannot: its validation patients are
the patients it reports, and a score on the data that picked the epoch is optimistic. So a fold
trains a fixed ``train.epochs`` with early stopping off and reports its last epoch; the
outcome's ``selection`` says so.

Results are typed: ``TrainOutcome`` for one run, ``FoldsOutcome`` for a cross-validation; their
``to_dict`` is what ``mammo-ray train --json`` prints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.pytorch
import numpy as np
import ray
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, infer_signature
from ray.util.queue import Queue

from mammo_ray import tags
from mammo_ray.config import Config, metric_mode, save_config, with_values
from mammo_ray.data.pipeline import PreparedData, ensure_prepared
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.train import storage
from mammo_ray.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_model, store_decisions
from mammo_ray.train.evaluation import evaluate_checkpoint
from mammo_ray.train.in_process import CheckpointFolder, Report, runs_in_process, train_in_process, trial_resources
from mammo_ray.train.lineage import log_data_inputs
from mammo_ray.train.progress import PREFIX_KEY, QUEUE_KEY, EpochLines
from mammo_ray.train.ray_train import build_trainer, loop_config
from mammo_ray.train.tracking import TrackedRun, artifact_root, tracking_uri


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    tracking_uri: str
    checkpoint: str  # the reported checkpoint (see ``selection``), copied under the run folder
    output_dir: str
    metrics: dict[str, float]  # final validation metrics of that checkpoint (val_auc, val_loss, ...)
    best_epoch: int  # the epoch of the reported checkpoint (the last one for a fold)
    epochs_run: int  # less than train.epochs after an early stop
    status: str
    selection: str = ""  # how the checkpoint was chosen (``CheckpointRule.selection``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MetricSpread:
    """One metric over the folds of a cross-validation."""

    mean: float  # nanmean over the folds
    std: float  # nanstd (population) over the folds
    values: list[float]  # per fold, in fold order


@dataclass
class FoldsOutcome:
    """A K-fold cross-validation: the parent run, each fold's outcome, and every metric's spread."""

    run_id: str  # the parent MLflow run
    run_name: str
    tracking_uri: str
    folds: int
    selection: str  # how each fold's checkpoint was chosen (the same for every fold)
    output_dir: str
    summary: dict[str, MetricSpread]  # metric -> spread over the folds
    fold_runs: list[TrainOutcome]  # in fold order
    metrics: dict[str, float]  # metric -> mean over the folds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointRule:
    """Which checkpoint a run reports, and the sentence that says so in its outcome."""

    last: bool  # the last epoch's checkpoint; else the best by train.monitor
    selection: str


def checkpoint_rule(config: Config, fold: int | None) -> tuple[Config, CheckpointRule]:
    """The config a run trains with and the checkpoint it reports.

    A fold is validated on the patients it reports, so they must neither pick its epoch nor stop
    it early: the fold trains ``train.epochs`` with ``early_stop_patience`` off and reports the last
    epoch. ``train.stop_train_acc`` stays (paper 004's rule looks at training batches only).
    """
    t = config.train
    if fold is None:
        return config, CheckpointRule(
            last=False,
            selection=f"best epoch by train.monitor={t.monitor} on the val "
            "split, which the reported val metrics also score",
        )
    fixed = with_values(config, {"train.early_stop_patience": None}, f"fold {fold}")
    selection = f"fixed epochs (train.epochs={t.epochs}): the fold is not used to pick the checkpoint"
    if t.stop_train_acc is not None:
        selection += (
            f"; training stops earlier once train accuracy reaches train.stop_train_acc={t.stop_train_acc:g}"
            " (training batches only)"
        )
    return fixed, CheckpointRule(last=True, selection=selection)


def run_name_for(config: Config, fold: int | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-fold{fold}" if fold is not None else ""
    return f"{config.model.name}-{config.model.view_mode}{suffix}-{stamp}-{uuid.uuid4().hex[:6]}"


def log_model(run: TrackedRun, checkpoint: Path, payload: dict[str, Any] | None = None) -> str:
    """The checkpoint's network as an MLflow 3 logged model of the run (the UI's Model column), loadable
    with ``mlflow.pytorch.load_model("models:/<model_id>")``: its signature and input example are the
    preprocessed tensor batch it takes (``mammo_ray.load`` and the registered ensemble take images).
    Returns the model id. ``payload``: the checkpoint's content when the caller has already read it."""
    payload = load_checkpoint(checkpoint) if payload is None else payload
    model, spec, config = restore_model(payload)
    example = build_eval_transform(spec)(np.full((spec.cache_px,) * 2, 1000, np.uint16)).unsqueeze(0)
    inputs = (example, example.clone()) if config.model.view_mode == "multimodal" else example
    with torch.inference_mode():
        output = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    example_np = example.numpy()
    run_info = run.client.get_run(run.run_id).info
    logged = run.client.create_logged_model(
        run_info.experiment_id,
        name=config.model.name,
        source_run_id=run.run_id,
        params={"view_mode": config.model.view_mode, "in_chans": str(config.model.in_chans)},
        model_type="mammo-ray network",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model"
            mlflow.pytorch.save_model(
                model,
                str(target),
                serialization_format="pickle",  # the MLflow flavour's format; checkpoint.pt loads weights only
                signature=infer_signature(example_np, output.numpy()),
                input_example=None if config.model.view_mode == "multimodal" else example_np,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mammo-ray"],
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run.run_id, model_id=logged.model_id),
            )
            run.client.log_model_artifacts(logged.model_id, str(target))
    except BaseException:
        run.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    run.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    run.client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def check_resources(config: Config, fold: int | None = None) -> None:
    """Fail fast on what would otherwise hang or fail deep inside a worker."""
    t = config.train
    if fold is None and config.data.split_fractions[1] == 0:
        raise ValueError(
            "data.split_fractions leaves no validation patients: train with --folds K (paper 004) or give val a share"
        )
    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):  # a cluster may autoscale: let Ray wait
        available = ray.cluster_resources()
        if t.use_gpu and available.get("GPU", 0) < t.gpus_per_worker:
            raise ValueError(
                f"train.use_gpu=true but the Ray cluster has {available.get('GPU', 0):g} GPUs; "
                "run on a GPU cluster or --set train.use_gpu=false"
            )
        cpus = available.get("CPU", 0)
        if not t.use_gpu and t.num_workers * t.cpus_per_worker > cpus:
            raise ValueError(
                f"train.num_workers x train.cpus_per_worker = {t.num_workers * t.cpus_per_worker:g} "
                f"CPUs, but the Ray cluster has {cpus:g}"
            )


def run_training(
    config: Config,
    workdir: str | Path,
    *,
    prepared: PreparedData | None = None,
    parent_run_id: str | None = None,
    fold: int | None = None,
    run_name: str | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
    extra_tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    in_process: bool = False,
    report: Report | None = None,
    progress_queue: Queue | None = None,
    progress_prefix: str = "",
) -> TrainOutcome:
    """Train one model with Ray Train (or here, with ``in_process``) and track it in MLflow (Ray must be initialised).

    Args:
        prepared: the prepared data (made from ``config.data`` in the workdir when None).
        parent_run_id: nest this run (a cross-validation fold) under a parent MLflow run.
        fold: train on the other folds and validate on this one (needs ``data.folds``).
        callbacks: Ray Train ``RunConfig`` callbacks (a Tune trial's ``TuneReportCallback``).
        extra_tags: more MLflow tags (names in ``mammo_ray.tags``).
        resume_run_id: continue this MLflow run (a restarted trial) instead of opening a new one;
            the Train run of the same name resumes from its latest checkpoint by itself.
        in_process: train one worker in this process instead of a ``TorchTrainer`` (``in_process.py``),
            for a Tune trial or Ray task that holds the worker's resources itself (``trial_resources``);
            ``callbacks`` are then unused.
        report: with ``in_process``, gets each epoch's metrics (Tune's ``report`` in a trial).
        progress_queue: where the epoch lines go (``train.progress``: a fold task sends them to the
            cross-validation's driver); None with ``progress``: a Ray Train run's lines are printed here.
        progress_prefix: what each epoch line starts with ("[fold 2] ").
    """
    workdir = Path(workdir).resolve()
    config, rule = checkpoint_rule(config, fold)
    check_resources(config, fold)
    prepared = prepared or ensure_prepared(config, workdir, progress=progress)
    uri = tracking_uri(config, workdir)
    name = run_name or run_name_for(config, fold)
    out_dir = workdir / "runs" / name
    config_path = save_config(config, out_dir)
    run_tags = {
        tags.CACHE_DIR: prepared.cache_dir,
        tags.SPLITS: prepared.splits,
        tags.OUTPUT_DIR: str(out_dir),
        tags.KIND: "fold" if fold is not None else "train",
        **(extra_tags or {}),
    }
    if fold is not None:
        run_tags[tags.FOLD] = str(fold)
    with TrackedRun(
        uri,
        config.train.experiment,
        name,
        config=config,
        tags=run_tags,
        parent_run_id=parent_run_id,
        artifact_location=artifact_root(uri, workdir),
        run_id=resume_run_id,
    ) as run:
        run.log_artifact(config_path)
        if resume_run_id is None:
            log_data_inputs(run.client, run.run_id, prepared)
        cfg = loop_config(
            config, prepared.cache_dir, mlflow_uri=uri, run_id=run.run_id, fold=fold, splits_path=prepared.splits
        )
        storage_path = storage.storage_path_for(config, workdir)  # a local folder or a URI (s3://, gs://)
        checkpoint = out_dir / CHECKPOINT_FILE
        cfg[PREFIX_KEY], cfg[QUEUE_KEY] = progress_prefix, progress_queue
        with contextlib.ExitStack() as stack:
            if in_process:  # the lines are printed in this process
                epochs_run = _fit_in_process(config, cfg, name, storage_path, rule, report, checkpoint)
            else:
                if progress_queue is None and progress:  # the workers' lines, printed here
                    cfg[QUEUE_KEY] = stack.enter_context(EpochLines()).queue
                epochs_run = _fit_ray_train(config, cfg, name, storage_path, rule, callbacks, checkpoint)
        payload = load_checkpoint(checkpoint)
        evaluation = evaluate_checkpoint(
            checkpoint,
            "val",
            workdir,
            out_dir,
            n_boot=config.train.eval_bootstrap,
            cache_dir=prepared.cache_dir,
            fold=fold,
            splits_path=prepared.splits,
            plots=config.train.plots,
            payload=payload,  # read once here: each read of a small network's file cost a tiny member ~20 ms
        )
        metrics = evaluation.metrics
        if evaluation.policy is not None:  # calibration, thresholds and referral cut-off travel with the model
            store_decisions(checkpoint, evaluation.policy.to_dict(), payload)
        run.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=payload["epoch"])
        run.set_tags(
            {
                tags.BEST_EPOCH: payload["epoch"],
                tags.CHECKPOINT: checkpoint,
                tags.SELECTION: rule.selection,
            }
        )
        run.log_artifacts(evaluation.plots, "plots")
        decided = [evaluation.decisions["json"]] if evaluation.decisions else []
        run.log_artifacts([evaluation.predictions, out_dir / "metrics_val.json", *decided], "evaluation")
        run.log_artifact(checkpoint, "checkpoint")
        if config.train.log_model:
            log_model(run, checkpoint, payload)
    return TrainOutcome(
        run_id=run.run_id,
        run_name=name,
        tracking_uri=uri,
        checkpoint=str(checkpoint),
        output_dir=str(out_dir),
        metrics=metrics,
        best_epoch=int(payload["epoch"]),
        epochs_run=epochs_run,
        status=run.status or "",
        selection=rule.selection,
    )


def _fit_ray_train(
    config: Config,
    cfg: dict[str, Any],
    name: str,
    storage_path: storage.Location,
    rule: CheckpointRule,
    callbacks: list[Any] | None,
    target: Path,
) -> int:
    """Fit a ``TorchTrainer``, copy the checkpoint ``rule`` picks to ``target``; returns the epochs run."""
    result = build_trainer(config, cfg, name=name, storage_path=storage_path, callbacks=callbacks).fit()
    if result.error is not None:
        raise result.error
    monitor = config.train.monitor
    best = (
        result.checkpoint
        if rule.last
        else (result.get_best_checkpoint(monitor, metric_mode(monitor)) or result.checkpoint)
    )
    if best is None:
        raise RuntimeError(f"run {name}: training reported no checkpoint")
    with best.as_directory() as directory:
        shutil.copy2(Path(directory) / CHECKPOINT_FILE, target)
    return int(result.metrics["epoch"]) + 1 if result.metrics else len(load_checkpoint(target)["history"])


def _fit_in_process(
    config: Config,
    cfg: dict[str, Any],
    name: str,
    storage_path: storage.Location,
    rule: CheckpointRule,
    report: Report | None,
    target: Path,
) -> int:
    """Train one worker here (``in_process.py``), copy the checkpoint ``rule`` picks to ``target``;
    returns the epochs run."""
    if config.train.num_workers != 1:
        raise ValueError(
            f"run {name}: in-process training is for one worker, not train.num_workers={config.train.num_workers}"
        )
    folder = train_in_process(cfg, CheckpointFolder(storage.join(storage_path, name)), report)
    latest = folder.latest()
    if latest is None:
        raise RuntimeError(f"run {name}: training reported no checkpoint")
    best = latest if rule.last else (folder.best(config.train.monitor) or latest)
    storage.download(storage.join(best.directory, CHECKPOINT_FILE), target)
    return latest.epoch + 1


def _fold_task(
    config_dict: dict[str, Any],
    workdir: str,
    prepared: dict[str, Any],
    parent_run_id: str,
    fold: int,
    progress_queue: Queue | None = None,
) -> TrainOutcome:
    """One fold, run as a Ray task: it trains itself when it holds the worker's resources
    (``in_process.runs_in_process``), else it drives its own TorchTrainer. Its epoch lines go to
    ``progress_queue``, which the cross-validation's driver prints."""
    config = Config.model_validate(config_dict)
    return run_training(
        config,
        workdir,
        prepared=PreparedData(**prepared),
        parent_run_id=parent_run_id,
        fold=fold,
        progress=False,
        in_process=runs_in_process(config),
        progress_queue=progress_queue,
        progress_prefix=f"[fold {fold}] ",
    )


def run_folds(config: Config, workdir: str | Path, folds: int, *, progress: bool = True) -> FoldsOutcome:
    """K-fold cross-validation by patient (paper 004): the folds train in parallel as Ray tasks,
    each nested under one parent MLflow run, which gets the mean and std of every metric.

    Each fold reports its last epoch after a fixed ``train.epochs`` (``checkpoint_rule``), so the
    fold that scores a model never chose it; ``selection`` in the result says so."""
    workdir = Path(workdir).resolve()
    config = config.model_copy(update={"data": config.data.model_copy(update={"folds": folds})})
    prepared = ensure_prepared(config, workdir, progress=progress)
    uri = tracking_uri(config, workdir)
    name = run_name_for(config) + f"-cv{folds}"
    out_dir = workdir / "runs" / name
    save_config(config, out_dir)
    selection = checkpoint_rule(config, 0)[1].selection  # the same for every fold
    # A 1-worker fold trains in its task, which holds the worker's CPUs (and GPU share); else the task only
    # drives a trainer and holds a sliver of a CPU, so the Train workers get the cores.
    resources = trial_resources(config, driver_cpu=0.01)
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources.get("gpu", 0))(_fold_task)
    with (
        TrackedRun(
            uri,
            config.train.experiment,
            name,
            config=config,
            tags={tags.KIND: "cv", tags.FOLDS: str(folds), tags.SELECTION: selection},
            artifact_location=artifact_root(uri, workdir),
        ) as parent,
        contextlib.ExitStack() as stack,
    ):
        queue = stack.enter_context(EpochLines()).queue if progress else None
        refs = [
            task.remote(config.model_dump(mode="json"), str(workdir), prepared.to_dict(), parent.run_id, k, queue)
            for k in range(folds)
        ]
        outcomes: list[TrainOutcome] = ray.get(refs)
        keys = sorted(set.intersection(*(set(o.metrics) for o in outcomes)))
        summary = {}
        for key in keys:
            values = np.array([o.metrics[key] for o in outcomes], dtype=float)
            summary[key] = MetricSpread(
                mean=float(np.nanmean(values)), std=float(np.nanstd(values)), values=values.tolist()
            )
        parent.log_metrics(
            {f"{k}_mean": v.mean for k, v in summary.items()} | {f"{k}_std": v.std for k, v in summary.items()}
        )
    return FoldsOutcome(
        run_id=parent.run_id,
        run_name=name,
        tracking_uri=uri,
        folds=folds,
        selection=selection,
        output_dir=str(out_dir),
        summary=summary,
        fold_runs=outcomes,
        metrics={k: v.mean for k, v in summary.items()},
    )
