"""The search and the ensemble on a 2-CPU Ray: MLflow nesting, the leaderboard, a driver SIGKILL
and resume, and an ensemble built from the search's best config, registered and loaded back.

Every trial is a Ray Train run with about 20 s of fixed start-up on 2 cores, so the tests share
one search and keep the trial counts small.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from mlflow import MlflowClient
from setups import TINY_TRAIN

from mammo_ray.cli import main
from mammo_ray.config import load_config
from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.dicom import read_dicom
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.search.search import run_search

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SEARCH = [
    *TINY_TRAIN,
    "train.cpus_per_worker=1",
    "train.keep_checkpoints=1",
    "tune.backbones=[levynet, resnet18]",
    "tune.view_modes=[single, parallel]",
    "tune.num_samples=2",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    "tune.max_concurrent_trials=2",
    "tune.seed=1",
]


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The session's in-process Ray (tests/conftest.py), with its dashboard for the state API."""


@pytest.fixture(scope="module")
def search(ray_session, tiny_workdir):
    return run_search(load_config(None, SEARCH), tiny_workdir, progress=False)


def _children(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_search_runs_every_cell_with_child_runs_in_mlflow(search):
    client = MlflowClient(search.tracking_uri)
    parent = client.get_run(search.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.num_samples"] == "2"
    children = _children(client, search.parent_run_id)
    assert len(children) == search.trials == 8 and search.errored == 0
    trials = pd.read_csv(search.trials_csv)
    assert trials["cell"].value_counts().to_dict() == {cell: 2 for cell in trials["cell"].unique()}
    assert trials["cell"].nunique() == 4
    for checkpoint in trials["checkpoint"].dropna():  # 1-worker trials train in process (train/in_process.py)
        assert Path(checkpoint).name.startswith("checkpoint_epoch_") and (Path(checkpoint) / "checkpoint.pt").is_file()
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED"), run.info
        assert "model.dropout" in run.data.params and "val_loss" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == list(range(len(history)))  # one value per epoch
        if run.info.status == "KILLED":  # stopped by its cell's ASHA (the workers may have run on meanwhile)
            assert "ASHA" in run.data.tags["mammo_ray.stop_reason"]
        else:
            assert len(history) == 2 and "mammo_ray.checkpoint" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(search.parent_run_id, "leaderboard")}
    assert {"leaderboard/leaderboard.csv", "leaderboard/leaderboard.md", "leaderboard/trials.csv"} <= artifacts


def test_leaderboard_has_every_combination_and_the_baseline(search):
    long = pd.read_csv(Path(search.leaderboard).with_name("leaderboard_long.csv"))
    cnn = long[long["backbone"].isin(["levynet", "resnet18"])]
    assert set(zip(cnn["backbone"], cnn["view_mode"], strict=True)) == {
        (b, v) for b in ("levynet", "resnet18") for v in ("single", "parallel")
    }
    assert (cnn["status"] == "ok").all()
    assert cnn["test_auc"].between(0, 1).all() and cnn["test_acc"].between(0, 1).all()
    assert (cnn["test_auc_ci_low"] <= cnn["test_auc"]).all() and (cnn["test_auc"] <= cnn["test_auc_ci_high"]).all()
    baseline = long[long["backbone"].str.contains("LDA")]
    assert set(baseline["view_mode"]) == {"single", "parallel"} and (baseline["status"] == "ok").all()
    markdown = Path(search.leaderboard_markdown).read_text()
    assert "| levynet |" in markdown and "| resnet18 |" in markdown and "texture + LDA" in markdown
    # The best configuration is the lowest exam-level validation loss, one level for every view mode.
    best = search.best
    assert best is not None and best.selected_by == "val_exam_loss"
    assert best.metrics["val_exam_loss"] == pytest.approx(pd.read_csv(search.trials_csv)["val_exam_loss"].min())
    assert load_config(best.config_path).model.name == best.cell.split("-")[0]
    assert f"{best.cell} trial {best.trial_id}" in markdown and "lowest val_exam_loss" in markdown


def test_ensemble_from_search_beats_its_mean_member_and_registers(search, tiny_workdir, capfd):
    overrides = [
        *TINY_TRAIN,
        "train.cpus_per_worker=1",
        "train.keep_checkpoints=1",
        "ensemble.members=3",
        "ensemble.max_concurrent_trials=2",
        "ensemble.registered_model=tiny-ensemble",
    ]
    args = ["ensemble", "--from-search", search.parent_run_id, "--workdir", str(tiny_workdir), "--json"]
    for override in overrides:
        args += ["--set", override]
    capfd.readouterr()
    assert main(args) == 0
    result = json.loads(capfd.readouterr().out)  # stdout holds exactly one JSON object
    assert {"members", "ensemble_auc", "mean_member_auc", "model_uri", "disclaimer"} <= set(result)
    best = load_config(search.best.config_path)
    assert result["members"] == 3 and not result["members_failed"]
    assert {m["seed"] for m in result["member_runs"]} == {0, 1, 2}
    # The tiny test split has 8 patients: one swapped pair moves an AUC by about 0.05, so the
    # ensemble-vs-member claim is checked as a paired bootstrap statement (not significantly worse)
    # here, and exactly on data with a known signal in tests/ensemble/test_combine.py.
    assert result["diff"] == pytest.approx(result["ensemble_auc"] - result["mean_member_auc"])
    assert result["diff_ci"][0] <= result["diff"] <= result["diff_ci"][1] and result["diff_ci"][1] >= 0, result
    assert result["ensemble_auc"] > 0.5, result
    assert all(Path(p).is_file() for p in result["plots"])
    # Calibration, operating points and referral: fitted on the members' val predictions, reported on test
    assert {"brier", "ece", "ece_calibrated", "operating_points", "referral"} <= set(result)
    assert result["policy"]["members"] == 3 and result["policy"]["fitted_on"] == "val"
    assert [p["target"] for p in result["operating_points"]] == [0.8, 0.9, 0.95, 0.9, 0.95]
    assert set(result["referral"]["curves"]) == {"policy", "best_member", "random"}
    assert {Path(p).name for p in result["plots"]} >= {"reliability_test.png", "referral_test.png"}
    client = MlflowClient(result["tracking_uri"])
    members = _children(client, result["parent_run_id"])
    assert len(members) == 3 and all(run.info.status == "FINISHED" for run in members)
    assert {run.data.params["model.name"] for run in members} == {best.model.name}
    assert {run.data.params["optim.lr"] for run in members} == {str(best.optim.lr)}  # only the seed differs
    # ensemble.member_models is off by default: no member logs a model of its own, each logs its checkpoint
    for run in members:
        assert not client.get_run(run.info.run_id).outputs.model_outputs
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    version = client.get_model_version("tiny-ensemble", result["registered_model"]["version"])
    assert set(version.tags["mammo_ray.member_run_ids"].split(",")) == {run.info.run_id for run in members}
    assert version.run_id == result["parent_run_id"]
    assert result["alias_uri"] == "models:/tiny-ensemble@champion"  # ensemble.alias, by default
    assert client.get_model_version_by_alias("tiny-ensemble", "champion").version == version.version

    # `evaluate --model` takes the registered ensemble by its alias: its members' mean, as the ensemble reported
    evaluate = ["evaluate", "--model", result["alias_uri"], "--split", "test", "--bootstrap", "0"]
    assert main([*evaluate, "--workdir", str(tiny_workdir), "--tracking-uri", result["tracking_uri"], "--json"]) == 0
    evaluated = json.loads(capfd.readouterr().out)
    assert evaluated["model"]["model_uri"] == f"models:/tiny-ensemble/{version.version}"
    assert len(evaluated["model"]["checkpoints"]) == 3
    assert evaluated["metrics"]["test_auc"] == pytest.approx(result["ensemble_auc"], abs=1e-9)
    assert evaluated["decisions"]["policy_source"] == "registered model"  # the stored policy, not refitted
    assert evaluated["policy"] == result["policy"] and evaluated["ece_calibrated"] == result["ece_calibrated"]
    logged = {a.path for a in client.list_artifacts(result["parent_run_id"], "evaluation")}
    assert {"evaluation/reliability_test.png", "evaluation/referral_test.png"} <= logged
    assert "ensemble_test_ece_calibrated" in client.get_run(result["parent_run_id"]).data.metrics

    with pytest.MonkeyPatch.context() as env:  # the caller's value, if any, comes back after
        env.setenv("MLFLOW_TRACKING_URI", result["tracking_uri"])
        model = mlflow.pyfunc.load_model(result["model_uri"])
    ensemble = Ensemble.from_checkpoints([m["checkpoint"] for m in result["member_runs"]])
    prepared = _member_prepared(result)
    cache = CropCache(prepared["cache_dir"])
    dataset = SingleViewDataset(cache, "test", best.data.task, transform=build_eval_transform(ensemble.spec))
    x = torch.stack([dataset[i][0] for i in range(6)])
    # The registered model takes image files and ROI boxes (here each lesion's mask bounding box), as
    # /v1/predict does, and answers the ensemble's probability of the cached crops of those lesions.
    lesions = dataset.frame.head(6)
    masks = pd.read_parquet(prepared["manifest"]).set_index("lesion_id").loc[lesions["lesion_id"], "roi_mask_path"]
    boxes = [",".join(map(str, mask_bbox(read_dicom(m, flip=False)[0] > 0))) for m in masks]
    out = model.predict(pd.DataFrame({"image": list(lesions["image_path"]), "box": boxes}))
    assert len(out) == 6 and out["probability"].between(0, 1).all()
    assert out["calibrated_probability"].between(0, 1).all() and out["refer"].dtype == bool  # the registered policy
    with torch.inference_mode():
        np.testing.assert_allclose(out["probability"].to_numpy(), ensemble(x).mean(dim=1).numpy(), atol=1e-5)


def _member_prepared(result: dict) -> dict:
    """The member cell's prepared data (``PreparedData.to_dict()``: cache_dir, manifest, ...)."""
    plan = json.loads((Path(result["experiment_dir"]) / "mammo_ray_plan.json").read_text())
    return plan["cells"]["member"]["prepared"]


def _finished_trials(uri: str) -> int:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mammo-ray")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mammo_ray.search` LIKE 'search-%'")
    return sum(run.info.status == "FINISHED" for run in runs)


def test_resume_after_driver_sigkill_skips_finished_trials(ray_session, tmp_path, tiny_workdir, capfd):
    workdir = tiny_workdir  # its data are prepared; the store and the Ray results are this test's own
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *SEARCH,
        "tune.backbones=[levynet]",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        f"train.mlflow_uri={uri}",
        "tune.baseline=false",
        f"train.storage_path={tmp_path / 'ray_results'}",
    ]
    args = [sys.executable, "-m", "mammo_ray.cli", "tune", "--workdir", str(workdir)]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while _finished_trials(uri) < 1:  # no deadline of its own: a hang is the test timeout's to report
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        time.sleep(2)
    # No wait for Tune to save that the trial finished: a restart must not train it again either way
    # (run_trial reports the finished MLflow run instead, see trial.py)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    experiment_dir = next((tmp_path / "ray_results").glob("search-*/mammo_ray_plan.json")).parent
    client = MlflowClient(uri)
    before = {
        run.info.run_id: run.info.end_time
        for run in client.search_runs([client.get_experiment_by_name("mammo-ray").experiment_id])
        if run.info.status == "FINISHED"
    }
    assert before

    capfd.readouterr()
    assert main(["tune", "--resume", str(experiment_dir), "--workdir", str(workdir), "--json"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert {"experiment_dir", "parent_run_id", "best", "leaderboard"} <= set(result)
    assert result["best"]["config"]["model"]["name"] == "levynet" and "val_loss" in result["best"]["metrics"]

    assert result["trials"] == 2 and result["errored"] == 0
    runs = _children(client, result["parent_run_id"])
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)) == 2  # a restarted trial continued its own MLflow run
    for run in runs:
        assert run.info.status in ("FINISHED", "KILLED")
        if run.info.run_id in before:  # finished before the kill: not run again
            assert run.info.end_time == before[run.info.run_id]
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    assert len(pd.read_csv(result["trials_csv"])) == 2
