"""Fixtures the localization tests share."""

from __future__ import annotations

import pandas as pd
import pytest

from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.dicom import read_dicom


@pytest.fixture(scope="module")
def mass_image(patch_model):
    """(image path, ground-truth mass box in stored orientation) of the first mass image."""
    manifest = pd.read_parquet(patch_model[1].manifest)
    row = manifest[(manifest["abnormality_type"] == "MASS") & (manifest["roi_mask_path"] != "")].iloc[0]
    mask, _ = read_dicom(row["roi_mask_path"], flip=False)
    return row["image_path"], mask_bbox(mask > 0)
