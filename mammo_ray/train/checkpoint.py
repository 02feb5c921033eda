"""Checkpoints that load with ``torch.load(weights_only=True)`` and carry their preprocessing.

A checkpoint (torchvision reference style) holds the model, optimizer, scheduler and
scaler state, the epoch, the resolved config, the evaluation transform spec and the
metric history, all as tensors and plain Python data, so loading never unpickles code.
Whoever loads it (evaluate, Serve) rebuilds the model and preprocessing from the file alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mammo_ray.config import Config, config_to_dict
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.models import ViewModel, build_view_model

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "mammo-ray-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not a mammo-ray checkpoint."""


def checkpoint_payload(
    *,
    model: nn.Module,
    config: Config,
    spec: TransformSpec,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    history: list[dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume training (``epoch`` = the last finished one) or to serve."""
    inner = getattr(model, "module", None)  # the module under DDP
    state = (inner if isinstance(inner, nn.Module) else model).state_dict()
    return {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "config": config_to_dict(config),
        "eval_transform": spec.to_state(),
        "history": [dict(h) for h in (history or [])],
        "extra": dict(extra or {}),
    }


def save_checkpoint(payload: dict[str, Any], directory: str | Path) -> Path:
    """Write ``checkpoint.pt`` (atomically) and a readable ``config.yaml`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, target)
    (directory / "config.yaml").write_text(yaml.safe_dump(payload["config"], sort_keys=False))
    return target


def store_decisions(path: str | Path, decisions: dict[str, Any], payload: dict[str, Any] | None = None) -> Path:
    """Put a decision policy (``decisions.policy.DecisionPolicy.to_dict``, fitted on the validation
    split) into a checkpoint file as ``payload["decisions"]``, atomically; returns the file. ``payload``:
    the file's content when the caller has already read it (it gets the policy too)."""
    target = checkpoint_file(path)
    payload = load_checkpoint(target) if payload is None else payload
    payload["decisions"] = decisions
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return target


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or the checkpoint file inside a checkpoint directory."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; errors name the file and the reason."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint not found")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a mammo-ray checkpoint (expected format {FORMAT!r})")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    return Config.model_validate(payload["config"])


def restore_model(
    payload: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[ViewModel, TransformSpec, Config]:
    """The trained model (in eval mode), its evaluation preprocessing and its config.

    The model is rebuilt from the config without the pretrained file: the weights come
    from the checkpoint, so a served model does not need the ImageNet file.
    """
    config = checkpoint_config(payload)
    model_cfg = config.model.model_copy(update={"pretrained": None})
    model = build_view_model(model_cfg)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), TransformSpec.from_state(payload["eval_transform"]), config
