"""An `mlflow server` on PostgreSQL (127.0.0.1) as a team deployment runs it, reached through
MLFLOW_TRACKING_URI by Ray jobs on a `ray start --head` cluster, and read back through its REST API:
16 Tune trials logging at once (8 in flight) lose no run, metric or artifact and meet no
`database is locked`; a `mammo-ray train` job's run arrives whole. The server runs MLflow's basic-auth app
as the team's does (cluster/README.md): a REST call without credentials gets 401, and the jobs log as a
user whose MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD reach them through their runtime
environment, never a command line, and appear in no job or server log. Artifacts go through the server to
an S3 bucket (`--artifacts-destination s3://...`, moto on loopback), as the team server keeps them.
PostgreSQL (fixture ``postgres_uri``) comes from scripts/start_postgres.py; if it cannot start these tests
fail, they do not skip. The Ray head (fixture ``ray_cluster``) is the one tests/test_job_submit.py uses too,
see tests/conftest.py."""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
from mlflow_postgres import Credentials, fresh_database, mlflow_server
from ray_head import SHRINK, field, job_logs, last_json, sets, submit
from s3_server import bucket_keys, s3_server

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TRIALS, CONCURRENT, STEPS = 16, 8, 20
# In the server's log: a locked database, an answer 5xx, an exception. In a client's: a locked database,
# an MLflow error, or a request that had to be retried (MLflow's client retries 5xx and 429 silently).
SERVER_TROUBLE = re.compile(r'database is locked|HTTP/1\.1" 5\d\d|Traceback', re.IGNORECASE)
CLIENT_TROUBLE = re.compile(r"database is locked|MlflowException|Retrying \(Retry", re.IGNORECASE)


BUCKET = "mammo-ray-mlflow"


@pytest.fixture(scope="module")
def artifact_store():
    """An S3 bucket on loopback (moto) for the server's artifacts: the server's environment, which only it gets."""
    with s3_server(BUCKET) as env:
        yield env | {"MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]}


@pytest.fixture(scope="module")
def server(postgres_uri, artifact_store, tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    # The users and their permissions in a database of their own on the same PostgreSQL, as cluster/README.md has
    # it; artifacts proxied to a bucket (--artifacts-destination s3://...), so the jobs need no bucket credentials.
    with (
        fresh_database(postgres_uri) as database,
        fresh_database(postgres_uri) as auth_database,
        mlflow_server(
            database,
            f"s3://{BUCKET}/mlflow",
            base / "server.log",
            auth_db_uri=auth_database,
            extra_env=artifact_store,
        ) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def trainer(server) -> Credentials:
    """The jobs' user of the team server (not an admin), created by the admin as cluster/README.md does."""
    user = Credentials("trainer", secrets.token_urlsafe(24))
    rest(server, server.admin, "users/create", {"username": user.username, "password": user.password})
    return user


def request(url: str, user: Credentials | None, body: dict | None = None) -> urllib.request.Request:
    """A request to the server, with ``user``'s credentials (HTTP basic auth) unless None."""
    headers = {"Content-Type": "application/json"}
    if user is not None:
        token = base64.b64encode(f"{user.username}:{user.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)


def rest(server, user: Credentials | None, endpoint: str, body: dict | None = None, **query: Any) -> dict:
    """One call of MLflow's REST API as ``user`` (POST with ``body``, else GET with ``query``)."""
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(request(url, user, body), timeout=60) as reply:
        return json.loads(reply.read())


def status_of(server, user: Credentials | None, endpoint: str, body: dict | None = None) -> int:
    """The HTTP status of a GET of ``endpoint`` (POST with ``body``) as ``user``."""
    try:
        with urllib.request.urlopen(request(f"{server.url}{endpoint}", user, body), timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def history(server, user: Credentials, run_id: str, key: str) -> list[int]:
    found = rest(server, user, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
    return sorted(int(m.get("step", 0)) for m in found)


def credentials_env(user: Credentials) -> tuple[dict[str, str], dict[str, str]]:
    """The job's env_vars for ``user``: the username, and the password kept off the command line."""
    return {"MLFLOW_TRACKING_USERNAME": user.username}, {"MLFLOW_TRACKING_PASSWORD": user.password}


def assert_no_password(text: str, where: str, *users: Credentials) -> None:
    for user in users:
        assert user.password not in text, f"{user.username}'s password is in {where}"


def test_the_server_asks_for_credentials(server, trainer):
    """Without credentials, or with a wrong password, the REST API answers 401; the health check that
    probes use stays open; the jobs' user may read and create but is no admin."""
    assert status_of(server, None, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert status_of(server, None, "/get-artifact?run_id=0&path=x") == 401
    wrong = Credentials(trainer.username, trainer.password + "x")
    assert status_of(server, wrong, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert status_of(server, trainer, "/api/2.0/mlflow/experiments/search?max_results=1") == 200
    assert status_of(server, None, "/health") == 200
    another = {"username": "intruder", "password": secrets.token_urlsafe(24)}
    assert status_of(server, trainer, "/api/2.0/mlflow/users/create", another) == 403  # admins only


def most_at_once(runs: list[dict]) -> int:
    """The most runs that were open at the same moment (from their start and end times)."""
    edges = sorted(
        [(int(r["info"]["start_time"]), 1) for r in runs] + [(int(r["info"]["end_time"]), -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    open_, best = 0, 0
    for _, step in edges:
        open_ += step
        best = max(best, open_)
    return best


def test_parallel_trials_lose_nothing(server, trainer, ray_cluster, tmp_path):
    submission = f"mlflow-load-{uuid.uuid4().hex[:8]}"
    username, password = credentials_env(trainer)
    log = submit(
        ray_cluster,
        submission,
        [
            "python",
            "scripts/mlflow_parallel_trials.py",
            "--trials",
            str(TRIALS),
            "--concurrent",
            str(CONCURRENT),
            "--steps",
            str(STEPS),
        ],
        {"MLFLOW_TRACKING_URI": server.url, **username},
        secret_env_vars=password,
    )
    (tmp_path / "job.log").write_text(log)
    logs = job_logs(ray_cluster, submission)
    summary = last_json(logs)
    assert summary["errored"] == 0 and len(summary["runs"]) == TRIALS, summary

    found = rest(
        server,
        trainer,
        "runs/search",
        {
            "experiment_ids": [summary["experiment_id"]],
            "max_results": 1000,
            "filter": f"tags.load_batch = '{summary['batch']}'",
        },
    )["runs"]
    assert sorted(r["info"]["run_id"] for r in found) == summary["runs"]
    indices = set()
    for run in found:
        info, data = run["info"], run["data"]
        assert info["status"] == "FINISHED", info
        tags = {t["key"]: t["value"] for t in data["tags"]}
        index = int(tags["trial_index"])
        indices.add(index)
        params = {p["key"]: p["value"] for p in data["params"]}
        assert params == {f"param_{k}": str(index * 100 + k) for k in range(10)}
        latest = {m["key"]: m for m in data["metrics"]}
        assert set(latest) == {"loss", "accuracy"} and int(latest["loss"].get("step", 0)) == STEPS - 1
        assert (
            history(server, trainer, info["run_id"], "loss")
            == history(server, trainer, info["run_id"], "accuracy")
            == list(range(STEPS))
        )
        files = rest(server, trainer, "artifacts/list", run_id=info["run_id"], path="notes").get("files", [])
        assert [f["path"] for f in files] == ["notes/trial.json"]
        with urllib.request.urlopen(
            request(
                f"{server.url}/get-artifact?"
                + urllib.parse.urlencode({"run_id": info["run_id"], "path": "notes/trial.json"}),
                trainer,
            ),
            timeout=60,
        ) as reply:
            assert json.loads(reply.read()) == {"index": index, "run_id": info["run_id"]}
    assert indices == set(range(TRIALS))
    assert most_at_once(found) >= 4, "the trials did not overlap: no concurrency was tested"
    assert not CLIENT_TROUBLE.search(log), CLIENT_TROUBLE.search(log)
    assert not SERVER_TROUBLE.search(server.log_text()), server.log_text()[-4000:]
    assert_no_password(log + logs, "the job's log", trainer, server.admin)
    assert_no_password(server.log_text(), "the server's log", trainer, server.admin)


def test_job_submit_train_logs_to_the_server(server, trainer, artifact_store, ray_cluster, tmp_path):
    workdir = tmp_path / "work"
    username, password = credentials_env(trainer)
    log = submit(
        ray_cluster,
        f"mammo-ray-train-{uuid.uuid4().hex[:8]}",
        ["mammo-ray", "train", "--config", "tune_configs/smoke.yaml", *sets(SHRINK)],
        {"MAMMO_RAY_WORKDIR": str(workdir), "MLFLOW_TRACKING_URI": server.url, **username},
        secret_env_vars=password,
    )
    (tmp_path / "train.log").write_text(log)
    assert field(log, "tracking URI") == server.url
    run_id = field(log, "MLflow run")
    run = rest(server, trainer, "runs/get", run_id=run_id)["run"]
    # The job logged as the jobs' user: the auth app made it the manager of the experiment it created.
    granted = urllib.parse.urlencode(
        {"username": trainer.username, "resource_type": "experiment", "resource_id": run["info"]["experiment_id"]}
    )
    with urllib.request.urlopen(
        request(f"{server.url}/api/3.0/mlflow/users/permissions/get?{granted}", server.admin), timeout=60
    ) as reply:
        assert json.loads(reply.read())["permission"] == "MANAGE"
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.name"] == "levynet" and params["train.epochs"] == "2"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0 <= metrics["final_val_auc"] <= 1
    assert history(server, trainer, run_id, "val_loss") == [0, 1]
    logged = {f["path"] for f in rest(server, trainer, "artifacts/list", run_id=run_id).get("files", [])}
    assert any(p.endswith(".png") or p == "plots" for p in logged), logged
    # The artifacts are in the bucket, under the run, uploaded by the server: the job had no S3 credentials.
    stored = bucket_keys(artifact_store, BUCKET, "mlflow/")
    assert any(f"/{run_id}/artifacts/" in key and key.endswith(".png") for key in stored), sorted(stored)[:20]
    assert not (workdir / "mlflow" / "mlflow.db").exists()  # nothing went to the default SQLite store
    assert not CLIENT_TROUBLE.search(log), CLIENT_TROUBLE.search(log)
    assert not SERVER_TROUBLE.search(server.log_text()), server.log_text()[-4000:]
    assert_no_password(log, "the job's log", trainer, server.admin)
    assert_no_password(server.log_text(), "the server's log", trainer, server.admin)
