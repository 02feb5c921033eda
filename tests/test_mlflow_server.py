"""An `mlflow server` on PostgreSQL (127.0.0.1) as a team deployment runs it, reached through
MLFLOW_TRACKING_URI by Ray jobs on a `ray start --head` cluster, and read back through its REST API:
16 Tune trials logging at once (8 in flight) lose no run, metric or artifact and meet no
`database is locked`; a `mammo-ray train` job's run arrives whole. PostgreSQL (fixture ``postgres_uri``)
comes from scripts/start_postgres.py; if it cannot start these tests fail, they do not skip. The Ray head
(fixture ``ray_cluster``) is the one tests/test_job_submit.py uses too, see tests/conftest.py."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
from mlflow_postgres import fresh_database, mlflow_server
from ray_head import SHRINK, field, job_logs, last_json, sets, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TRIALS, CONCURRENT, STEPS = 16, 8, 20
# In the server's log: a locked database, an answer 5xx, an exception. In a client's: a locked database,
# an MLflow error, or a request that had to be retried (MLflow's client retries 5xx and 429 silently).
SERVER_TROUBLE = re.compile(r'database is locked|HTTP/1\.1" 5\d\d|Traceback', re.IGNORECASE)
CLIENT_TROUBLE = re.compile(r"database is locked|MlflowException|Retrying \(Retry", re.IGNORECASE)


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    with (
        fresh_database(postgres_uri) as database,
        mlflow_server(database, base / "artifacts", base / "server.log") as running,
    ):
        yield running


def rest(server, endpoint: str, body: dict | None = None, **query: Any) -> dict:
    """One call of MLflow's REST API (POST with ``body``, else GET with ``query``)."""
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def history(server, run_id: str, key: str) -> list[int]:
    return sorted(
        int(m.get("step", 0)) for m in rest(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
    )


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


def test_parallel_trials_lose_nothing(server, ray_cluster, tmp_path):
    submission = f"mlflow-load-{uuid.uuid4().hex[:8]}"
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
        {"MLFLOW_TRACKING_URI": server.url},
    )
    (tmp_path / "job.log").write_text(log)
    summary = last_json(job_logs(ray_cluster, submission))
    assert summary["errored"] == 0 and len(summary["runs"]) == TRIALS, summary

    found = rest(
        server,
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
            history(server, info["run_id"], "loss") == history(server, info["run_id"], "accuracy") == list(range(STEPS))
        )
        files = rest(server, "artifacts/list", run_id=info["run_id"], path="notes").get("files", [])
        assert [f["path"] for f in files] == ["notes/trial.json"]
        with urllib.request.urlopen(
            f"{server.url}/get-artifact?"
            + urllib.parse.urlencode({"run_id": info["run_id"], "path": "notes/trial.json"}),
            timeout=60,
        ) as reply:
            assert json.loads(reply.read()) == {"index": index, "run_id": info["run_id"]}
    assert indices == set(range(TRIALS))
    assert most_at_once(found) >= 4, "the trials did not overlap: no concurrency was tested"
    assert not CLIENT_TROUBLE.search(log), CLIENT_TROUBLE.search(log)
    assert not SERVER_TROUBLE.search(server.log_text()), server.log_text()[-4000:]


def test_job_submit_train_logs_to_the_server(server, ray_cluster, tmp_path):
    workdir = tmp_path / "work"
    log = submit(
        ray_cluster,
        f"mammo-ray-train-{uuid.uuid4().hex[:8]}",
        ["mammo-ray", "train", "--config", "tune_configs/smoke.yaml", *sets(SHRINK)],
        {"MAMMO_RAY_WORKDIR": str(workdir), "MLFLOW_TRACKING_URI": server.url},
    )
    (tmp_path / "train.log").write_text(log)
    assert field(log, "tracking URI") == server.url
    run_id = field(log, "MLflow run")
    run = rest(server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.name"] == "levynet" and params["train.epochs"] == "2"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0 <= metrics["final_val_auc"] <= 1
    assert history(server, run_id, "val_loss") == [0, 1]
    logged = {f["path"] for f in rest(server, "artifacts/list", run_id=run_id).get("files", [])}
    assert any(p.endswith(".png") or p == "plots" for p in logged), logged
    assert not (workdir / "mlflow" / "mlflow.db").exists()  # nothing went to the default SQLite store
    assert not CLIENT_TROUBLE.search(log), CLIENT_TROUBLE.search(log)
    assert not SERVER_TROUBLE.search(server.log_text()), server.log_text()[-4000:]
