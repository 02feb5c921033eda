"""train.storage_path on object storage: a real S3-compatible server (moto's, tests/s3_server.py) on
loopback, reached through pyarrow.fs as Ray's storage reaches it.

An in-process training run keeps its checkpoints in the bucket and resumes from them; a search's trials
and an ensemble's members leave their checkpoints, plans and Tune state there; and ``mammo-ray tune
--resume s3://...`` continues the search from the bucket alone. Ray is started here, after the S3
environment is set, so every trial process inherits it (a cluster's nodes get it from their own
environment or an instance role).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import ray
from mlflow import MlflowClient
from s3_server import bucket_keys, s3_server
from setups import TINY_TRAIN

from mammo_ray.cli import main
from mammo_ray.config import load_config
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.ray_session import init_ray
from mammo_ray.search.members import run_ensemble
from mammo_ray.search.search import run_search
from mammo_ray.search.trial import PLAN_FILE
from mammo_ray.train.in_process import CheckpointFolder, train_in_process
from mammo_ray.train.ray_train import loop_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET = "mammo-ray-results"
ROOT = f"s3://{BUCKET}/ray"
SMALL = [*TINY_TRAIN, "train.cpus_per_worker=1", "train.keep_checkpoints=1", f"train.storage_path={ROOT}"]


@pytest.fixture(scope="module")
def s3():
    """The server's environment, set in this process before Ray starts (its processes inherit it)."""
    with s3_server(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A 2-CPU Ray without a dashboard (every trial trains in process: no Train placement groups to
    free). The session's shared Ray (tests/conftest.py ``local_ray``), if up, was started without the
    S3 environment: it is stopped for this module and started again after it."""
    shared = ray.is_initialized()
    if shared:
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if shared:
        with pytest.MonkeyPatch.context() as patch:  # as it was: without the S3 environment of this module
            for key in s3:
                patch.delenv(key, raising=False)
            init_ray(num_cpus=2)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-s3') / 'mlflow.db'}"


def _key(uri: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/")


def _checkpoints(keys: set[str], prefix: str) -> dict[str, set[str]]:
    """``{checkpoint folder: its files}`` of the in-process checkpoints under ``prefix`` (pyarrow's empty
    folder markers, keys that end in "/", left out)."""
    found: dict[str, set[str]] = {}
    for key in keys:
        folder, _, name = key.rpartition("/")
        if name and key.startswith(prefix) and folder.rpartition("/")[2].startswith("checkpoint_epoch_"):
            found.setdefault(folder, set()).add(name)
    return found


def test_an_in_process_run_keeps_and_resumes_its_checkpoints_in_the_bucket(s3, tiny_workdir):
    """No Ray: the checkpoint folder of a 1-worker trial on s3://, cut after epoch 0 and run again."""
    config = load_config(None, [*SMALL, "train.epochs=3"])
    prepared = ensure_prepared(config, tiny_workdir, progress=False)
    cfg = loop_config(config, prepared.cache_dir, splits_path=prepared.splits)
    folder = CheckpointFolder(f"{ROOT}/unit/run-1")

    class Cut(Exception):
        pass

    def cut_after_first(metrics: dict) -> None:
        raise Cut

    with pytest.raises(Cut):
        train_in_process(cfg, folder, cut_after_first)
    assert _checkpoints(bucket_keys(s3, BUCKET, "ray/unit/"), "ray/unit/") == {
        "ray/unit/run-1/checkpoint_epoch_000000": {"checkpoint.pt", "config.yaml", "metrics.json"}
    }
    reports: list[dict] = []
    train_in_process(cfg, folder, reports.append)
    assert [m["epoch"] for m in reports] == [1, 2] and {m["resumed_from_epoch"] for m in reports} == {1.0}
    assert all(m["checkpoint_path"].startswith(f"{ROOT}/unit/run-1/checkpoint_epoch_") for m in reports)
    kept = _checkpoints(bucket_keys(s3, BUCKET, "ray/unit/"), "ray/unit/")
    best = folder.best("val_loss")
    assert set(kept) == {_key(str(best.directory)), "ray/unit/run-1/checkpoint_epoch_000002"}  # keep 1 + latest
    assert all(files == {"checkpoint.pt", "config.yaml", "metrics.json"} for files in kept.values())


@pytest.fixture(scope="module")
def search(s3_ray, tiny_workdir, mlflow_uri):
    overrides = [
        *SMALL,
        f"train.mlflow_uri={mlflow_uri}",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=2",
        "tune.scheduler=fifo",
        "tune.baseline=false",
    ]
    return run_search(load_config(None, overrides), tiny_workdir, progress=False)


def test_search_trials_checkpoint_into_the_bucket(search, s3, tiny_workdir):
    assert search.experiment_dir.startswith(f"{ROOT}/search-") and search.errored == 0
    name = search.experiment_dir.rpartition("/")[2]
    keys = bucket_keys(s3, BUCKET, "ray/")
    trials = pd.read_csv(search.trials_csv)
    assert len(trials) == 2 and trials["checkpoint"].str.startswith(f"{ROOT}/{name}-").all()
    for checkpoint in trials["checkpoint"]:  # each trial's best epoch, reported to Tune as a bucket URI
        assert {f"{_key(checkpoint)}/checkpoint.pt", f"{_key(checkpoint)}/metrics.json"} <= keys
    assert len(_checkpoints(keys, f"ray/{name}-")) >= 2  # one folder per kept epoch, per trial
    # Beside them: the plan and config --resume reads, Tune's experiment state, the uploaded leaderboard.
    assert {f"ray/{name}/{PLAN_FILE}", f"ray/{name}/search_config.json", f"ray/{name}/leaderboard.csv"} <= keys
    assert any(k.startswith(f"ray/{name}/experiment_state") for k in keys)
    assert not list((tiny_workdir / "ray_results").glob(f"{name}*"))  # nothing went to the local default
    board = pd.read_csv(Path(search.leaderboard).with_name("leaderboard_long.csv"))
    assert (board["status"] == "ok").all()  # the winner's checkpoint was read back from the bucket and tested
    assert search.best is not None and search.best.checkpoint in set(trials["checkpoint"])


def test_ensemble_members_checkpoint_into_the_bucket(s3_ray, s3, tiny_workdir, mlflow_uri):
    overrides = [*SMALL, f"train.mlflow_uri={mlflow_uri}", "ensemble.members=2", "ensemble.max_concurrent_trials=2"]
    result = run_ensemble(load_config(None, overrides), tiny_workdir, progress=False)
    assert result["experiment_dir"].startswith(f"{ROOT}/ensemble-") and result["members"] == 2
    assert not result["members_failed"]
    name = result["experiment_dir"].rpartition("/")[2]
    keys = bucket_keys(s3, BUCKET, "ray/")
    members = _checkpoints(keys, f"ray/{name}-")
    runs = {folder.split("/")[1] for folder in members}  # <ensemble name>-<trial id>: one per member
    assert len(runs) == 2 and all(files >= {"checkpoint.pt", "metrics.json"} for files in members.values())
    assert {f"ray/{name}/{PLAN_FILE}", f"ray/{name}/ensemble_summary.json"} <= keys
    assert all(Path(m["checkpoint"]).is_file() for m in result["member_runs"])  # the local copy of each member


def test_tune_resume_reads_the_search_back_from_the_bucket(search, s3, tiny_workdir, mlflow_uri, capfd):
    client = MlflowClient(mlflow_uri)
    children = client.search_runs(
        [client.get_experiment_by_name("mammo-ray").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{search.parent_run_id}'",
    )
    ended = {run.info.run_id: run.info.end_time for run in children}
    assert len(ended) == 2
    shutil.rmtree(Path(search.trials_csv).parent)  # the local outputs: only the bucket is left to resume from
    capfd.readouterr()
    assert main(["tune", "--resume", search.experiment_dir, "--workdir", str(tiny_workdir), "--json"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["experiment_dir"] == search.experiment_dir and result["parent_run_id"] == search.parent_run_id
    assert result["trials"] == 2 and result["errored"] == 0
    assert result["best"]["checkpoint"] == search.best.checkpoint  # the same trials, read back from Tune's state
    assert pd.read_csv(Path(result["leaderboard"]).with_name("leaderboard_long.csv"))["status"].eq("ok").all()
    after = client.search_runs(
        [client.get_experiment_by_name("mammo-ray").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{search.parent_run_id}'",
    )
    assert {run.info.run_id: run.info.end_time for run in after} == ended  # finished trials were not run again
