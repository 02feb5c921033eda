"""One lesion crop from one image, exactly as the crop cache makes it (for serving and the CLI).

The cache crops each lesion with its config's crop mode around the ROI box
(``crops.lesion_box``), resizes it to ``cache_px`` (``crops.crop_resized``) and stores it as
uint16 with the value map of the whole source image (``crops.source_value_map``: decided once
per image, never per crop); the model's eval transform then does the rest. ``roi_crop``
repeats those steps for an image that arrives later (an upload, a file on the command line),
so a served prediction equals the offline evaluation of the same lesion.

Without an ROI the image is taken whole (``default="whole"``: a lesion crop such as
CBIS-DDSM's cropped images) or as its centred square (``default="center"``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mammo_ray.config import DataConfig
from mammo_ray.data.crops import Box, centred_box, crop_resized, lesion_box, letterbox, source_value_map, store_uint16

RoiDefault = Literal["whole", "center"]


def mirror_box(box: Box, width: int) -> Box:
    """A box in a left-right mirrored image of ``width`` columns."""
    return width - box[2], box[1], width - box[0], box[3]


def roi_box(
    cfg: DataConfig,
    shape: tuple[int, int],
    *,
    box: Box | None = None,
    seed: tuple[float, float] | None = None,
    flipped: bool = False,
    default: RoiDefault = "whole",
) -> Box:
    """The crop box, in the canonical (``read_dicom``, possibly mirrored) frame.

    Args:
        cfg: the model's data config (crop mode and its sizes).
        shape: (H, W) of the canonical image.
        box: the ROI (x0, y0, x1, y1) in the stored image's pixels, as a user or a manifest gives it.
        seed: a seed point (x, y) in the stored image's pixels; a one-pixel ROI, as the data pipeline
            treats manifest seed points.
        flipped: the canonical image is mirrored (``meta.flipped``): ``box`` and ``seed`` are mirrored too.
        default: without ``box`` or ``seed``, the whole image or its centred square.
    """
    h, w = shape
    if box is None and seed is not None:
        x, y = int(round(seed[0])), int(round(seed[1]))
        box = (x, y, x + 1, y + 1)
    if box is None:
        if default == "center":
            side = min(h, w)
            return centred_box(w / 2, h / 2, side, side)
        return 0, 0, w, h
    if flipped:
        box = mirror_box(box, w)
    mode = cfg.crop if cfg.crop != "whole" else "proportional"
    return lesion_box(
        mode,
        box,
        seed_px=cfg.seed_crop_px,
        pad_px=cfg.fixed_pad_px,
        factor=cfg.proportional_factor,
        patch_px=cfg.patch_px,
        square=cfg.square_boxes,
    )


def roi_crop(
    image: np.ndarray,
    cfg: DataConfig,
    *,
    box: Box | None = None,
    seed: tuple[float, float] | None = None,
    flipped: bool = False,
    default: RoiDefault = "whole",
) -> np.ndarray:
    """The stored-crop equivalent (uint16, ``cache_px`` square) of one ROI of a canonical image.

    Models of ``data.crop=whole`` see the whole image letterboxed to ``whole_size``, ROI or not.
    Values are stored with the whole image's value map, and padding past the border is the
    value that maps to 0, exactly as ``prepare`` does.
    """
    value_map = source_value_map(image)
    if cfg.crop == "whole":
        canvas, _, _ = letterbox(image, cfg.whole_size, fill=value_map.offset)
        return store_uint16(canvas, value_map)
    crop_box = roi_box(cfg, image.shape, box=box, seed=seed, flipped=flipped, default=default)
    return store_uint16(crop_resized(image, crop_box, cfg.cache_px, fill=value_map.offset), value_map)
