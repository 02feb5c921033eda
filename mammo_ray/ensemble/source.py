"""Where a model comes from: a checkpoint, an MLflow run, or a registered (ensemble) model version.

Every tool that applies a trained model (``localize``, ``dream``, ``explain``, ``froc``, the
Serve app) takes one ``--model`` string and resolves it here to member checkpoints, so a
single network and a 100-member ensemble go through the same code:

    work/runs/<run>/checkpoint.pt  or its folder     one member (the file itself)
    runs:/<RUN_ID>  or a bare 32-hex run id            the run's ``mammo_ray.checkpoint``
    models:/<name>/<version>  or  models:/<name>@<alias>  every ``member_XXX`` of the registered pyfunc

Checkpoints are always opened with ``torch.load(weights_only=True)`` (``train.checkpoint``);
the pickled MLflow model itself is never loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mammo_ray import tags
from mammo_ray.config import Config
from mammo_ray.ensemble.pyfunc import DECISIONS
from mammo_ray.train.checkpoint import checkpoint_file, load_checkpoint
from mammo_ray.train.tracking import reap_dead_runs_once
from mammo_ray.train.tracking import tracking_uri as default_uri

RUN_ID = re.compile(r"[0-9a-f]{32}")
MEMBER_FILE = re.compile(r"member_\d{3}")


class ModelSourceError(ValueError):
    """A ``--model`` value that names nothing loadable; the message says what was tried."""


@dataclass
class ModelSource:
    """Resolved member checkpoints and where they came from (lineage for MLflow and Serve)."""

    spec: str  # what the user gave
    kind: str  # "checkpoint", "run" or "registered"
    checkpoints: list[Path]
    run_id: str | None = None  # the run that owns the model (the member's run, or the ensemble's parent)
    tracking_uri: str | None = None
    model_uri: str | None = None
    version: str | None = None
    member_run_ids: list[str] = field(default_factory=list)
    registered_decisions: dict[str, Any] | None = None  # a registered ensemble's decision policy

    def decisions(self) -> dict[str, Any] | None:
        """The model's decision policy (fitted on val): a registered ensemble's ``decisions.json``, or a
        single checkpoint's ``payload["decisions"]``; None for members given without one."""
        if self.registered_decisions is not None:
            return self.registered_decisions
        if len(self.checkpoints) == 1:
            stored = load_checkpoint(self.checkpoints[0]).get("decisions")
            return dict(stored) if stored is not None else None
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "checkpoints": [str(p) for p in self.checkpoints],
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "model_uri": self.model_uri,
            "version": self.version,
            "member_run_ids": self.member_run_ids,
        }


def _from_run(spec: str, run_id: str, uri: str) -> ModelSource:
    try:
        run = MlflowClient(uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise ModelSourceError(f"--model {spec}: no run {run_id} in {uri} ({exc})") from None
    checkpoint = run.data.tags.get(tags.CHECKPOINT)
    if not checkpoint:
        raise ModelSourceError(
            f"--model {spec}: run {run_id} has no {tags.CHECKPOINT} tag (did it finish? "
            "an ensemble's parent run is used through its models:/ URI)"
        )
    if not Path(checkpoint).exists():
        raise ModelSourceError(f"--model {spec}: run {run_id}'s checkpoint {checkpoint} is not on this machine")
    return ModelSource(
        spec, "run", [checkpoint_file(checkpoint)], run_id=run_id, tracking_uri=uri, member_run_ids=[run_id]
    )


def _artifacts(model_dir: Path) -> dict[str, Any]:
    """The artifacts a saved ensemble pyfunc's MLmodel lists (name -> {"path": ...}); {} when unreadable."""
    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text())
        return dict(meta["flavors"]["python_function"].get("artifacts") or {})
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}


def _member_files(model_dir: Path) -> list[Path]:
    """The member checkpoints of a saved ensemble pyfunc, in member order (its MLmodel lists them)."""
    artifacts = _artifacts(model_dir)
    return [model_dir / artifacts[name]["path"] for name in sorted(artifacts) if MEMBER_FILE.fullmatch(name)]


def _decisions(model_dir: Path) -> dict[str, Any] | None:
    """A saved ensemble's decision policy (its ``decisions`` artifact), None for one saved without."""
    entry = _artifacts(model_dir).get(DECISIONS)
    return json.loads((model_dir / entry["path"]).read_text()) if entry else None


def _registry_version(spec: str, client: MlflowClient, uri: str) -> ModelVersion:
    """The model version ``spec`` names: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    rest = spec[len("models:/") :]
    name, at, alias = rest.partition("@")
    if at:
        if not name or not alias or "/" in name or "/" in alias:
            raise ModelSourceError(f"--model {spec}: expected models:/<name>/<version> or models:/<name>@<alias>")
        try:
            return client.get_model_version_by_alias(name, alias)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
            raise ModelSourceError(
                f"--model {spec}: registered model {name!r} has no alias {alias!r} in {uri} ({exc})"
            ) from None
    parts = rest.split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ModelSourceError(f"--model {spec}: expected models:/<name>/<version> or models:/<name>@<alias>")
    name, version = parts
    try:
        return client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(
            f"--model {spec}: no version {version} of registered model {name!r} in {uri} ({exc})"
        ) from None


def _from_registry(spec: str, uri: str, cache_dir: Path) -> ModelSource:
    mv = _registry_version(spec, MlflowClient(uri), uri)
    name, version = mv.name, mv.version
    target = cache_dir / f"{name}-v{version}"
    target.mkdir(parents=True, exist_ok=True)
    try:
        # The version's source (the ensemble run's ``model`` artifact), not "models:/...": that would
        # go through the process-wide registry URI instead of ``uri``.
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(target), tracking_uri=uri)
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"--model {spec}: could not download the model's files ({exc})") from None
    members = _member_files(local)
    if not members:
        raise ModelSourceError(
            f"--model {spec}: the model holds no member_XXX checkpoints (not a mammo-ray "
            f"ensemble?); looked in {local / 'MLmodel'}"
        )
    runs = [r for r in mv.tags.get(tags.MEMBER_RUN_IDS, "").split(",") if r]
    return ModelSource(
        spec,
        "registered",
        [checkpoint_file(p) for p in members],
        run_id=mv.run_id,
        tracking_uri=uri,
        model_uri=f"models:/{name}/{version}",
        version=str(version),
        member_run_ids=runs,
        registered_decisions=_decisions(local),
    )


def resolve_model_source(spec: str, workdir: str | Path, *, tracking_uri: str | None = None) -> ModelSource:
    """Resolve ``--model`` to member checkpoints.

    Args:
        spec: a checkpoint file or folder, ``runs:/<id>`` or a bare run id, ``models:/<name>/<version>``
            or ``models:/<name>@<alias>`` (the version the alias points at now).
        workdir: the work directory (its default MLflow store, and where registered models are
            downloaded to: ``workdir/models/``).
        tracking_uri: the MLflow store for runs and registered models; default as ``train`` uses
            (``$MLFLOW_TRACKING_URI``, else the work directory's SQLite file).

    Raises:
        ModelSourceError: nothing loadable, with what was tried.
    """
    workdir = Path(workdir)
    path = Path(spec)
    if path.exists():
        file = checkpoint_file(path)
        if not file.is_file():
            raise ModelSourceError(f"--model {spec}: a folder without {file.name}")
        return ModelSource(spec, "checkpoint", [file])
    uri = tracking_uri or default_uri(Config(), workdir)
    reap_dead_runs_once(uri)  # opening the store ends the runs that dead processes left RUNNING
    if spec.startswith("models:/"):
        return _from_registry(spec, uri, workdir / "models")
    run_id = spec[len("runs:/") :].split("/")[0] if spec.startswith("runs:/") else spec
    if RUN_ID.fullmatch(run_id):
        return _from_run(spec, run_id, uri)
    raise ModelSourceError(
        f"--model {spec}: not a checkpoint file or folder, a run id (runs:/<id>) or a "
        "registered model (models:/<name>/<version> or models:/<name>@<alias>)"
    )
