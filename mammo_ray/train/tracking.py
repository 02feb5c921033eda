"""MLflow tracking: where the store is, and runs that always end with an honest status.

Default store: SQLite in ``<workdir>/mlflow/mlflow.db`` with artifacts beside it (MLflow
3.17 refuses the file store). ``train.mlflow_uri`` or ``MLFLOW_TRACKING_URI`` point
elsewhere, for example at a shared ``mlflow server``.

``TrackedRun`` uses ``MlflowClient`` (no global active run), so parallel runs in one
process cannot mix up. A run ends FINISHED, FAILED (an exception) or KILLED (SIGTERM,
Ctrl-C). A process killed outright (SIGKILL, its Ray stopped under it) cannot end its run, and
MLflow has no heartbeat: every run names the process that holds it, and the first ``TrackedRun``
of a process ends FAILED the RUNNING runs whose process on this host is gone (``reap_dead_runs``).

Every run carries MLflow's source tags (command line, LOCAL or JOB, git commit, user) and the
mammo-ray version, describing the driver's command also when a Ray worker creates the run
(``driver_source``).
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, SourceType
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from mammo_ray import tags
from mammo_ray.config import Config, ConfigError, flatten

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI (3.x) chooses an experiment's first view by it
MODEL_TRAINING = "custom_model_development"
MAX_TAG_LENGTH = 8000  # ... and on one tag value
SOURCE_ENV = "MAMMO_RAY_SOURCE"  # the driver's source tags (JSON), for the processes Ray starts for it
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint only
CLUSTER_ENV = "MAMMO_RAY_CLUSTER"  # "1" on the nodes of cluster/ (KubeRay manifests, cloud launcher profiles)
OWNER_TAGS = (tags.OWNER_HOST, tags.OWNER_PID, tags.OWNER_STARTED)
START_SLACK_S = 1.0  # psutil derives start times from the boot time, which the kernel may shift by a second


def tracking_uri(config: Config, workdir: str | Path) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else SQLite in the workdir (absolute path).

    On a cluster (``MAMMO_RAY_CLUSTER=1``) SQLite is refused: its file sits on the shared network file system,
    where many trials logging at once lock each other out ("database is locked").
    """
    store = Path(workdir).resolve() / "mlflow"
    default = f"sqlite:///{store / 'mlflow.db'}"
    uri = config.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
    if uri.startswith("sqlite:") and os.environ.get(CLUSTER_ENV) == "1":
        runtime_env = '{"env_vars": {"MLFLOW_TRACKING_URI": "http://<mlflow-host>:5000"}}'
        raise ConfigError(
            f"MLflow tracking URI {uri} is SQLite, which a cluster run ({CLUSTER_ENV}=1) does not use: point "
            "MLFLOW_TRACKING_URI at an MLflow server on PostgreSQL, through the Secret mammo-ray-mlflow (key "
            f"tracking-uri) on KubeRay, or `ray job submit --runtime-env-json '{runtime_env}'` on a launcher "
            "cluster (cluster/README.md)"
        )
    if uri == default:
        store.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_root(uri: str, workdir: str | Path) -> str | None:
    """Local artifacts for a local SQLite store; a server decides its own."""
    if uri.startswith("sqlite:"):
        return (Path(workdir).resolve() / "mlflow" / "artifacts").as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment id, creating the experiment once (with an absolute artifact location). It is tagged as
    model training (``mlflow.experimentKind``), so MLflow's UI opens it on its runs, not its GenAI overview."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except Exception:
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
        return experiment_id
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before mammo-ray tagged its experiments
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
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


# -- where a run came from


def driver_source() -> dict[str, str]:
    """MLflow's source tags (and mammo-ray's version) of the command this process works for.

    A Ray worker (a Tune trial, a Train worker, a task) runs Ray's worker script, often from another
    directory, so its own ``sys.argv`` and cwd say nothing about the command. The driver describes
    itself once, in ``share_driver_source``, which ``ray_session.init_ray`` calls before Ray starts,
    and the description travels as ``$MAMMO_RAY_SOURCE``: a local Ray's processes inherit the
    driver's environment, and a cluster's get the variable from the job's ``runtime_env``. One
    environment variable reaches every process of the job (trials, Train workers, their tasks)
    without a change to any trial or task signature. A process without it (a driver before
    ``init_ray``, a command without Ray, a test) describes its own command.
    """
    shared = os.environ.get(SOURCE_ENV)
    if shared:
        return dict(json.loads(shared))
    return dict(describe_command())


def share_driver_source() -> dict[str, str]:
    """Put this command's source tags in ``$MAMMO_RAY_SOURCE``, unless a driver above this process already
    did, and return ``{"MAMMO_RAY_SOURCE": ...}`` for a Ray ``runtime_env``'s ``env_vars``."""
    if SOURCE_ENV not in os.environ:
        os.environ[SOURCE_ENV] = json.dumps(describe_command())
    return {SOURCE_ENV: os.environ[SOURCE_ENV]}


@functools.cache
def describe_command() -> dict[str, str]:
    """This process's command line, LOCAL or JOB (``ray job submit``), user, git commit of the checkout the
    code runs from, and mammo-ray version, as run tags. Computed once: git is asked at most once."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if program == "__main__.py" and main_spec is not None:  # python -m mammo_ray.cli ...
        program = "python -m " + main_spec.name.removesuffix(".__main__")
    command = " ".join([program, shlex.join(sys.argv[1:])]).strip()
    job = os.environ.get(RAY_JOB_ENV)
    source = {
        MLFLOW_SOURCE_NAME: command[:MAX_TAG_LENGTH],
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB if job else SourceType.LOCAL),
    }
    if job:
        submission_id = json.loads(job).get("metadata", {}).get("job_submission_id")
        if submission_id:
            source[tags.RAY_JOB] = str(submission_id)
    try:
        source[MLFLOW_USER] = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment and no passwd entry (some containers)
        pass
    commit = get_git_commit(str(Path(__file__).resolve().parent))  # None outside a git checkout
    if commit:
        source[MLFLOW_GIT_COMMIT] = commit
    try:
        source[tags.VERSION] = version("mammo-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pass
    return source


# -- which process holds a run, and runs whose process is gone


def owner_tags() -> dict[str, str]:
    """The host, pid and start time of this process: the owner of the runs it opens."""
    import psutil  # Ray bundles it (importable once ray is) without declaring it: declare it in pyproject

    started = datetime.fromtimestamp(psutil.Process().create_time(), UTC).isoformat(timespec="milliseconds")
    return {tags.OWNER_HOST: socket.gethostname(), tags.OWNER_PID: str(os.getpid()), tags.OWNER_STARTED: started}


def owner_is_gone(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` of this host, started at ``started`` (ISO 8601), no longer runs. A pid that now
    belongs to a process started at another time counts as gone; one this user may not inspect does not."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # dead, only not yet waited for
            return True
        created = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    return started is not None and abs(created - datetime.fromisoformat(started).timestamp()) > START_SLACK_S


def _pages(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search (``search_experiments``, ``search_runs``)."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _reap_reason(run: Run, host: str) -> str | None:
    """Why ``run`` (RUNNING, owned on ``host``) must be ended FAILED, or None while its owner lives."""
    owner = run.data.tags
    try:
        pid = int(owner[tags.OWNER_PID])
    except (KeyError, ValueError):
        return None
    if not owner_is_gone(pid, owner.get(tags.OWNER_STARTED)):
        return None
    return (
        f"its process (host {host}, pid {pid}) is gone: the run was left RUNNING when that process died "
        "(killed, or its Ray stopped under it); ended FAILED by mammo-ray"
    )


def reap_dead_runs(uri: str) -> list[str]:
    """End FAILED every RUNNING run of the store at ``uri`` whose owner process ran on this host and is gone.

    MLflow has no heartbeat, so a run whose process died before ``TrackedRun.__exit__`` (SIGKILL, a
    local Ray killed under its trials) stays RUNNING until someone ends it. ``TrackedRun`` tags each
    run with the process holding it (``tags.OWNER_*``); this ends FAILED, with the reason in
    ``tags.ERROR``, the runs whose process is gone. Runs of other hosts (whose processes cannot be
    seen from here) and runs without the tags (other tools', older ones) are left alone. A search or
    ensemble parent is held by its driver and stays RUNNING while the driver lives, whatever became
    of its trials' runs (held by trial processes); when the driver dies, it goes too.

    One ``search_runs`` (status RUNNING, owner on this host) over all experiments; housekeeping never
    fails the command: an error is logged as a warning. Returns the ids of the runs it ended.
    """
    host = socket.gethostname()
    reaped: list[str] = []
    try:
        client = MlflowClient(uri)
        experiment_ids = [experiment.experiment_id for experiment in _pages(client.search_experiments)]
        if not experiment_ids:
            return reaped
        running_here = f"attributes.status = 'RUNNING' and tags.`{tags.OWNER_HOST}` = '{host}'"
        for run in _pages(client.search_runs, experiment_ids=experiment_ids, filter_string=running_here):
            reason = _reap_reason(run, host)
            if reason is None:
                continue
            # Read again: a process that reopened the run meanwhile (``run_id=``) is its owner now.
            now = client.get_run(run.info.run_id)
            same_owner = all(now.data.tags.get(k) == run.data.tags.get(k) for k in OWNER_TAGS)
            if now.info.status == "RUNNING" and same_owner:
                client.set_tag(run.info.run_id, tags.ERROR, reason)
                client.set_terminated(run.info.run_id, "FAILED")
                reaped.append(run.info.run_id)
    except Exception as exc:  # noqa: BLE001 - housekeeping: no store error may fail the command that opened it
        log.warning("mammo-ray: could not end the runs of dead processes in %s: %s", uri, exc)
    return reaped


_REAPED_URIS: set[str] = set()  # the stores this process has reaped
_REAPED_LOCK = threading.Lock()


def reap_dead_runs_once(uri: str) -> list[str]:
    """``reap_dead_runs(uri)`` the first time this process asks for ``uri``, else nothing (``[]``)."""
    with _REAPED_LOCK:
        if uri in _REAPED_URIS:
            return []
        _REAPED_URIS.add(uri)
    return reap_dead_runs(uri)


def reopen_run(client: MlflowClient, run_id: str) -> Run:
    """Set an existing run RUNNING again, held by this process, without the error of a former attempt."""
    # The new owner first, so that no reaper sees the run RUNNING under its dead former owner.
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in owner_tags().items()])
    if tags.ERROR in client.get_run(run_id).data.tags:  # an exception's, or a reaper's: not this attempt's
        client.delete_tag(run_id, tags.ERROR)
    client.update_run(run_id, status="RUNNING")
    return client.get_run(run_id)


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
            driver died): it is set RUNNING again, held by this process, and ends with the status
            of this attempt.

    A new run is tagged with ``driver_source()`` and the process that holds it (``owner_tags``). The
    first ``TrackedRun`` of a process on a store first ends the runs left RUNNING there by dead
    processes of this host (``reap_dead_runs_once``).
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
        reap_dead_runs_once(uri)
        self.uri = uri
        self.client = MlflowClient(uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)
        if run_id:
            self.run = reopen_run(self.client, run_id)
        else:
            all_tags = {**driver_source(), **owner_tags(), MLFLOW_RUN_NAME: run_name, **(tags or {})}
            if parent_run_id:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
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
            self.client.set_tag(self.run_id, tags.ERROR, f"{exc_type.__name__}: {exc}"[:5000])
        self.status = RunStatus.to_string(status)
        self.client.set_terminated(self.run_id, self.status)
