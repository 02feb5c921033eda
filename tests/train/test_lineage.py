"""What the MLflow UI shows: each run's train/val/test rows as dataset inputs, experiments opened as model training."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow import MlflowClient

from mammo_ray.data.manifest import read_manifest
from mammo_ray.data.pipeline import PreparedData, ensure_prepared
from mammo_ray.data.splits import Splits
from mammo_ray.train.lineage import log_data_inputs, split_datasets
from mammo_ray.train.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, TrackedRun


@pytest.fixture()
def prepared(tiny_workdir, tiny_config):
    return ensure_prepared(tiny_config(), tiny_workdir, progress=False)


def test_a_run_lists_the_rows_of_each_split_it_used(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = []
    for name in ("a", "b"):
        with TrackedRun(uri, "lineage", name) as run:
            log_data_inputs(run.client, run.run_id, prepared)
            runs.append(run.run_id)
    client = MlflowClient(uri)
    manifest = read_manifest(prepared.manifest)
    manifest = manifest[manifest["resolved"]]
    counts = Splits.load(prepared.splits).assign(manifest).value_counts()
    digests = []
    for run_id in runs:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
        assert set(by_context) == {"train", "val", "test"}
        for part, dataset in by_context.items():
            assert dataset.name.endswith(f"/{part}") and dataset.source_type == "local"
            assert f'"num_rows": {counts[part]}' in dataset.profile  # the split's rows, no more
            assert "patient_id" in dataset.schema and "label" in dataset.schema
        digests.append({part: d.digest for part, d in by_context.items()})
    assert digests[0] == digests[1] and len(set(digests[0].values())) == 3  # same data, same digest; splits differ
    experiment = client.get_experiment_by_name("lineage")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING  # the UI opens it on its runs


def test_a_run_that_loses_the_race_to_create_the_dataset_still_lists_it(prepared, tmp_path, monkeypatch):
    """Folds and trials start together and log the same split at once: the store creates the dataset
    once, and the other run's insert fails on the UNIQUE constraint; it retries and links to that row."""
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with TrackedRun(uri, "lineage", "winner") as run:
        log_data_inputs(run.client, run.run_id, prepared)
    with TrackedRun(uri, "lineage", "loser") as run:
        original, calls = run.client.log_inputs, []

        def racing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
            return original(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_inputs", racing)
        log_data_inputs(run.client, run.run_id, prepared)
        loser = run.run_id
    assert len(calls) == 2
    assert len(MlflowClient(uri).get_run(loser).inputs.dataset_inputs) == 3


def test_an_empty_split_is_left_out(prepared, tmp_path):
    """Cross-validation splits have no val split: the run lists the splits that have rows."""
    splits = Splits.load(prepared.splits)
    no_val = dataclasses.replace(splits, train=sorted(splits.train + splits.val), val=[])
    moved = PreparedData(**{**prepared.to_dict(), "splits": str(no_val.save(tmp_path / "splits.json"))})
    assert set(split_datasets(moved)) == {"train", "test"}


def test_an_existing_experiment_is_tagged_and_a_set_kind_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("older")
    mine = client.create_experiment("theirs", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older", "theirs"):
        with TrackedRun(uri, name, "run"):
            pass
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_rewritten_splits_file_is_read_again(prepared, tmp_path):
    """The datasets are built once per process for the same files: a splits file rewritten in place
    (a new split saved over the old one) is read again, not served from that memo."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "splits.json"
    splits = Splits.load(prepared.splits)
    splits.save(path)
    moved = PreparedData(**{**prepared.to_dict(), "splits": str(path)})
    contexts = []
    for rewrite in (False, True):
        if rewrite:
            dataclasses.replace(splits, train=sorted(splits.train + splits.val), val=[]).save(path)
        with TrackedRun(uri, "lineage", f"rewrite-{rewrite}") as run:
            log_data_inputs(run.client, run.run_id, moved)
        inputs = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
        contexts.append({next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs})
    assert contexts == [{"train", "val", "test"}, {"train", "test"}]
