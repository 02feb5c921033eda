"""A cluster run logs to an MLflow server: SQLite is refused where MAMMO_RAY_CLUSTER=1, and only there.

Every Ray process of the cloud launcher profiles and the KubeRay manifests has MAMMO_RAY_CLUSTER=1;
the one-machine profile, `ray start` by hand and the test suite's own heads do not, and keep the
SQLite default (tests/test_job_submit.py runs `ray job submit` against such a head).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mammo_ray.config import ConfigError, load_config
from mammo_ray.train.tracking import CLUSTER_ENV, tracking_uri

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_MANIFESTS = ["raycluster", "rayjob-tune", "rayjob-ensemble", "rayservice"]
SERVER = "http://mlflow.internal:5000"


@pytest.fixture
def cluster_env(monkeypatch):
    monkeypatch.setenv(CLUSTER_ENV, "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_cluster_run_refuses_sqlite_and_names_the_fix(cluster_env, tmp_path):
    with pytest.raises(ConfigError) as err:
        tracking_uri(load_config(), tmp_path)
    message = str(err.value)
    assert f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db" in message  # the URI it would have used
    assert "MAMMO_RAY_CLUSTER=1" in message  # why here
    assert "MLFLOW_TRACKING_URI" in message and "PostgreSQL" in message  # what to set
    assert "mammo-ray-mlflow" in message and "--runtime-env-json" in message  # where, on each kind of cluster
    assert not (tmp_path / "mlflow").exists()  # refused before anything was written


def test_a_cluster_run_refuses_a_configured_sqlite_uri_too(cluster_env, tmp_path):
    config = load_config(None, [f"train.mlflow_uri=sqlite:///{tmp_path}/elsewhere.db"])
    with pytest.raises(ConfigError, match="elsewhere.db is SQLite"):
        tracking_uri(config, tmp_path)


def test_a_cluster_run_takes_the_server(cluster_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    assert tracking_uri(load_config(), tmp_path) == SERVER
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(load_config(None, [f"train.mlflow_uri={SERVER}"]), tmp_path) == SERVER


@pytest.mark.parametrize("value", [None, "0", ""])
def test_a_local_run_keeps_sqlite(value, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if value is None:
        monkeypatch.delenv(CLUSTER_ENV, raising=False)
    else:
        monkeypatch.setenv(CLUSTER_ENV, value)
    assert tracking_uri(load_config(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert (tmp_path / "mlflow").is_dir()  # the store's folder, made for it


def _ray_containers(name: str) -> list[dict]:
    (doc,) = yaml.safe_load_all((CLUSTER / "kuberay" / f"{name}.yaml").read_text())
    spec = (
        doc["spec"]
        if doc["kind"] == "RayCluster"
        else doc["spec"][{"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]]
    )
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_cluster_declares_itself_and_one_machine_does_not():
    for name in RAY_MANIFESTS:
        for container in _ray_containers(name):
            env = {e["name"]: e for e in container["env"]}
            assert env[CLUSTER_ENV] == {"name": CLUSTER_ENV, "value": "1"}, name
            assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mammo-ray-mlflow", name
    for name in ("aws", "gcp"):
        config = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
        starts = [
            c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
        ]
        assert starts and all(f"{CLUSTER_ENV}=1" in c for c in starts), name  # Ray's processes, the job drivers
        assert f"export {CLUSTER_ENV}=1" in " ".join(config["setup_commands"]), name  # `ray exec` shells
    local = (CLUSTER / "local.yaml").read_text()
    assert CLUSTER_ENV not in local
    for helper in ("tests/ray_head.py", "tests/test_job_submit.py"):
        assert CLUSTER_ENV not in (REPO / helper).read_text(), helper  # the suite's own heads stay local
