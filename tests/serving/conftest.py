"""Fixtures the serving tests share."""

from __future__ import annotations

import pandas as pd
import pytest

from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.dicom import read_dicom
from mammo_ray.train.evaluation import predict_checkpoint


@pytest.fixture(scope="module")
def lesions(lesion_model):
    """Test-split lesions: offline probability (``prob``), image file, and the ROI box in stored pixels,
    as (x0, y0, x1, y1) (``box``) and as the HTTP form's "x0,y0,x1,y1" (``box_text``)."""
    checkpoint, prepared = lesion_model
    dataset = SingleViewDataset(CropCache(prepared.cache_dir), "test", "pathology")
    frame = predict_checkpoint(
        checkpoint, "test", prepared.dataset_dir, cache_dir=prepared.cache_dir, splits_path=prepared.splits
    ).frame
    rows = dataset.frame.assign(prob=frame["prob"].to_numpy())
    masks = pd.read_parquet(prepared.manifest).set_index("lesion_id")["roi_mask_path"]
    rows["box"] = [mask_bbox(read_dicom(masks[lid], flip=False)[0] > 0) for lid in rows["lesion_id"]]
    rows["box_text"] = [",".join(map(str, box)) for box in rows["box"]]
    return rows
