"""MLflow tracking: where the store is, and runs that always end with an honest status.

Default store: SQLite in ``<workdir>/mlflow/mlflow.db`` with artifacts beside it (MLflow
3.17 refuses the file store). ``train.mlflow_uri`` or ``MLFLOW_TRACKING_URI`` point
elsewhere, for example at a shared ``mlflow server``.

``TrackedRun`` uses ``MlflowClient`` (no global active run), so parallel runs in one
process cannot mix up. A run ends FINISHED, FAILED (an exception) or KILLED (SIGTERM,
Ctrl-C); it is never left RUNNING.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from mammo_ray.config import Config, flatten
from mammo_ray.tags import ERROR as ERROR_TAG

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def tracking_uri(config: Config, workdir: str | Path) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else SQLite in the workdir (absolute path)."""
    uri = config.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(workdir).resolve() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(uri: str, workdir: str | Path) -> str | None:
    """Local artifacts for a local SQLite store; a server decides its own."""
    if uri.startswith("sqlite:"):
        return (Path(workdir).resolve() / "mlflow" / "artifacts").as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment id, creating the experiment once (with an absolute artifact location)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def config_params(config: Config) -> list[Param]:
    params = []
    for key, value in flatten(config).items():
        text = "None" if value is None else str(value)
        params.append(Param(key, text[:MAX_PARAM_LENGTH]))
    return params


def metric_batch(metrics: dict[str, Any], step: int) -> list[Metric]:
    """Finite numeric metrics as MLflow ``Metric`` rows at ``step``."""
    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    ]


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log from anywhere (a Ray Train worker, a task) into an existing run."""
    batch = metric_batch(metrics, step)
    if batch:
        MlflowClient(uri).log_batch(run_id, metrics=batch)


class RunKilled(BaseException):
    """Raised in the main thread on SIGTERM, so the run can end KILLED."""


class TrackedRun:
    """A context manager around one MLflow run.

    Args:
        uri: tracking URI.
        experiment: experiment name (created when missing).
        run_name: shown in the MLflow UI.
        config: logged as flattened parameters.
        tags: extra tags.
        parent_run_id: makes this a child run (cross-validation folds, ensemble members).
        artifact_location: for a new experiment.
        run_id: reopen this existing run instead of creating one (a trial resumed after its
            driver died): it is set RUNNING again and ends with the status of this attempt.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        config: Config | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ):
        self.uri = uri
        self.client = MlflowClient(uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)
        all_tags = {MLFLOW_RUN_NAME: run_name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run = self.client.get_run(run_id)
        else:
            self.run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
        self.run_id = self.run.info.run_id
        self.status: str | None = None
        if config is not None and not run_id:
            self.client.log_batch(self.run_id, params=config_params(config))
        self._previous_handler: Any = None

    # -- logging helpers
    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        batch = metric_batch(metrics, step)
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    # -- lifecycle
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        raise RunKilled(f"signal {signum}")

    def __enter__(self) -> TrackedRun:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, (RunKilled, KeyboardInterrupt)):
            status = RunStatus.KILLED
        elif self.client.get_run(self.run_id).info.status == RunStatus.to_string(RunStatus.KILLED):
            # Stopped from outside first (a search scheduler's early stop ends the run KILLED), and the
            # interrupted training raised on its way out: the stop, not that error, is what happened.
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
            self.client.set_tag(self.run_id, ERROR_TAG, f"{exc_type.__name__}: {exc}"[:5000])
        self.status = RunStatus.to_string(status)
        self.client.set_terminated(self.run_id, self.status)
