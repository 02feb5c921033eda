"""train.storage_path as a location (train/storage.py): what the config accepts, and that a URI stays a
URI on its way to Ray. The same code against a real S3 server is in test_object_storage.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammo_ray.config import ConfigError, load_config
from mammo_ray.train import storage
from mammo_ray.train.in_process import CheckpointFolder
from mammo_ray.train.ray_train import build_trainer


@pytest.mark.parametrize(
    "value",
    ["s3://bucket/ray", "s3://bucket", "gs://bucket/a/b", "file:///srv/ray_results", "/srv/ray_results"],
)
def test_storage_path_takes_uris_and_absolute_folders(value):
    assert load_config(None, [f"train.storage_path={value}"]).train.storage_path == value


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("ray_results", "relative path 'ray_results'"),
        ("./runs/ray", "relative path './runs/ray'"),
        ("ftp://host/ray", "s3://, gs:// and file://"),
        ("s3://", "expected s3://bucket/prefix"),
        ("s3://bucket/ray?endpoint_override=127.0.0.1:9000", "AWS_ENDPOINT_URL"),
        ("file://relative/x", "file:///absolute/folder"),
    ],
)
def test_storage_path_refuses_what_ray_would_misplace(value, says):
    with pytest.raises(ConfigError, match="train.storage_path") as error:
        load_config(None, [f"train.storage_path={value}"])
    assert says in str(error.value)


def test_a_uri_is_never_made_a_path(tmp_path):
    config = load_config(None, ["train.storage_path=s3://bucket/ray/"])
    root = storage.storage_path_for(config, tmp_path)
    assert root == "s3://bucket/ray"  # the trailing slash is dropped, the scheme's two slashes stay
    assert storage.join(root, "search-1", "trial") == "s3://bucket/ray/search-1/trial"
    assert storage.parent(storage.join(root, "search-1")) == "s3://bucket/ray"
    assert storage.storage_path_for(load_config(None, []), tmp_path) == tmp_path.resolve() / "ray_results"
    local = storage.storage_path_for(load_config(None, [f"train.storage_path={tmp_path.as_uri()}"]), "x")
    assert local == tmp_path and isinstance(local, Path)  # file:// is the local folder it names
    trainer = build_trainer(config, {}, name="run", storage_path=root)
    assert trainer.run_config.storage_path == "s3://bucket/ray"
    with pytest.raises(ValueError, match="train.storage_path must be absolute"):
        build_trainer(config, {}, name="run", storage_path="relative/ray")


def test_storage_helpers_on_a_local_folder(tmp_path):
    target = storage.join(tmp_path, "a", "b.txt")
    assert isinstance(target, Path) and not storage.exists(target)
    storage.write_text(target, "hello")
    assert storage.read_text(target) == "hello" and storage.list_files(tmp_path) == {"a/b.txt"}
    with storage.fetched(tmp_path / "a") as local:
        assert local == tmp_path / "a"  # local data is used where it is, not copied
    storage.download(target, tmp_path / "copy" / "b.txt")
    assert (tmp_path / "copy" / "b.txt").read_text() == "hello"
    storage.delete_dir(tmp_path / "a")
    storage.delete_dir(tmp_path / "a")  # gone already: nothing happens
    assert storage.list_files(tmp_path / "a") == set()


def test_a_local_checkpoint_folder_keeps_paths(tmp_path):
    folder = CheckpointFolder(str(tmp_path / "run"))  # the config's string form
    saved = folder.save({"config": {}, "epoch": 0}, {"epoch": 0.0, "val_loss": 0.5})
    assert saved.directory == tmp_path / "run" / "checkpoint_epoch_000000"
    assert sorted(p.name for p in Path(saved.directory).iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.json"]
    assert folder.latest() == saved
