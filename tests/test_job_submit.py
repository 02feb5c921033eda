"""The jobs of docs/walkthrough.md against one `ray start --head` cluster on 127.0.0.1, as a client would run
them: `ray job submit` of train, of the smoke search and of an ensemble of its best config; `ray job logs`;
then `serve deploy` of serve/config.yaml (the committed `serve.app:build_app`, shipped with a working_dir
runtime_env) on the registered ensemble, and one DICOM through /v1/predict. Shrunk to a few Ray Train fits.
The head (fixture ``ray_cluster``) is the one tests/test_mlflow_server.py uses too, see tests/conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from ray_head import RAY, REPO, SHRINK, field, job_logs, reserved_port, sets, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SERVE = str(Path(RAY).parent / "serve")
# The smoke search cut to one cell of one trial of one epoch, without the texture baseline. Its trial drives a
# TorchTrainer (the multi-worker path, with TuneReportCallback); the ensemble's members train in process.
SEARCH = [
    *SHRINK,
    "train.epochs=1",
    "tune.backbones=[levynet]",
    "tune.view_modes=[single]",
    "tune.num_samples=1",
    "tune.baseline=false",
    "train.in_process=false",
]


def job_id(kind: str) -> str:
    return f"mammo-ray-{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The work directory (crop cache, SQLite MLflow store) the search and the ensemble share."""
    return tmp_path_factory.mktemp("jobs") / "work"


def store(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")


def test_job_submit_trains_and_tracks(ray_cluster, tmp_path):
    workdir = tmp_path / "work"
    log = submit(
        ray_cluster,
        job_id("train"),
        ["mammo-ray", "train", "--config", "tune_configs/smoke.yaml", *sets(SHRINK)],
        {"MAMMO_RAY_WORKDIR": str(workdir)},
    )
    (tmp_path / "train.log").write_text(log)
    assert "MLflow run" in log
    # A console a person can read: the Train worker's epoch lines, printed by the driver, and none of
    # Ray Train's chatter (its report lines, the controller's core_worker errors, worker prefixes).
    epochs = [line for line in log.splitlines() if line.startswith("[levynet] epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["[levynet] epoch 1/2", "[levynet] epoch 2/2"], log
    for noise in ("Reporting training result", "core_worker.cc", "(RayTrainWorker", "(TrainController"):
        assert noise not in log, noise
    assert "logs: Ray, MLflow and Optuna in " in log
    client = store(workdir)
    experiment = client.get_experiment_by_name("mammo-ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.name"] == "levynet"
    assert 0 <= runs[0].data.metrics["final_val_auc"] <= 1
    assert Path(runs[0].data.tags["mammo_ray.checkpoint"]).is_file()


@pytest.fixture(scope="module")
def searched(ray_cluster, workdir):
    submission = job_id("tune")
    log = submit(
        ray_cluster,
        submission,
        ["mammo-ray", "tune", "--config", "tune_configs/search_smoke.yaml", *sets(SEARCH)],
        {"MAMMO_RAY_WORKDIR": str(workdir)},
    )
    (workdir.parent / "tune.log").write_text(log)
    return submission, log


def test_job_submit_tune_and_job_logs(ray_cluster, workdir, searched):
    submission, log = searched
    parent = field(log, "parent run")
    assert "| levynet |" in log  # the leaderboard's row
    logs = job_logs(ray_cluster, submission)  # read back from the cluster, after the client has gone
    assert field(logs, "parent run") == parent and "leaderboard" in logs
    client = store(workdir)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["mammo_ray.kind"] == "search"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.params["model.name"] == "levynet"
    folder = Path(field(log, "search folder"))
    assert (folder / "leaderboard.md").is_file() and (folder / "best_config.yaml").is_file()
    checkpoint = Path(pd.read_csv(folder / "trials.csv")["checkpoint"].item())
    assert checkpoint.is_dir() and not checkpoint.name.startswith("checkpoint_epoch_")  # Ray Train's, not in process


@pytest.fixture(scope="module")
def ensembled(ray_cluster, workdir, searched):
    parent = field(searched[1], "parent run")
    submission = job_id("ensemble")
    submit(
        ray_cluster,
        submission,
        [
            "mammo-ray",
            "ensemble",
            "--config",
            "tune_configs/ensemble_smoke.yaml",
            "--from-search",
            parent,
            "--set",
            "ensemble.members=2",
        ],
        {"MAMMO_RAY_WORKDIR": str(workdir)},
    )
    log = job_logs(ray_cluster, submission)
    (workdir.parent / "ensemble.log").write_text(log)
    return log


def test_job_submit_ensemble_registers_a_model(workdir, ensembled):
    model_uri = field(ensembled, "registered model")
    assert model_uri == "models:/mammo-ray-ensemble-smoke/1"
    assert "ensemble of 2 members (0 failed)" in ensembled
    client = store(workdir)
    version = client.get_model_version("mammo-ray-ensemble-smoke", "1")
    members = version.tags["mammo_ray.member_run_ids"].split(",")
    assert len(members) == 2 and all(client.get_run(m).info.status == "FINISHED" for m in members)
    assert client.get_run(field(ensembled, "parent run")).info.status == "FINISHED"


def _test_lesion(ensemble_log: str) -> tuple[Path, str]:
    """A test-split image with a mass, and its box, as `mammo-ray demo` picks one."""
    from mammo_ray.data.crops import mask_bbox
    from mammo_ray.data.dicom import read_dicom
    from mammo_ray.data.splits import Splits
    from mammo_ray.search.trial import read_plan

    prepared = read_plan(field(ensemble_log, "folder")).cells["member"].prepared
    manifest = pd.read_parquet(prepared.manifest)
    row = manifest[(Splits.load(prepared.splits).assign(manifest) == "test") & (manifest["roi_mask_path"] != "")].iloc[
        0
    ]
    box = ",".join(map(str, mask_bbox(read_dicom(row["roi_mask_path"], flip=False)[0] > 0)))
    return Path(row["image_path"]), box


def _json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return json.loads(reply.read())


def test_serve_deploy_of_the_registered_ensemble(ray_cluster, workdir, ensembled, tmp_path):
    from mammo_ray.cli.serve import wait_ready

    # The port stays reserved until Serve's proxy listens on it (it binds with SO_REUSEPORT, which the
    # reservation admits; nothing else can take the port meanwhile): see ray_head.reserved_port.
    with reserved_port() as port:
        path = tmp_path / "serve-config.yaml"
        # serve/config.yaml as committed (`serve.app:build_app`), on the registered ensemble and this job's store.
        # `serve deploy` sends the config to the cluster, so a working_dir must already be there: a
        # `local://` directory every node has (here the one node; on a cluster, shared storage) or a zip URI.
        subprocess.run(
            [
                sys.executable,
                "scripts/serve_config.py",
                "--model",
                field(ensembled, "registered model"),
                "--set",
                f"tracking_uri=sqlite:///{workdir / 'mlflow' / 'mlflow.db'}",
                "--set",
                f"workdir={workdir}",
                "--set",
                "num_cpus=0.5",
                "--set",
                "max_batch_size=4",
                "--set",
                "execution=loop",
                "--port",
                str(port),
                "--working-dir",
                f"local://{REPO}",
                "--out",
                str(path),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
        deployed = yaml.safe_load(path.read_text())
        assert deployed["applications"][0]["import_path"] == "serve.app:build_app"

        deploy = subprocess.run(
            [SERVE, "deploy", str(path), "--address", ray_cluster.address],
            env=ray_cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        url = f"http://127.0.0.1:{port}"
        try:
            health = wait_ready(url, timeout_s=300)
            assert health["status"] == "ready", health
            image, box = _test_lesion(ensembled)
            curl = subprocess.run(
                ["curl", "-s", "-w", "\n%{http_code}", "-F", f"file=@{image}", "-F", f"box={box}", f"{url}/v1/predict"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            body, _, code = curl.stdout.rpartition("\n")
            assert code == "200", curl.stdout + curl.stderr
            reply = json.loads(body)
            assert 0 <= reply["probability"] <= 1 and reply["label"] in ("benign", "malignant"), reply
            (tmp_path / "predict.json").write_text(json.dumps(reply))

            # A second `serve deploy` that changes only EnsembleModel's user_config: the running replica
            # applies the new threshold in reconfigure(), without reloading its members.
            before = _json(f"{url}/v1/model")["replica"]
            threshold = 0.0 if reply["label"] == "benign" else 1.0  # flips this lesion's label
            assert deployed["applications"][0]["deployments"][0]["name"] == "EnsembleModel"
            deployed["applications"][0]["deployments"][0]["user_config"]["threshold"] = threshold
            path.write_text(yaml.safe_dump(deployed, sort_keys=False))
            again = subprocess.run(
                [SERVE, "deploy", str(path), "--address", ray_cluster.address],
                env=ray_cluster.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert again.returncode == 0, again.stdout + again.stderr
            after = before
            for _ in range(120):  # the update reaches the replica within seconds
                after = _json(f"{url}/v1/model")["replica"]
                if after["options"]["threshold"] == threshold:
                    break
                time.sleep(1)
            assert after["options"]["threshold"] == threshold, after
            assert (after["pid"], after["loaded_at"]) == (before["pid"], before["loaded_at"])  # not reloaded
            assert after["user_config_updates"] == before["user_config_updates"] + 1
            curl = subprocess.run(
                ["curl", "-s", "-F", f"file=@{image}", "-F", f"box={box}", f"{url}/v1/predict"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            updated = json.loads(curl.stdout)
            assert updated["threshold"] == threshold and updated["label"] != reply["label"], updated
            assert updated["probability"] == pytest.approx(reply["probability"], abs=1e-9)
            status_out = subprocess.run(
                [SERVE, "status", "--address", ray_cluster.address],
                env=ray_cluster.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "RUNNING" in status_out.stdout, status_out.stdout + status_out.stderr
        finally:
            shutdown = subprocess.run(
                [SERVE, "shutdown", "-y", "--address", ray_cluster.address],
                env=ray_cluster.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
