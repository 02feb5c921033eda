"""Checkpoints: weights_only loading, preprocessing that travels, honest errors; MLflow run status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from mammo_ray.cli import main
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.train.checkpoint import (
    CheckpointError,
    checkpoint_payload,
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from mammo_ray.train.evaluation import evaluate_checkpoint
from mammo_ray.train.loop import build_training, fit
from mammo_ray.train.tracking import TrackedRun


@pytest.fixture(scope="module")
def trained(tiny_workdir, tiny_config, tmp_path_factory):
    config = tiny_config("train.epochs=1", "data.normalization=mean_image")
    prepared = ensure_prepared(config, tiny_workdir, progress=False)
    training = build_training(config, prepared.cache_dir)
    fit(training)
    payload = checkpoint_payload(
        model=training.model,
        config=config,
        spec=training.spec,
        epoch=0,
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        history=training.history,
    )
    return training, save_checkpoint(payload, tmp_path_factory.mktemp("ckpt")), prepared


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only(trained):
    _, path, _ = trained
    raw = torch.load(path, weights_only=True)  # no pickled code anywhere in the file
    assert raw["epoch"] == 0 and raw["config"]["model"]["name"] == "levynet"
    assert set(raw) >= {"model", "optimizer", "scheduler", "epoch", "config", "eval_transform", "history"}
    assert (path.parent / "config.yaml").is_file()


@pytest.mark.slow
def test_restored_model_and_preprocessing_match_training(trained):
    training, path, prepared = trained
    model, spec, config = restore_model(load_checkpoint(path))
    assert spec == training.spec and spec.mean_image is not None  # the mean image travels too
    np.testing.assert_array_equal(spec.mean_image, training.spec.mean_image)
    crop = CropCache(prepared.cache_dir).image(0)
    x = build_eval_transform(spec)(crop)[None]
    training.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), training.model(x))


@pytest.mark.slow
def test_evaluate_checkpoint_writes_metrics_and_plots(trained, tiny_workdir, tmp_path):
    _, path, _ = trained
    result = evaluate_checkpoint(path, "test", tiny_workdir, tmp_path, n_boot=50)
    assert result.n > 0 and 0 <= result.metrics["test_acc"] <= 1
    assert result.image.confusion and len(result.image.confusion) == 2
    for plot in result.plots:
        assert plot.endswith(".png") and (tmp_path / plot.split("/")[-1]).stat().st_size > 1000
    assert {"roc_test.png", "confusion_test.png", "training_curves.png"} <= {p.split("/")[-1] for p in result.plots}


@pytest.mark.slow
def test_evaluate_scores_the_test_split_and_its_auc_is_sklearns(trained, tiny_workdir, tmp_path, capsys):
    """``test_n`` is the test split's size and ``test_auc`` sklearn's AUC on the saved test predictions,
    in the result and in `mammo-ray evaluate --json`; scoring the validation split instead would fail."""
    _, path, prepared = trained
    cache = CropCache(prepared.cache_dir)
    test_cases = SingleViewDataset(cache, "test", "pathology").frame
    val_cases = SingleViewDataset(cache, "val", "pathology").frame
    assert set(test_cases["patient_id"]).isdisjoint(val_cases["patient_id"])
    result = evaluate_checkpoint(path, "test", tiny_workdir, tmp_path / "api", n_boot=20)
    code = main(
        ["evaluate", "--checkpoint", str(path), "--workdir", str(tiny_workdir), "--out", str(tmp_path / "cli")]
        + ["--split", "test", "--bootstrap", "20", "--json"]
    )
    assert code == 0
    cli = json.loads(capsys.readouterr().out)
    for metrics, predictions_file in ((result.metrics, result.predictions), (cli["metrics"], cli["predictions"])):
        predictions = pd.read_csv(predictions_file)
        assert Path(predictions_file).name == "predictions_test.csv"
        assert list(zip(predictions["exam_key"], predictions["view"], strict=True)) == list(
            zip(test_cases["exam_key"], test_cases["view"], strict=True)
        )  # the test split's cases, in order, and no others
        assert metrics["test_n"] == len(test_cases) == len(predictions)
        assert metrics["test_auc"] == pytest.approx(roc_auc_score(predictions["label"], predictions["prob"]), abs=1e-12)
        assert predictions["label"].tolist() == test_cases["label"].tolist()


@pytest.mark.parametrize(
    "content, reason", [(b"not a checkpoint", "not a loadable checkpoint"), (None, "checkpoint not found")]
)
def test_bad_checkpoint_names_the_file(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mammo-ray-checkpoint/1", "obj": object()}, path)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def _status(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


def test_run_status_finished_and_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with TrackedRun(uri, "exp", "ok") as run:
        run.log_metrics({"val_auc": 0.7, "skipped": float("nan")}, step=0)
    assert _status(uri, run.run_id) == "FINISHED"
    assert [m.key for m in MlflowClient(uri).get_metric_history(run.run_id, "val_auc")] == ["val_auc"]
    with pytest.raises(RuntimeError):
        with TrackedRun(uri, "exp", "bad") as failed:
            raise RuntimeError("boom")
    assert _status(uri, failed.run_id) == "FAILED"
    assert "boom" in MlflowClient(uri).get_run(failed.run_id).data.tags["error"]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import sys, time
        from mammo_ray.train.tracking import TrackedRun
        with TrackedRun({uri!r}, "exp", "long") as run:
            print(run.run_id, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert _status(uri, run_id) == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    proc.wait()  # a hang is the suite timeout's to report
    assert proc.returncode != 0
    assert _status(uri, run_id) == "KILLED"  # written by the process before it exited: no waiting
