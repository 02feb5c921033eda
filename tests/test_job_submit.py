"""`ray job submit` against a `ray start --head` cluster on 127.0.0.1, exactly as the README says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHRINK = ["data.synth_patients=40", "data.synth_size=[384, 240]", "data.cache_px=40", "data.input_px=32",
          "train.epochs=2", "train.eval_bootstrap=50"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node head on loopback; its dashboard (the jobs API) on a free port."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    gcs, dashboard = _free_port(), _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_trains_and_tracks(cluster, tmp_path):
    env, address = cluster
    workdir = tmp_path / "work"
    runtime_env = json.dumps({"env_vars": {"MAMMO_RAY_WORKDIR": str(workdir)}})
    overrides = [arg for o in SHRINK for arg in ("--set", o)]
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                           "--runtime-env-json", runtime_env, "--",
                           "mammo-ray", "train", "--config", "tune_configs/smoke.yaml", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log and "MLflow run" in log
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mammo-ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.name"] == "levynet"
    assert 0 <= runs[0].data.metrics["final_val_auc"] <= 1
    assert Path(runs[0].data.tags["mammo_ray.checkpoint"]).is_file()
