"""Where a run came from (MLflow's source tags) and no run left RUNNING by a dead process.

No Ray: a Ray worker is stood in for by a process whose ``sys.argv`` and cwd are not the driver's and
that finds the driver's description in ``$MAMMO_RAY_SOURCE``, which is all Ray hands down.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

import mammo_ray
from mammo_ray import tags
from mammo_ray.train import tracking
from mammo_ray.train.tracking import TrackedRun, reap_dead_runs, reap_dead_runs_once

DRIVER_ARGV = ["/opt/venv/bin/mammo-ray", "demo", "--config", "tune_configs/search_smoke.yaml"]
DRIVER_COMMAND = "mammo-ray demo --config tune_configs/search_smoke.yaml"


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test is a fresh driver: no description inherited, nothing described or reaped yet. The
    environment is put back whole afterwards (``share_driver_source`` sets a variable)."""
    monkeypatch.setattr(tracking, "_REAPED_URIS", set())
    tracking.describe_command.cache_clear()
    with mock.patch.dict(os.environ):
        os.environ.pop(tracking.SOURCE_ENV, None)
        os.environ.pop(tracking.RAY_JOB_ENV, None)
        yield
    tracking.describe_command.cache_clear()


def _open_run(uri: str, name: str = "run") -> str:
    """A RUNNING run created by TrackedRun in this process (not entered, so it stays RUNNING)."""
    return TrackedRun(uri, "provenance", name, artifact_location=_artifacts(uri)).run_id


def _artifacts(uri: str) -> str:
    """Artifacts beside the SQLite file, not in ./mlruns."""
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def _git_head() -> str | None:
    """The commit of the checkout mammo_ray is imported from, or None when it is not one."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(mammo_ray.__file__).parent, capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on PATH
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def test_a_run_names_the_command_user_version_and_commit(store, monkeypatch):
    monkeypatch.setattr(sys, "argv", DRIVER_ARGV)
    run_tags = MlflowClient(store).get_run(_open_run(store)).data.tags

    assert run_tags[MLFLOW_SOURCE_NAME] == DRIVER_COMMAND
    assert run_tags[MLFLOW_SOURCE_TYPE] == "LOCAL"
    assert run_tags[MLFLOW_USER] == getpass.getuser()
    assert run_tags[tags.VERSION] == version("mammo-ray")
    assert run_tags.get(MLFLOW_GIT_COMMIT) == _git_head()  # the checkout the code runs from, when it is one
    assert tags.RAY_JOB not in run_tags
    assert run_tags[tags.OWNER_HOST] == socket.gethostname()
    assert run_tags[tags.OWNER_PID] == str(os.getpid())


def test_a_command_under_ray_job_submit_is_a_job(store, monkeypatch):
    job_config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc123", "job_name": "x"}}
    monkeypatch.setenv(tracking.RAY_JOB_ENV, json.dumps(job_config))
    monkeypatch.setattr(sys, "argv", DRIVER_ARGV)
    run_tags = MlflowClient(store).get_run(_open_run(store)).data.tags

    assert run_tags[MLFLOW_SOURCE_TYPE] == "JOB"
    assert run_tags[tags.RAY_JOB] == "raysubmit_abc123"
    assert run_tags[MLFLOW_SOURCE_NAME] == DRIVER_COMMAND


def test_python_dash_m_is_named_as_typed(monkeypatch):
    main = type(sys)("__main__")
    main.__spec__ = type("Spec", (), {"name": "mammo_ray.cli.__main__"})()
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/work/main/mammo_ray/cli/__main__.py", "tune", "--set", "a b=1"])

    assert tracking.describe_command()[MLFLOW_SOURCE_NAME] == "python -m mammo_ray.cli tune --set 'a b=1'"


def test_a_worker_names_the_driver_command_not_its_own(store, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", DRIVER_ARGV)
    shared = tracking.share_driver_source()  # in the driver, as init_ray does before Ray starts
    assert shared == {tracking.SOURCE_ENV: os.environ[tracking.SOURCE_ENV]}
    assert json.loads(shared[tracking.SOURCE_ENV])[MLFLOW_SOURCE_NAME] == DRIVER_COMMAND

    # A Ray worker: Ray's worker script, another cwd, the driver's description in its environment.
    tracking.describe_command.cache_clear()
    monkeypatch.setattr(sys, "argv", ["/opt/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py"])
    monkeypatch.chdir(tmp_path)
    run_tags = MlflowClient(store).get_run(_open_run(store, "trial")).data.tags

    assert run_tags[MLFLOW_SOURCE_NAME] == DRIVER_COMMAND
    assert run_tags[tags.OWNER_PID] == str(os.getpid())  # held by the worker, though it names the driver


def test_a_nested_driver_keeps_the_outer_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", DRIVER_ARGV)
    outer = tracking.share_driver_source()
    tracking.describe_command.cache_clear()
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/mammo-ray", "evaluate"])

    assert tracking.share_driver_source() == outer
    assert tracking.driver_source()[MLFLOW_SOURCE_NAME] == DRIVER_COMMAND


DOOMED_OWNER = textwrap.dedent(
    """
    import sys, time
    from mammo_ray.train.tracking import TrackedRun

    run = TrackedRun(sys.argv[1], "provenance", "doomed", artifact_location=sys.argv[2])
    print(run.run_id, flush=True)
    time.sleep(600)
    """
)


def _run_killed_with_sigkill(uri: str) -> tuple[str, int]:
    """(run id, pid) of a run whose owner, a real process, was killed with SIGKILL while it was RUNNING."""
    owner = subprocess.Popen(
        [sys.executable, "-c", DOOMED_OWNER, uri, _artifacts(uri)], stdout=subprocess.PIPE, text=True
    )
    try:
        run_id = owner.stdout.readline().strip()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        owner.stdout.close()
    assert run_id, f"the owner process printed no run id (exit code {owner.returncode})"
    return run_id, owner.pid


@pytest.mark.slow
def test_a_run_whose_process_was_killed_ends_failed_and_live_ones_stay_running(store):
    client = MlflowClient(store)
    live = _open_run(store, "live")  # held by this test's process (whose first TrackedRun reaps: nothing yet)
    elsewhere = _open_run(store, "elsewhere")
    experiment_id = client.get_experiment_by_name("provenance").experiment_id
    untagged = client.create_run(experiment_id).info.run_id  # another tool's run: no owner tags

    killed, pid = _run_killed_with_sigkill(store)
    assert client.get_run(killed).info.status == "RUNNING"  # what MLflow alone would leave forever
    client.set_tag(elsewhere, tags.OWNER_HOST, "another-host")
    client.set_tag(elsewhere, tags.OWNER_PID, str(pid))  # a pid gone here says nothing of another host

    assert reap_dead_runs(store) == [killed]

    run = client.get_run(killed)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.tags[tags.ERROR] == (
        f"its process (host {socket.gethostname()}, pid {pid}) is gone: the run was left RUNNING when that "
        "process died (killed, or its Ray stopped under it); ended FAILED by mammo-ray"
    )
    for run_id in (live, elsewhere, untagged):
        assert client.get_run(run_id).info.status == "RUNNING"
        assert tags.ERROR not in client.get_run(run_id).data.tags
    assert reap_dead_runs(store) == []  # nothing left to end


def _held_by_an_earlier_process(client: MlflowClient, run_id: str) -> None:
    """Owner: this process's pid, started a minute before this process, i.e. a gone process that had this pid."""
    started = datetime.fromisoformat(tracking.owner_tags()[tags.OWNER_STARTED])
    client.set_tag(run_id, tags.OWNER_STARTED, (started - timedelta(minutes=1)).isoformat())


def test_a_reused_pid_is_not_the_owner(store):
    client = MlflowClient(store)
    run_id = _open_run(store)
    _held_by_an_earlier_process(client, run_id)

    assert reap_dead_runs(store) == [run_id]
    assert client.get_run(run_id).info.status == "FAILED"


def test_reopening_a_reaped_run_makes_this_process_its_owner(store):
    client = MlflowClient(store)
    run_id = _open_run(store, "resumed")
    _held_by_an_earlier_process(client, run_id)
    assert reap_dead_runs(store) == [run_id]

    with TrackedRun(store, "provenance", "resumed", run_id=run_id, artifact_location=_artifacts(store)) as resumed:
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
        assert {k: run.data.tags[k] for k in tracking.OWNER_TAGS} == tracking.owner_tags()
        assert tags.ERROR not in run.data.tags  # the reaper's reason was the former attempt's
        assert reap_dead_runs(store) == []
    assert resumed.status == "FINISHED"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_process_reaps_each_store_once(store, tmp_path, monkeypatch):
    calls: list[str] = []
    real = tracking.reap_dead_runs
    monkeypatch.setattr(tracking, "reap_dead_runs", lambda uri: calls.append(uri) or real(uri))
    other = f"sqlite:///{tmp_path}/other.db"

    _open_run(store, "first")
    _open_run(store, "second")
    _open_run(other, "first elsewhere")
    assert calls == [store, other]

    # A run whose owner died after this process reaped the store is left for the next process.
    client = MlflowClient(store)
    orphan = _open_run(store, "orphan")
    _held_by_an_earlier_process(client, orphan)
    assert reap_dead_runs_once(store) == []
    assert client.get_run(orphan).info.status == "RUNNING"
    assert calls == [store, other]


def test_an_unreachable_store_only_warns(monkeypatch, caplog):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        assert reap_dead_runs(uri) == []
    [record] = [r for r in caplog.records if r.name == tracking.__name__]
    assert record.levelno == logging.WARNING
    assert f"could not end the runs of dead processes in {uri}" in record.getMessage()
