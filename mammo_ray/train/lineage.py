"""The data a run trained on, as MLflow dataset inputs (the MLflow UI's Dataset column).

Every training run logs one dataset per split (``mlflow.data.context`` train, val, test): the
manifest's rows of that split (the lesion, patient, exam, view, label and abnormality columns),
named after the prepared data folder, with MLflow's content digest. Two runs on the same split show
the same digest, and a changed split shows a new one.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import PandasDataset, from_pandas
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mammo_ray.data.manifest import read_manifest
from mammo_ray.data.pipeline import PreparedData
from mammo_ray.data.splits import Splits

DATASET_COLUMNS = (
    "lesion_id",
    "image_id",
    "exam_key",
    "patient_id",
    "side",
    "view",
    "abnormality_type",
    "pathology",
    "label",
)
SPLITS = ("train", "val", "test")


def split_datasets(prepared: PreparedData) -> dict[str, PandasDataset]:
    """The prepared data's manifest rows per split (resolved rows only), as MLflow datasets. An empty split
    (no val split when folds replace it) is left out: there is nothing it trained or was scored on."""
    manifest = read_manifest(prepared.manifest)
    manifest = manifest[manifest["resolved"]]
    split = Splits.load(prepared.splits).assign(manifest)
    columns = [c for c in DATASET_COLUMNS if c in manifest.columns]
    name = Path(prepared.cache_dir).parent.name or Path(prepared.cache_dir).name
    out = {}
    for part in SPLITS:
        rows = pd.DataFrame(manifest.loc[split == part, columns]).reset_index(drop=True)
        if rows.empty:
            continue
        with warnings.catch_warnings():  # its advice on integer columns concerns model inputs, not these rows
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            # MLflow 3.17 registers its local-file source class twice, then warns that a path "can be
            # interpreted in multiple ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource" (the same one)
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            out[part] = from_pandas(rows, source=prepared.manifest, targets="label", name=f"{name}/{part}")
    return out


def _stamp(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _dataset_inputs(
    prepared: PreparedData, manifest: tuple[str, int, int], splits: tuple[str, int, int]
) -> tuple[DatasetInput, ...]:
    """The inputs of ``prepared``, once per process for the same manifest and splits files: every ensemble
    member and search trial that a reused process trains logs the same three datasets, and reading the
    manifest and hashing its rows took about a sixth of a tiny member's fixed cost."""
    return tuple(
        DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, part)])
        for part, dataset in split_datasets(prepared).items()
    )


def log_data_inputs(client: MlflowClient, run_id: str, prepared: PreparedData) -> None:
    """Log the train, val and test rows of ``prepared`` as the run's dataset inputs (one per context)."""
    inputs = list(_dataset_inputs(prepared, _stamp(prepared.manifest), _stamp(prepared.splits)))
    for attempt in range(5):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as exc:
            # Runs that start together (cross-validation folds, trials) log the same split at once: the
            # store creates a dataset once per experiment, and the loser of that race gets a UNIQUE
            # constraint error. Once the winner's row exists, the retry links the run to it.
            if "unique constraint" not in str(exc).lower() or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
