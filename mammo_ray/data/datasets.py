"""PyTorch datasets over a prepared crop cache: single views, and CC+MLO pairs of a lesion.

Labels depend on the task (``mammo_ray.constants.Task``):

    pathology      lesion crops; 1 malignant, 0 benign
    abnormality    lesion crops; 1 calcification, 0 mass (paper 004)
    mass_presence  mass crops (1) and non-mass patches (0) (paper 003)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mammo_ray.config import DataConfig
from mammo_ray.constants import Task
from mammo_ray.data.transforms import (
    OFFLINE_CROPS,
    OFFLINE_ROTATIONS,
    TransformSpec,
    build_offline_transform,
    offline_variant_params,
)


class CropCache:
    """Read access to a cache written by ``prepare_cache``; shards are memory-mapped lazily."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / "index.parquet"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.cache_dir}: no index.parquet; run `mammo-ray prepare` first")
        self.index = pd.read_parquet(index_path)
        self.meta: dict[str, Any] = json.loads((self.cache_dir / "cache.json").read_text())
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._maps:  # opened per process: memmaps do not survive pickling to workers
            path = self.cache_dir / "shards" / f"shard-{shard:05d}.{name}.npy"
            self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def image(self, entry: int) -> np.ndarray:
        row = self.index.iloc[entry]
        return np.asarray(self._array(int(row["shard"]), "images")[int(row["offset"])])

    def mask(self, entry: int) -> np.ndarray:
        row = self.index.iloc[entry]
        return np.asarray(self._array(int(row["shard"]), "masks")[int(row["offset"])])

    def transform_spec(self, cfg: DataConfig) -> TransformSpec:
        """The spec for this cache's statistics under ``cfg``'s transform settings."""
        mean_image = None
        if cfg.normalization == "mean_image":
            mean_image = np.load(self.cache_dir / "mean_image.npy")
        return TransformSpec.from_config(
            cfg,
            train_mean=self.meta.get("train_mean", 0.0),
            train_std=self.meta.get("train_std", 1.0),
            mean_image=mean_image,
        )


def task_frame(index: pd.DataFrame, task: str | Task) -> pd.DataFrame:
    """The entries a task uses, with its ``label`` column; ``entry`` keeps the cache position."""
    task = Task.parse(task)
    frame = index.copy()
    if task is Task.PATHOLOGY:
        frame = frame[frame["kind"].isin(["lesion", "whole"])]
        frame["label"] = frame["malignant"]
    elif task is Task.ABNORMALITY:
        frame = frame[frame["kind"] == "lesion"]
        frame["label"] = 1 - frame["mass"]
    else:
        frame = frame[(frame["kind"] == "negative") | (frame["mass"] == 1)]
        frame["label"] = frame["mass"]
    return frame.reset_index(drop=True)


class SingleViewDataset(Dataset):
    """One crop per sample: ``(tensor (C, H, W), label)``.

    Args:
        cache: the crop cache.
        split: "train", "val" or "test".
        task: which label to read.
        transform: stored crop -> tensor (``build_train_transform`` / ``build_eval_transform``).
        offline: ``(spec, seed)`` to expand each sample into paper 001's 25 fixed variants
            instead of using ``transform``.
    """

    def __init__(
        self,
        cache: CropCache,
        split: str,
        task: str | Task,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        offline: tuple[TransformSpec, int] | None = None,
    ):
        self.cache = cache
        frame = task_frame(cache.index, task)
        self.frame = frame[frame["split"] == split].reset_index(drop=True)
        if self.frame.empty:
            raise ValueError(f"{cache.cache_dir}: no {Task.parse(task).value.lower()} entries in split {split!r}")
        self.transform = transform
        self.offline = offline
        self.variants = OFFLINE_ROTATIONS * OFFLINE_CROPS if offline else 1
        self._offline_apply = build_offline_transform(offline[0]) if offline else None

    def __len__(self) -> int:
        return len(self.frame) * self.variants

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(self.frame["label"].to_numpy(), self.variants)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        base, variant = divmod(i, self.variants)
        row = self.frame.iloc[base]
        crop = self.cache.image(int(row["entry"]))
        if self.offline:
            spec, seed = self.offline
            assert self._offline_apply is not None  # built in __init__ whenever offline is given
            x = self._offline_apply(crop, offline_variant_params(seed, int(row["entry"]), spec)[variant])
        elif self.transform is not None:
            x = self.transform(crop)
        else:
            x = torch.from_numpy(crop.astype(np.float32))[None]
        return x, int(row["label"])


class PairedViewDataset(Dataset):
    """The CC and MLO crops of one lesion: ``((cc, mlo), label)``.

    Lesions seen in only one view cannot be paired; they are counted in ``unpaired`` (with
    their exam keys in ``unpaired_keys``), never dropped silently. ``pairs`` carries each
    exam's ``patient_id``, the cluster of the evaluation bootstrap. The views of one exam key
    must agree on the label (the indexer gives disagreeing views keys of their own); a cache
    where they do not is rejected with the exam key, never paired under the first row's label.
    """

    def __init__(
        self,
        cache: CropCache,
        split: str,
        task: str | Task,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ):
        self.cache = cache
        self.transform = transform
        frame = task_frame(cache.index, task)
        frame = frame[(frame["split"] == split) & (frame["exam_key"] != "")]
        pairs, unpaired = [], []
        for key, group in frame.groupby("exam_key", sort=True):
            for column in ("label", "patient_id"):
                if group[column].nunique(dropna=False) > 1:
                    raise ValueError(
                        f"{cache.cache_dir}: exam {key!r} in split {split!r} has views with different "
                        f"{column!r} values {sorted(group[column].astype(str).unique())}; re-index "
                        "with this version (`mammo-ray index`, then `mammo-ray prepare`): its pairing "
                        "rule gives views that disagree exam keys of their own"
                    )
            views = dict(zip(group["view"], group["entry"], strict=True))
            if "CC" in views and "MLO" in views:
                pairs.append(
                    (
                        key,
                        str(group["patient_id"].iloc[0]),
                        int(views["CC"]),
                        int(views["MLO"]),
                        int(group["label"].iloc[0]),
                    )
                )
            else:
                unpaired.append(key)
        self.pairs = pd.DataFrame(pairs, columns=["exam_key", "patient_id", "cc_entry", "mlo_entry", "label"])
        self.unpaired_keys = unpaired
        self.unpaired = len(unpaired)
        if self.pairs.empty:
            raise ValueError(f"{cache.cache_dir}: no CC+MLO pairs in split {split!r} ({self.unpaired} unpaired)")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def labels(self) -> np.ndarray:
        return self.pairs["label"].to_numpy()

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        row = self.pairs.iloc[i]
        views = []
        for entry in (row["cc_entry"], row["mlo_entry"]):
            crop = self.cache.image(int(entry))
            views.append(self.transform(crop) if self.transform else torch.from_numpy(crop.astype(np.float32))[None])
        return (views[0], views[1]), int(row["label"])
