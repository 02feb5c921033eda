"""Ray Train (2 CPU workers) end to end: learning, worker-failure resume, MLflow, the CLI.

One training run with a worker killed mid-run serves several tests: each ``fit()`` costs
about 30 s of fixed Ray start-up on 2 cores.
"""

from __future__ import annotations

import json

import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from mammo_ray.cli import main
from mammo_ray.config import load_config
from mammo_ray.train.checkpoint import load_checkpoint, restore_model
from mammo_ray.train.loop import EarlyStopping
from mammo_ray.train.ray_train import FaultInjection, inject_fault
from mammo_ray.train.run import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 12
KILL_EPOCH = 4
LEARNABLE = [  # synthetic masses big enough to learn in a dozen short epochs
    "data.synth_patients=120",
    "data.synth_size=[512, 320]",
    "data.cache_px=72",
    "data.input_px=64",
    "data.num_workers=0",
    "model.name=levynet",
    "model.dropout=0.2",
    "optim.lr=0.001",
    "optim.weight_decay=0.0001",
    f"train.epochs={EPOCHS}",
    "train.batch_size=8",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.max_failures=1",
    "train.eval_bootstrap=200",
]


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The session's in-process Ray (tests/conftest.py)."""


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """A 2-worker run whose rank-1 worker is SIGKILLed 5 s into epoch ``KILL_EPOCH``."""
    workdir = tmp_path_factory.mktemp("work")
    marker = workdir / "killed.pid"
    config = load_config(None, LEARNABLE)
    with inject_fault(FaultInjection(rank=1, epoch=KILL_EPOCH, marker=str(marker), delay_s=5)):
        outcome = run_training(config, workdir, progress=False)
    return outcome, marker, workdir


def test_two_workers_learn_the_synthetic_signal(killed_run):
    outcome, _, _ = killed_run
    assert outcome.status == "FINISHED"
    assert outcome.metrics["val_auc"] > 0.7, outcome.metrics
    assert outcome.metrics["val_n"] >= 20


def test_killed_worker_resumes_without_repeating_epochs(killed_run):
    outcome, marker, _ = killed_run
    assert marker.is_file()  # the worker really was killed
    client = MlflowClient(outcome.tracking_uri)
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")]
    assert sorted(steps) == list(range(EPOCHS))  # every epoch once: none lost, none repeated
    resumed = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "resumed_from_epoch")}
    assert resumed[KILL_EPOCH - 1] == -1 and resumed[KILL_EPOCH] == KILL_EPOCH
    assert outcome.epochs_run == EPOCHS


def test_optimizer_schedule_history_and_stopping_state_survive_the_kill(killed_run):
    """The learning rate lives in the optimizer's and the scheduler's state: across the restart it
    keeps to the schedule (restarted without them it would jump back to optim.lr). The last
    checkpoint's history and early-stopping state cover the whole run, the epochs before the kill too."""
    outcome, _, workdir = killed_run
    config = load_config(None, LEARNABLE)
    client = MlflowClient(outcome.tracking_uri)
    logged_lr = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "lr")}
    schedule = [config.optim.lr * config.optim.gamma**epoch for epoch in range(EPOCHS)]  # exponential
    assert [logged_lr[epoch] for epoch in range(EPOCHS)] == pytest.approx(schedule, rel=1e-9)
    latest = max(
        (load_checkpoint(path) for path in (workdir / "ray_results").rglob("checkpoint.pt")), key=lambda p: p["epoch"]
    )
    assert latest["epoch"] == EPOCHS - 1
    history = latest["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert [h["lr"] for h in history] == pytest.approx(schedule, rel=1e-9)
    logged_loss = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "val_loss")}
    assert [h["val_loss"] for h in history] == pytest.approx([logged_loss[e] for e in range(EPOCHS)], rel=1e-9)
    replay = EarlyStopping(config.train.monitor, config.train.early_stop_patience)
    for metrics in history:
        replay.update(metrics)
    assert latest["extra"]["stopper"] == pytest.approx(replay.state_dict())  # the best of all 12 epochs
    group = latest["optimizer"]["param_groups"][0]  # stepped once more after the last epoch
    assert group["lr"] / group.get("lr_mult", 1.0) == pytest.approx(config.optim.lr * config.optim.gamma**EPOCHS)
    assert latest["optimizer"]["state"]  # Adam's moments travel with it
    assert latest["scheduler"]["last_epoch"] == EPOCHS


def test_mlflow_run_has_params_metrics_artifacts_and_model(killed_run, monkeypatch):
    outcome, _, _ = killed_run
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "levynet" and run.data.params["train.num_workers"] == "2"
    assert run.data.metrics["final_val_auc"] == pytest.approx(outcome.metrics["val_auc"])
    artifacts = {
        a.path for top in ("plots", "checkpoint", "evaluation") for a in client.list_artifacts(outcome.run_id, top)
    }
    assert {
        "plots/roc_val.png",
        "plots/confusion_val.png",
        "plots/training_curves.png",
        "checkpoint/checkpoint.pt",
    } <= artifacts
    # The network is the run's logged model (MLflow's Model column), with a signature, and it loads back
    # and predicts like the checkpoint.
    (output,) = client.get_run(outcome.run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == outcome.run_id and model.status == "READY" and model.name == "levynet"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", outcome.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{output.model_id}")
    logged = mlflow.pytorch.load_model(f"models:/{output.model_id}").eval()
    restored, spec, _ = restore_model(load_checkpoint(outcome.checkpoint))
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:]) == (3, spec.input_px, spec.input_px)
    x = torch.randn(2, 3, spec.input_px, spec.input_px)
    with torch.no_grad():
        torch.testing.assert_close(logged(x), restored(x))


def test_best_checkpoint_loads_with_weights_only(killed_run):
    outcome, _, _ = killed_run
    payload = torch.load(outcome.checkpoint, weights_only=True)
    assert payload["epoch"] == outcome.best_epoch
    assert payload["config"]["train"]["num_workers"] == 2


def test_cli_evaluate_from_the_run_id(killed_run, capsys):
    outcome, _, workdir = killed_run
    code = main(
        [
            "evaluate",
            "--workdir",
            str(workdir),
            "--run",
            outcome.run_id,
            "--split",
            "test",
            "--json",
            "--bootstrap",
            "100",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["run_id"] == outcome.run_id and result["split"] == "test"
    assert 0 <= result["metrics"]["test_auc"] <= 1
    assert all(path.endswith(".png") for path in result["plots"])


def test_cli_train_folds_in_parallel(ray_session, tmp_path, capsys):
    """2-fold cross-validation by patient: two fold runs under one parent MLflow run."""
    overrides = [
        "data.synth_patients=40",
        "data.synth_size=[384, 240]",
        "data.cache_px=40",
        "data.input_px=32",
        "data.num_workers=0",
        "data.split_fractions=[0.8, 0.0, 0.2]",
        "model.name=levynet",
        "train.epochs=2",
        "train.batch_size=8",
        "train.eval_bootstrap=0",
    ]
    args = ["train", "--workdir", str(tmp_path), "--json", "--folds", "2"]
    code = main(args + [arg for o in overrides for arg in ("--set", o)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert result["folds"] == 2 and len(result["fold_runs"]) == 2
    # Each fold reports its last epoch: the fold it is scored on did not pick it.
    assert result["selection"] == "fixed epochs (train.epochs=2): the fold is not used to pick the checkpoint"
    assert all(r["best_epoch"] == 1 and r["selection"] == result["selection"] for r in result["fold_runs"])
    for r in result["fold_runs"]:  # a 1-worker fold trains in its own Ray task (train/in_process.py)
        saved = sorted(p.name for p in (tmp_path / "ray_results" / r["run_name"]).glob("checkpoint_epoch_*"))
        assert saved == ["checkpoint_epoch_000000", "checkpoint_epoch_000001"]
    auc = result["summary"]["val_auc"]
    assert len(auc["values"]) == 2 and auc["std"] >= 0
    client = MlflowClient(result["tracking_uri"])
    for fold_run in result["fold_runs"]:
        child = client.get_run(fold_run["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == result["run_id"]
        assert child.info.status == "FINISHED"
    parent = client.get_run(result["run_id"])
    assert "val_auc_mean" in parent.data.metrics and "val_auc_std" in parent.data.metrics
    # The folds validate on disjoint patients.
    held = [set(pd.read_csv(f"{r['output_dir']}/predictions_val.csv")["patient_id"]) for r in result["fold_runs"]]
    assert held[0] and held[1] and not held[0] & held[1]


def test_epoch_lines_from_ray_tasks_are_printed_by_the_driver(ray_session, capsys):
    """The CLI keeps Ray workers' output off the console (log_to_driver off), so a fold task's or a
    Train worker's epoch lines reach it over a queue (train/progress.py), in order, with their prefix."""
    import ray

    from mammo_ray.train.progress import PREFIX_KEY, QUEUE_KEY, EpochLines, announce

    @ray.remote(num_cpus=0)
    def fold(cfg, lines):
        for line in lines:
            announce(cfg, line)

    with EpochLines(poll_s=0.1) as printed:
        ray.get(fold.remote({QUEUE_KEY: printed.queue, PREFIX_KEY: "[fold 1] "}, ["epoch 1/2", "epoch 2/2"]))
    # this module's Ray forwards its tasks' own prints too (this one's and earlier tests'): not those
    out = [line for line in capsys.readouterr().out.splitlines() if " pid=" not in line]
    assert out == ["[fold 1] epoch 1/2", "[fold 1] epoch 2/2"]
    announce({}, "here")  # no queue: printed where it runs, nothing else
    assert [line for line in capsys.readouterr().out.splitlines() if " pid=" not in line] == ["here"]
