"""``--model`` resolution: a checkpoint, a run id, or a registered ensemble version."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.ensemble.model import register_ensemble
from mammo_ray.ensemble.source import ModelSourceError, resolve_model_source
from mammo_ray.train.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from mammo_ray.train.loop import build_training


@pytest.fixture(scope="module")
def checkpoints(tiny_workdir, tiny_config, tmp_path_factory):
    paths = []
    for seed in (0, 1):
        config = tiny_config(f"train.seed={seed}")
        training = build_training(config, ensure_prepared(config, tiny_workdir, progress=False).cache_dir)
        payload = checkpoint_payload(model=training.model, config=config, spec=training.spec, epoch=0, history=[])
        paths.append(save_checkpoint(payload, tmp_path_factory.mktemp(f"member{seed}")))
    return paths


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("source", artifact_location=str(tmp_path / "artifacts"))


def test_checkpoint_file_and_folder(checkpoints, tmp_path):
    for spec in (checkpoints[0], checkpoints[0].parent):
        source = resolve_model_source(str(spec), tmp_path)
        assert source.kind == "checkpoint" and source.checkpoints == [checkpoints[0]] and source.run_id is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="a folder without checkpoint.pt"):
        resolve_model_source(str(tmp_path / "empty"), tmp_path)


def test_run_id_with_and_without_prefix(checkpoints, store, tmp_path):
    uri, client, experiment = store
    run = client.create_run(experiment, tags={"mammo_ray.checkpoint": str(checkpoints[1])})
    for spec in (run.info.run_id, f"runs:/{run.info.run_id}"):
        source = resolve_model_source(spec, tmp_path, tracking_uri=uri)
        assert source.kind == "run" and source.checkpoints == [checkpoints[1]]
        assert source.run_id == run.info.run_id and source.member_run_ids == [run.info.run_id]
    bare = client.create_run(experiment)
    with pytest.raises(ModelSourceError, match="no mammo_ray.checkpoint tag"):
        resolve_model_source(bare.info.run_id, tmp_path, tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="no run"):
        resolve_model_source("0" * 32, tmp_path, tracking_uri=uri)


def test_registered_ensemble_gives_every_member(checkpoints, store, tmp_path):
    uri, client, experiment = store
    parent = client.create_run(experiment)
    members = [client.create_run(experiment).info.run_id for _ in checkpoints]
    registered = register_ensemble(uri, parent.info.run_id, checkpoints, members, "source-test")
    source = resolve_model_source(registered["model_uri"], tmp_path / "work", tracking_uri=uri)
    assert source.kind == "registered" and len(source.checkpoints) == 2
    assert source.member_run_ids == members and source.run_id == parent.info.run_id
    assert source.version == "1" and source.model_uri == "models:/source-test/1"
    for downloaded, original in zip(source.checkpoints, checkpoints, strict=True):  # same weights, in member order
        a, b = load_checkpoint(downloaded), load_checkpoint(original)
        assert a["config"] == b["config"] and all((a["model"][k] == b["model"][k]).all() for k in a["model"])
    with pytest.raises(ModelSourceError, match="no version 7"):
        resolve_model_source("models:/source-test/7", tmp_path, tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="expected models:/<name>/<version>"):
        resolve_model_source("models:/source-test", tmp_path, tracking_uri=uri)


def test_an_alias_names_the_version_it_points_at_now(checkpoints, store, tmp_path):
    uri, client, experiment = store
    first, second = (
        register_ensemble(
            uri,
            client.create_run(experiment).info.run_id,
            members,
            [client.create_run(experiment).info.run_id for _ in members],
            "alias-test",
            alias="champion",
        )
        for members in (checkpoints, checkpoints[:1])
    )
    assert first["alias_uri"] == second["alias_uri"] == "models:/alias-test@champion"
    source = resolve_model_source("models:/alias-test@champion", tmp_path / "work", tracking_uri=uri)
    assert source.version == "2" and source.model_uri == "models:/alias-test/2"  # the alias moved to version 2
    assert len(source.checkpoints) == 1 and source.spec == "models:/alias-test@champion"
    client.set_registered_model_alias("alias-test", "champion", "1")  # moved back by hand: the next load follows
    again = resolve_model_source("models:/alias-test@champion", tmp_path / "work", tracking_uri=uri)
    assert again.version == "1" and len(again.checkpoints) == 2
    with pytest.raises(ModelSourceError, match="has no alias 'staging'"):
        resolve_model_source("models:/alias-test@staging", tmp_path, tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="models:/<name>@<alias>"):
        resolve_model_source("models:/@champion", tmp_path, tracking_uri=uri)
    unaliased = register_ensemble(
        uri, client.create_run(experiment).info.run_id, checkpoints[:1], ["r"], "alias-test-none"
    )
    assert unaliased["alias"] is None and unaliased["alias_uri"] == unaliased["model_uri"]


def test_anything_else_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match="--model nope: not a checkpoint"):
        resolve_model_source("nope", tmp_path)
