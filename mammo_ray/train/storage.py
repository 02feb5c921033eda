"""Where Ray keeps a run's state: ``train.storage_path``, a local folder or an object-storage URI.

Ray Train and Tune take a URI (``s3://bucket/prefix``, ``gs://bucket/prefix``) as their
``storage_path`` and reach it through ``pyarrow.fs`` (``FileSystem.from_uri``). The files mammo-ray
keeps beside Ray's go the same way: the checkpoints of in-process trials (``in_process.py``) and the
plan and config of a search or an ensemble (``search/trial.py``), which ``--resume`` reads back.

A location is a URI string or a local path. A URI stays a string from the config to Ray:
``Path("s3://bucket/x")`` is ``s3:/bucket/x``. ``file://`` URIs become the local paths they name
(``storage_path_for``), so a local folder is always handled as one.

Credentials and endpoints come from each process's environment, as pyarrow reads them, on every node
that trains: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (or an instance role),
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, moto); GCS uses
Google's default credentials. A local Ray's processes inherit the driver's environment.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from mammo_ray.config import Config

Location = str | Path  # a URI (a string with "://") or a local path


def is_uri(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def storage_path_for(config: Config, workdir: str | Path) -> Location:
    """``train.storage_path``: a URI string, or the local folder it names (``file://`` included);
    ``<workdir>/ray_results`` when unset."""
    value = config.train.storage_path
    if value is None:
        return Path(workdir).resolve() / "ray_results"
    if value.startswith("file://"):
        return Path(pafs.FileSystem.from_uri(value)[1])
    return value if is_uri(value) else Path(value)


def join(location: Location, *parts: str) -> Location:
    """``location/part/...``: a URI string for a URI, a ``Path`` for a local path."""
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return Path(location, *parts)


def parent(location: Location) -> Location:
    """The folder ``location`` is in: ``s3://bucket/a`` for ``s3://bucket/a/b``."""
    if is_uri(location):
        return posixpath.dirname(str(location).rstrip("/"))
    return Path(location).parent


def _resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: Location) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: Location) -> str:
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: Location, text: str) -> None:
    """Write a whole file that readers see complete or not at all: a rename locally, one PUT on object storage."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(target)
        return
    fs, path = _resolve(location)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def list_files(location: Location) -> set[str]:
    """Every file under ``location``, as a ``/``-separated path relative to it; empty when there is none."""
    fs, path = _resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, path) for i in infos if i.type == pafs.FileType.File}


def delete_dir(location: Location) -> None:
    """Delete a folder and everything under it; nothing happens when it is gone already."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload(source: Path, location: Location) -> None:
    """Copy a local file or folder (its contents, recursively) to ``location``."""
    fs, path = _resolve(location)
    if Path(source).is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(Path(source).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download(location: Location, target: Path) -> Path:
    """Copy a file or folder at ``location`` to the local ``target``; returns ``target``."""
    fs, path = _resolve(location)
    target = Path(target)
    (target if fs.get_file_info(path).type == pafs.FileType.Directory else target.parent).mkdir(
        parents=True, exist_ok=True
    )
    pafs.copy_files(path, str(target.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


@contextmanager
def fetched(location: Location) -> Iterator[Path]:
    """A local copy of the file or folder at ``location`` for the block: the path itself when it is local,
    else a download into a temporary folder, deleted afterwards."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mammo-ray-fetch-") as tmp:
        yield download(location, Path(tmp) / posixpath.basename(str(location).rstrip("/")))


@contextmanager
def staged(location: Location) -> Iterator[Path]:
    """A local folder to write ``location``'s files into: the folder itself when it is local, else a
    temporary folder uploaded to ``location`` when the block ends without an error."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mammo-ray-stage-") as tmp:
        yield Path(tmp)
        upload(Path(tmp), location)
