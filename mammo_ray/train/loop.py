"""The training loop in plain PyTorch: build, ``train_one_epoch``, ``evaluate``, ``fit``.

No Ray here. ``ray_train.py`` runs the same functions inside a Ray Train worker and only
adds the three marked Ray calls (prepare the model, prepare the loaders, report). The
loop works on one process (rank 0 of 1) exactly as on many.

View modes (paper 000): ``single`` and ``parallel`` train on one crop per sample; at
evaluation ``parallel`` averages the CC and MLO probabilities of each lesion, so its
primary metrics are per exam. ``multimodal`` trains and evaluates on CC+MLO pairs.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from mammo_ray.config import Config, metric_mode
from mammo_ray.data.datasets import CropCache, PairedViewDataset, SingleViewDataset
from mammo_ray.data.splits import Splits
from mammo_ray.data.transforms import TransformSpec, build_eval_transform, build_train_transform
from mammo_ray.models import (
    ViewModel,
    build_view_model,
    fine_tune_multipliers,
    freeze,
    get_model_info,
    param_groups,
)
from mammo_ray.train.checkpoint import checkpoint_payload
from mammo_ray.train.metrics import evaluate_predictions, summarize_levels


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch order; optionally class-balanced.

    Every rank draws the same order from ``(seed, epoch)`` and takes every ``world``-th
    index, so ranks see disjoint samples and a run is reproducible from its seed. The order
    is padded by wrapping so each rank gets the same number of batches (DDP needs that).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        balanced: bool = False,
    ):
        self.labels = np.asarray(labels)
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle, self.balanced = shuffle, balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.world)

    def __iter__(self) -> Iterator[int]:
        n = len(self.labels)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balanced:  # each class drawn equally often (with replacement for the minority)
            classes, counts = np.unique(self.labels, return_counts=True)
            weight = 1.0 / counts[np.searchsorted(classes, self.labels)]
            order = rng.choice(n, size=n, replace=True, p=weight / weight.sum())
        elif self.shuffle:
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        total = len(self) * self.world
        order = np.resize(order, total)  # wrap-around padding
        return iter(order[self.rank :: self.world].tolist())


@dataclass
class Training:
    """Everything one worker trains with; built by ``build_training``."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    spec: TransformSpec  # the evaluation preprocessing, saved with every checkpoint
    device: torch.device
    rank: int = 0
    world: int = 1
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def relabel_fold(index: pd.DataFrame, splits_path: str | Path, fold: int) -> pd.DataFrame:
    """The cache index with fold ``fold``'s patients as "val" and the other folds' as "train"."""
    train_patients, val_patients = Splits.load(splits_path).fold(fold)
    index = index.copy()
    split = index["split"].astype(object).where(index["split"] == "test", "")
    split[index["patient_id"].isin(train_patients)] = "train"
    split[index["patient_id"].isin(val_patients)] = "val"
    index["split"] = split
    return index


def build_dataset(
    cache: CropCache, config: Config, split: str, *, train: bool
) -> SingleViewDataset | PairedViewDataset:
    spec = cache.transform_spec(config.data)
    transform = build_train_transform(spec) if train else build_eval_transform(spec)
    if config.model.view_mode == "multimodal":
        return PairedViewDataset(cache, split, config.data.task, transform=transform)
    offline = (spec, config.data.seed) if train and config.data.offline_aug else None
    return SingleViewDataset(cache, split, config.data.task, transform=None if offline else transform, offline=offline)


def build_optimizer(model: ViewModel, config: Config) -> torch.optim.Optimizer:
    """Adam (paper 000) or SGD (001 poly, 004 momentum), with the fine-tuning LR multipliers."""
    m, o = config.model, config.optim
    multipliers = None
    if m.train_last is not None:
        multipliers = fine_tune_multipliers(model, m.train_last, m.early_lr_mult)
        frozen = [group for group, mult in multipliers.items() if mult == 0]
        if frozen:  # paper 004: a frozen trunk
            freeze(model, frozen)
            multipliers = {group: mult for group, mult in multipliers.items() if mult > 0}
    groups = param_groups(
        model, o.lr, o.weight_decay, multipliers, head_weight_mult=m.head_lr_mult, head_bias_mult=m.head_bias_lr_mult
    )
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: x gamma (paper 000), polynomial power 0.5 (paper 001), or constant."""
    o = config.optim
    if o.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=o.gamma)
    if o.schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=config.train.epochs, power=o.poly_power)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def build_training(
    config: Config,
    cache_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    fold: int | None = None,
    splits_path: str | Path | None = None,
) -> Training:
    """Datasets, loaders, model, optimizer and schedule for one worker of a run."""
    device = torch.device(device)
    seed_everything(config.train.seed)  # same initial weights on every rank
    info = get_model_info(config.model.name)
    if config.data.input_px < info.min_input_size:
        raise ValueError(
            f"data.input_px ({config.data.input_px}) is below the smallest input "
            f"{config.model.name} accepts ({info.min_input_size})"
        )
    cache = CropCache(cache_dir)
    if fold is not None:
        if splits_path is None:
            raise ValueError("fold training needs the splits file that holds the folds")
        cache.index = relabel_fold(cache.index, splits_path, fold)
    train_set = build_dataset(cache, config, "train", train=True)
    val_set = build_dataset(cache, config, "val", train=False)
    t = config.train
    loader_args: dict[str, Any] = dict(
        batch_size=t.batch_size,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    sampler = EpochSampler(train_set.labels, rank=rank, world=world, seed=t.seed, balanced=t.balanced_sampling)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=False, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)

    model = build_view_model(config.model).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    return Training(
        config=config,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config),
        train_loader=train_loader,
        val_loader=val_loader,
        spec=cache.transform_spec(config.data),
        device=device,
        rank=rank,
        world=world,
        scaler=scaler,
        amp_dtype=amp_dtype,
    )


def _to_device(x: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device, channels_last) for v in x)
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks (identity on one process): every rank then takes the same decisions."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    acc_window: int = 50,
) -> dict[str, float]:
    """One pass over this rank's share of the training set. Returns loss, accuracy, images/s
    and ``window_acc``, the mean accuracy of the last ``acc_window`` batches (paper 004's stop rule)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss = correct = seen = 0.0
    window: deque[float] = deque(maxlen=acc_window)
    start = time.perf_counter()
    for x, y in loader:
        x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = _forward(model, x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        hits = (logits.argmax(1) == y).float()
        total_loss += float(loss.detach()) * len(y)  # a CPU-GPU sync per batch; cheap next to a CNN step
        correct += float(hits.sum())
        seen += len(y)
        window.append(float(hits.mean()))
    seconds = time.perf_counter() - start
    loss, acc, window_acc = _all_mean(
        [total_loss / max(seen, 1), correct / max(seen, 1), float(np.mean(window)) if window else 0.0], device
    )
    return {
        "train_loss": loss,
        "train_acc": acc,
        "train_window_acc": window_acc,
        "train_images_per_s": seen * max(1, _world()) / seconds if seconds > 0 else 0.0,
    }


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP: evaluation and checkpoints use it (no collective calls)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> pd.DataFrame:
    """Malignancy (positive-class) probabilities of every sample, in dataset order.

    Returns a frame with ``prob``, ``label``, ``exam_key``, ``patient_id`` (the bootstrap's
    cluster) and, for single crops, ``view``: ready for ``summarize_predictions`` and
    ``metrics.evaluate_predictions``.
    """
    model = unwrap(model).eval()
    probs, labels = [], []
    for x, y in loader:
        x = _to_device(x, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = _forward(model, x)
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
        labels.append(y)
    dataset = loader.dataset
    if isinstance(dataset, PairedViewDataset):
        keys = dataset.pairs[["exam_key", "patient_id"]]
    elif isinstance(dataset, SingleViewDataset):
        keys = dataset.frame[["exam_key", "view", "patient_id"]]
    else:
        raise TypeError(
            f"evaluate: the loader's dataset must be a SingleViewDataset or a PairedViewDataset, "
            f"got {type(dataset).__name__}"
        )
    frame = keys.reset_index(drop=True).copy()
    frame["prob"] = torch.cat(probs).numpy().astype(np.float64)
    frame["label"] = torch.cat(labels).numpy().astype(np.int64)
    return frame


def summarize_predictions(
    frame: pd.DataFrame, view_mode: str, *, prefix: str = "val_", n_boot: int = 0, seed: int = 0
) -> dict[str, float]:
    """Flat metrics of one evaluation (``metrics.summarize_levels``). ``<prefix>auc`` / ``loss`` /
    ``acc`` are the view mode's primary level: per image for ``single``, per exam for ``parallel``
    and ``multimodal``; ``<prefix>exam_loss`` is per exam for every view mode, so it compares
    models of different view modes (the search selects on it). CIs resample patients."""
    levels = evaluate_predictions(frame, n_boot=n_boot, seed=seed)
    return summarize_levels(levels, view_mode, prefix=prefix, with_ci=n_boot > 0)


class EarlyStopping:
    """Stop after ``patience`` epochs without improving ``metric`` (lower loss, higher AUC)."""

    def __init__(self, metric: str, patience: int | None):
        self.metric, self.patience = metric, patience
        self.sign = -1.0 if metric_mode(metric) == "min" else 1.0
        self.best = -math.inf
        self.bad_epochs = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an epoch; True when training should stop."""
        value = self.sign * metrics[self.metric]
        if value > self.best:
            self.best, self.bad_epochs = value, 0
        elif not math.isnan(value):  # an undefined AUC (one class in val) neither helps nor hurts
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


EpochCallback = Callable[[int, dict[str, float], bool], None]


def fit(
    training: Training,
    *,
    start_epoch: int = 0,
    stopper: EarlyStopping | None = None,
    on_epoch: EpochCallback | None = None,
    before_epoch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train from ``start_epoch`` to the end (or an early stop); ``on_epoch(epoch, metrics, last)``
    runs after each epoch's scheduler step, where checkpoints are written and metrics reported."""
    t = training.config.train
    stopper = stopper or EarlyStopping(t.monitor, t.early_stop_patience)
    view_mode = training.config.model.view_mode
    for epoch in range(start_epoch, t.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        sampler = training.train_loader.sampler
        if not isinstance(sampler, EpochSampler):
            raise TypeError(
                f"fit: the train loader's sampler must be the EpochSampler build_training makes, "
                f"got {type(sampler).__name__}"
            )
        sampler.set_epoch(epoch)
        lr = training.optimizer.param_groups[0]["lr"] / training.optimizer.param_groups[0].get("lr_mult", 1.0)
        started = time.perf_counter()
        metrics = train_one_epoch(
            training.model,
            training.train_loader,
            training.optimizer,
            device=training.device,
            amp_dtype=training.amp_dtype,
            scaler=training.scaler,
            channels_last=t.channels_last,
            acc_window=t.stop_train_window,
        )
        frame = evaluate(
            training.model,
            training.val_loader,
            device=training.device,
            amp_dtype=training.amp_dtype,
            channels_last=t.channels_last,
        )
        metrics.update(summarize_predictions(frame, view_mode))
        metrics.update(epoch=float(epoch), lr=lr, epoch_seconds=time.perf_counter() - started)  # train + validate
        training.scheduler.step()
        stop = stopper.update(metrics)
        if t.stop_train_acc is not None and metrics["train_window_acc"] >= t.stop_train_acc:
            stop = True
        training.history.append(metrics)
        last = stop or epoch == t.epochs - 1
        if on_epoch is not None:
            on_epoch(epoch, metrics, last)
        if stop:
            break
    return training.history


def restore_training(training: Training, payload: dict[str, Any], stopper: EarlyStopping) -> int:
    """Load a checkpoint's model, optimizer, scheduler, scaler, history and early-stopping state
    into ``training`` and ``stopper``; returns the epoch to continue from."""
    training.model.load_state_dict(payload["model"])
    training.optimizer.load_state_dict(payload["optimizer"])
    training.scheduler.load_state_dict(payload["scheduler"])
    if training.scaler is not None and payload["scaler"]:
        training.scaler.load_state_dict(payload["scaler"])
    training.history = payload["history"]
    stopper.load_state_dict(payload["extra"]["stopper"])
    return int(payload["epoch"]) + 1


def training_payload(training: Training, stopper: EarlyStopping, epoch: int, **extra: Any) -> dict[str, Any]:
    """The checkpoint of ``training`` after ``epoch``: everything ``restore_training`` needs, and a model to serve."""
    return checkpoint_payload(
        model=training.model,
        config=training.config,
        spec=training.spec,
        epoch=epoch,
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        scaler=training.scaler,
        history=training.history,
        extra={"stopper": stopper.state_dict(), **extra},
    )


def epoch_line(config: Config, epoch: int, metrics: dict[str, float]) -> str:
    """The one progress line a run prints per epoch."""
    return (
        f"[{config.model.name}] epoch {epoch + 1}/{config.train.epochs}: "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.3f} | "
        f"val loss {metrics['val_loss']:.4f} "
        f"AUC {metrics['val_auc']:.3f} acc {metrics['val_acc']:.3f} | "
        f"{metrics['train_images_per_s']:.0f} images/s"
    )
