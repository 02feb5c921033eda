"""ROI masks stored at another size than their image: resample or report.

Real CBIS-DDSM has ROI masks whose Rows x Columns differ from their full mammogram. A mask
with the image's aspect ratio (within ``ASPECT_TOLERANCE``) is the same outline at another
scale: it is resampled to the image with nearest-neighbour lookup, so it stays binary. A mask
of another aspect ratio cannot be placed without guessing (cropped? padded?): it is dropped,
and every caller counts and reports it, never silently.

The index (``cbis_ddsm``) and the cache (``shard_worker``) both decide with ``mask_fit``, so a
row the index marks ``mask_resampled`` is resampled by ``prepare`` and one marked
``mask_dropped`` is skipped there with the same reason.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ASPECT_TOLERANCE = 0.02  # relative difference of H/W ratios still taken as "the same outline"

MaskFit = Literal["same", "resample", "drop"]


def mask_fit(mask_shape: tuple[int, int], image_shape: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> MaskFit:
    """How a mask of ``mask_shape`` (H, W) maps onto an image of ``image_shape``."""
    mh, mw = (int(v) for v in mask_shape)
    ih, iw = (int(v) for v in image_shape)
    if (mh, mw) == (ih, iw):
        return "same"
    if min(mh, mw, ih, iw) <= 0:
        return "drop"
    ratio = (mh / mw) / (ih / iw)
    return "resample" if abs(ratio - 1.0) <= tolerance else "drop"


def mask_fit_reason(mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> str:
    """The sentence the index and the cache report for a dropped mask."""
    return (
        f"ROI mask {mask_shape[0]}x{mask_shape[1]} has another aspect ratio than its image "
        f"{image_shape[0]}x{image_shape[1]}: cannot be placed, dropped"
    )


def resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample of a 2-D mask to ``shape`` (H, W); dtype and values kept.

    Each output pixel takes the mask pixel whose centre is nearest to its own centre, so a
    binary mask stays binary and a mask resampled to its own shape is unchanged.
    """
    h, w = (int(v) for v in shape)
    mh, mw = mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return mask[rows[:, None], cols[None, :]]


def scale_box(
    box: tuple[int, int, int, int], mask_shape: tuple[int, int], image_shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1; x1, y1 exclusive) in mask pixels, in image pixels (outward-rounded)."""
    sy, sx = image_shape[0] / mask_shape[0], image_shape[1] / mask_shape[1]
    x0, y0, x1, y1 = box
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        min(int(np.ceil(x1 * sx)), int(image_shape[1])),
        min(int(np.ceil(y1 * sy)), int(image_shape[0])),
    )
