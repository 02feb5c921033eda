"""The jobs of docs/walkthrough.md and of the KubeRay RayJobs against one `ray start --head` cluster on
127.0.0.1, as a client would run them: `ray job submit` of train (smoke config, synthetic data); then, on a
small replica of real CBIS-DDSM laid out as a TCIA download (what `/shared` holds on a cluster), the load
step of cluster/load_cbis.sh and the entrypoints of cluster/kuberay/rayjob-tune.yaml and
rayjob-ensemble.yaml, read from the manifests (`mammo-ray tune` / `ensemble` with tune_configs/cbis_*.yaml,
the ensemble `--from-search` the search); `ray job logs`; then `serve deploy` of serve/config.yaml (the
committed `serve.app:build_app`, shipped with a working_dir runtime_env) on the registered ensemble, and
one DICOM of the replica through /v1/predict. Shrunk to a few Ray Train fits: the configs' data settings
stay (seed750 crops at 256 px, 224-px input, the DoG bank), the search shrinks to one levynet trial of
one epoch and the resources to 2 CPUs without a GPU.
The head (fixture ``ray_cluster``) is the one tests/test_mlflow_server.py uses too, see tests/conftest.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from ray_head import BIN, RAY, REPO, SHRINK, field, job_logs, reserved_port, sets, submit

from mammo_ray.config import Config, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SERVE = str(Path(RAY).parent / "serve")
KUBERAY = REPO / "cluster" / "kuberay"
# The replica: the first 30 patients (sorted ids) of the real CSVs, 81 rows, drawn at 256x160. The fewest
# for which tune_configs/cbis_*.yaml's patient split (0.81/0.09/0.1, masses) puts benign and malignant
# masses in train, val and test alike: 30 mass rows, 4 of them in val and 4 in test.
REPLICA_PATIENTS = 30
# What a 2-core machine without a GPU changes in the RayJobs' configs: resources only.
ON_CPU = ["train.use_gpu=false", "train.cpus_per_worker=1", "data.num_workers=0"]
# cbis_search.yaml's grid cut to one cell (levynet, its configured parallel view mode, paper 000's
# augmentation) of one trial of one epoch, without the texture baseline. Its trial drives a TorchTrainer
# (the multi-worker path, with TuneReportCallback); the ensemble's members train in process.
SEARCH = [
    *ON_CPU,
    "tune.backbones=[levynet]",
    "tune.backbone_overrides={}",  # inception_v3's 320-px input: not searched here (the load step prepares it)
    "tune.view_modes=[parallel]",
    "tune.augment=[on]",
    "tune.num_samples=1",
    "tune.baseline=false",
    "train.epochs=1",
    "train.eval_bootstrap=50",
    "train.in_process=false",
]


def job_id(kind: str) -> str:
    return f"mammo-ray-{kind}-{uuid.uuid4().hex[:8]}"


@dataclass
class Loaded:
    log: str  # load_cbis.sh's output
    cache: Path  # the crop cache of tune_configs/cbis_search.yaml (and cbis_ensemble.yaml) it prepared
    cache_mtime_ns: int  # of the cache's index.parquet, right after the load step


def rayjob(name: str) -> tuple[list[str], dict[str, str]]:
    """The entrypoint of cluster/kuberay/``name`` as KubeRay's submitter runs it, and its head's plain env values."""
    spec = yaml.safe_load((KUBERAY / name).read_text())["spec"]
    (head,) = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return shlex.split(spec["entrypoint"]), {e["name"]: e["value"] for e in head["env"] if "value" in e}


def entrypoint_config(entrypoint: list[str]) -> Config:
    return load_config(REPO / entrypoint[entrypoint.index("--config") + 1])


def on_replica(path: str, shared: Path) -> Path:
    """A path on the cluster's shared volume (/shared), on the test's replica of it."""
    assert path.startswith("/shared/"), path
    return shared / path.removeprefix("/shared/")


def data_on_replica(config: Config, shared: Path) -> list[str]:
    """The config's CBIS-DDSM folders moved from /shared to the replica, as `--set` overrides."""
    assert config.data.source == "cbis-ddsm" and config.data.root and config.data.csv_dir
    return [
        f"data.root={on_replica(config.data.root, shared)}",
        f"data.csv_dir={on_replica(config.data.csv_dir, shared)}",
    ]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The replica of the shared volume: CBIS-DDSM in the TCIA layout and the four CSVs where the cbis_*
    configs read them (/shared/CBIS-DDSM, /shared/cbis-csvs), drawn from the real CSVs' rows."""
    shared = tmp_path_factory.mktemp("shared")
    config = entrypoint_config(rayjob("rayjob-tune.yaml")[0])
    root, csvs = on_replica(config.data.root, shared), on_replica(config.data.csv_dir, shared)
    assert root.name == "CBIS-DDSM"  # `synth --layout tcia --out X` writes X/CBIS-DDSM, as the Retriever does
    subprocess.run(
        [
            str(BIN / "mammo-ray"),
            "synth",
            "--from-csv",
            "cbis-ddsm",
            "--layout",
            "tcia",
            "--patients",
            str(REPLICA_PATIENTS),
            "--size",
            "256x160",
            "--workers",
            "1",
            "--out",
            str(root.parent),
            "--workdir",
            str(shared / "synth-work"),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    csvs.mkdir()
    for csv in root.parent.glob("*_case_description_*.csv"):
        csv.rename(csvs / csv.name)
    return shared


@pytest.fixture(scope="module")
def workdir(shared):
    """The work directory (crop cache, SQLite MLflow store) the load step, the search and the ensemble
    share: the RayJobs' MAMMO_RAY_WORKDIR, on the replica. Their cluster flag (tracking.CLUSTER_ENV) stays
    out: it refuses SQLite, and jobs against an MLflow server are tests/test_mlflow_server.py's."""
    _, env = rayjob("rayjob-tune.yaml")
    assert rayjob("rayjob-ensemble.yaml")[1]["MAMMO_RAY_WORKDIR"] == env["MAMMO_RAY_WORKDIR"]
    return on_replica(env["MAMMO_RAY_WORKDIR"], shared)


@pytest.fixture(scope="module")
def loaded(shared, workdir):
    """cluster/load_cbis.sh, run as job-load-cbis.yaml runs it (bash, no Ray), with /shared on the replica:
    its two folder variables, and the folders of its `mammo-ray demo` steps (the cbis_search.yaml they
    prepare reads /shared)."""
    config = entrypoint_config(rayjob("rayjob-tune.yaml")[0])
    script = (REPO / "cluster" / "load_cbis.sh").read_text()
    for name, path in (("root", config.data.root), ("csvs", config.data.csv_dir)):
        line = f"{name}={path}\n"
        assert script.count(line) == 1, line  # the script reads where the configs say (or this test must change)
        script = script.replace(line, f"{name}={on_replica(path, shared)}\n")
    demo = "--config tune_configs/cbis_search.yaml"
    assert script.count(demo) == 2, script
    # Right after --config, so that the script's own --set (the 320-px cache) still come last and win.
    script = script.replace(demo, shlex.join([*demo.split(), *sets(data_on_replica(config, shared))]))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MAMMO_RAY_WORKDIR": str(workdir),
        "LOAD_WORKERS": "1",
    }
    # $0 is the script's path, so its `cd "$(dirname "$0")/.."` lands in the repository, as in the image.
    proc = subprocess.run(
        ["bash", "-c", script, "cluster/load_cbis.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (shared / "load.log").write_text(proc.stdout + proc.stderr)
    caches = [Path(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("  crop cache ")]
    assert len(caches) == 2 and caches[0] != caches[1], proc.stdout  # 256 px, then inception_v3's 320 px
    index = caches[0] / "index.parquet"
    return Loaded(proc.stdout, caches[0], index.stat().st_mtime_ns)


def test_the_load_script_indexes_and_prepares_the_replica(shared, workdir, loaded):
    csvs = {path.name: pd.read_csv(path) for path in (shared / "cbis-csvs").glob("*.csv")}
    assert len(csvs) == 4
    report = json.loads((workdir / "check" / "manifest.report.json").read_text())  # step 1, the check
    assert report["rows"] == report["resolved"] == sum(map(len, csvs.values())) == 81, report
    assert (workdir / "check" / "manifest.parquet").is_file()
    assert loaded.log.rstrip().endswith("reuse these crops")  # every step ran, and set -e stopped none
    masses = sum(len(frame) for name, frame in csvs.items() if name.startswith("mass_"))
    crops = pd.read_parquet(loaded.cache / "index.parquet")
    assert len(crops) == masses == 30  # data.abnormality: mass, one seed750 crop per mass row


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
def searched(ray_cluster, shared, workdir, loaded):
    """rayjob-tune.yaml's entrypoint, submitted after the load step as the walkthroughs order them."""
    entrypoint, _ = rayjob("rayjob-tune.yaml")
    assert entrypoint[:2] == ["mammo-ray", "tune"], entrypoint
    submission = job_id("tune")
    log = submit(
        ray_cluster,
        submission,
        [*entrypoint, *sets(data_on_replica(entrypoint_config(entrypoint), shared)), *sets(SEARCH)],
        {"MAMMO_RAY_WORKDIR": str(workdir)},
    )
    (shared / "tune.log").write_text(log)
    return submission, log


def test_job_submit_tune_and_job_logs(ray_cluster, shared, workdir, loaded, searched):
    from mammo_ray.search.trial import read_plan

    submission, log = searched
    parent = field(log, "parent run")
    assert "on cbis-ddsm data**" in log and "| levynet |" in log  # the leaderboard's title and row
    logs = job_logs(ray_cluster, submission)  # read back from the cluster, after the client has gone
    assert field(logs, "parent run") == parent and "leaderboard" in logs
    client = store(workdir)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["mammo_ray.kind"] == "search"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    params = children[0].data.params
    assert (params["model.name"], params["model.view_mode"], params["model.in_chans"]) == ("levynet", "parallel", "9")
    assert params["data.source"] == "cbis-ddsm" and params["data.root"] == str(shared / "CBIS-DDSM")
    folder = Path(field(log, "search folder"))
    assert (folder / "leaderboard.md").is_file() and (folder / "best_config.yaml").is_file()
    checkpoint = Path(pd.read_csv(folder / "trials.csv")["checkpoint"].item())
    assert checkpoint.is_dir() and not checkpoint.name.startswith("checkpoint_epoch_")  # Ray Train's, not in process
    # The search trained on the crops the load step prepared, without preparing them again.
    (cell,) = read_plan(folder).cells.values()
    assert Path(cell.prepared.cache_dir) == loaded.cache
    assert (loaded.cache / "index.parquet").stat().st_mtime_ns == loaded.cache_mtime_ns


@pytest.fixture(scope="module")
def ensembled(ray_cluster, shared, workdir, searched):
    """rayjob-ensemble.yaml's entrypoint with `--from-search` the search, as its header says, and 2 members."""
    entrypoint, _ = rayjob("rayjob-ensemble.yaml")
    assert entrypoint[:2] == ["mammo-ray", "ensemble"], entrypoint
    parent = field(searched[1], "parent run")
    submission = job_id("ensemble")
    submit(
        ray_cluster,
        submission,
        [
            *entrypoint,
            "--from-search",
            parent,
            # /shared on the replica, as for every job (with --from-search the members take the search's data)
            *sets(data_on_replica(entrypoint_config(entrypoint), shared)),
            *sets([*ON_CPU, "ensemble.members=2"]),
        ],
        {"MAMMO_RAY_WORKDIR": str(workdir)},
    )
    log = job_logs(ray_cluster, submission)
    (shared / "ensemble.log").write_text(log)
    return log


def test_job_submit_ensemble_registers_a_model(workdir, loaded, ensembled):
    from mammo_ray.search.trial import read_plan

    ensemble = entrypoint_config(rayjob("rayjob-ensemble.yaml")[0]).ensemble
    name = ensemble.registered_model
    model_uri = field(ensembled, "registered model")
    assert model_uri == f"models:/{name}/1" and f"now also models:/{name}@{ensemble.alias}" in ensembled
    assert "ensemble of 2 members (0 failed), test split" in ensembled
    client = store(workdir)
    version = client.get_model_version(name, "1")
    members = version.tags["mammo_ray.member_run_ids"].split(",")
    assert len(members) == 2 and all(client.get_run(m).info.status == "FINISHED" for m in members)
    assert client.get_run(field(ensembled, "parent run")).info.status == "FINISHED"
    assert read_plan(field(ensembled, "folder")).cells["member"].prepared.cache_dir == str(loaded.cache)


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
