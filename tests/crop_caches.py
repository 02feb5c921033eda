"""Crop caches written by hand, holding a signal the test chooses.

The files are those ``prepare_cache`` writes and ``CropCache`` reads (``index.parquet``, ``cache.json``,
``shards/shard-00000.images.npy``), without the synthesis, indexing and cropping pipeline, so a test
knows exactly which crop carries the label and which is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

NOISE_MEAN, NOISE_STD = 1000.0, 100.0  # every crop: Gaussian noise around this level
DISC_GAIN = 400.0  # a malignant MLO crop adds a disc this much brighter at its centre


def write_crop_cache(out: Path, crops: np.ndarray, rows: pd.DataFrame) -> Path:
    """Write ``crops`` (n, H, W) and one index row per crop into ``out``; returns ``out``.

    ``rows`` needs the index columns the datasets read: kind, malignant, mass, split, exam_key,
    view, patient_id and lesion_id."""
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    np.save(shards / "shard-00000.images.npy", np.clip(crops, 0, 65535).astype(np.uint16))
    index = rows.reset_index(drop=True).copy()
    index.insert(0, "entry", np.arange(len(index)))
    index["shard"], index["offset"] = 0, np.arange(len(index))
    index.to_parquet(out / "index.parquet")
    (out / "cache.json").write_text(json.dumps({"train_mean": NOISE_MEAN, "train_std": NOISE_STD}))
    return out


def mlo_signal_cache(out: Path, exams: dict[str, int], px: int = 40, seed: int = 0) -> Path:
    """CC+MLO exams, one patient each, half of them malignant. Only the MLO crop says which: a
    malignant MLO crop has a bright disc at its centre, and every CC crop is noise alone. A model
    that reads the MLO view separates the classes; one fed the CC view twice cannot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:px, :px]
    disc = ((yy - px / 2 + 0.5) ** 2 + (xx - px / 2 + 0.5) ** 2 <= (px / 6) ** 2) * DISC_GAIN
    crops, rows = [], []
    for split, count in exams.items():
        for i in range(count):
            malignant = i % 2
            patient = f"P_{split}_{i:03d}"
            for view in ("CC", "MLO"):
                crop = rng.normal(NOISE_MEAN, NOISE_STD, (px, px))
                if view == "MLO" and malignant:
                    crop += disc
                crops.append(crop)
                rows.append(
                    {
                        "kind": "lesion",
                        "malignant": malignant,
                        "mass": 1,
                        "split": split,
                        "exam_key": f"{patient}_LEFT_MASS_1",
                        "view": view,
                        "patient_id": patient,
                        "lesion_id": f"{patient}_LEFT_{view}_MASS_1",
                    }
                )
    return write_crop_cache(out, np.stack(crops), pd.DataFrame(rows))
