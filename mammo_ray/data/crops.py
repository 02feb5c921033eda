"""Crop geometry for the papers' crop modes: pure numpy, no I/O.

Boxes are ``(x0, y0, x1, y1)`` in full-image pixels, ``x1``/``y1`` exclusive. A box may
reach past the image border: ``crop_padded`` pads with a fill value and never fails.

Modes:
    seed750       a fixed square around the ROI centre (paper 000: 750 x 750 px)
    fixed         the mask's bounding box plus a fixed padding (paper 001: 50 px)
    proportional  the bounding box scaled about its centre (paper 001: 2x)
    patch         fixed squares on lesions ("mass") and on breast tissue away from them
                  ("non-mass") (paper 003: 256 x 256)
    whole         the whole image, letterboxed to a fixed size (for localization)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

CROP_MODES = ("seed750", "fixed", "proportional", "patch", "whole")


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Tight bounding box of the non-zero pixels of ``mask``; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_centre(box: Box) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def centred_box(cx: float, cy: float, width: float, height: float) -> Box:
    """Integer box of the given size centred on (cx, cy)."""
    x0 = int(round(cx - width / 2.0))
    y0 = int(round(cy - height / 2.0))
    return x0, y0, x0 + int(round(width)), y0 + int(round(height))


def squarify(box: Box) -> Box:
    """Widen the short side so the box is square (adds context instead of distorting)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    return centred_box(*box_centre(box), side, side)


def lesion_box(mode: str, bbox: Box, *, seed_px: int = 750, pad_px: int = 50,
               factor: float = 2.0, patch_px: int = 256, square: bool = True) -> Box:
    """The crop box of one lesion for a crop mode, from its ROI bounding box."""
    cx, cy = box_centre(bbox)
    width, height = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if mode == "seed750":
        return centred_box(cx, cy, seed_px, seed_px)
    if mode == "patch":
        return centred_box(cx, cy, patch_px, patch_px)
    if mode == "fixed":
        box = (bbox[0] - pad_px, bbox[1] - pad_px, bbox[2] + pad_px, bbox[3] + pad_px)
    elif mode == "proportional":
        box = centred_box(cx, cy, width * factor, height * factor)
    else:
        raise ValueError(f"crop mode {mode!r} has no lesion box (expected one of {CROP_MODES})")
    return squarify(box) if square else box


def crop_padded(image: np.ndarray, box: Box, fill: float = 0.0) -> np.ndarray:
    """Cut ``box`` out of ``image``; parts outside the image are ``fill``."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {box}")
    out = np.full((y1 - y0, x1 - x0), fill, dtype=image.dtype)
    h, w = image.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def resize(image: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize a 2-D array to (H, W) as float32; antialiased when shrinking."""
    h, w = size
    if image.shape == (h, w):
        return image.astype(np.float32, copy=False)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    # PIL's float mode resamples with a support scaled to the reduction: proper antialiasing.
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize((w, h), resample)
    return np.asarray(out, dtype=np.float32)


def crop_resized(image: np.ndarray, box: Box, px: int) -> np.ndarray:
    """The ``box`` of ``image`` (zero-padded past the border) resized to ``px`` x ``px``: a cache crop."""
    return resize(crop_padded(image, box, fill=0.0), (px, px))


def to_uint16(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Store values as uint16; rescale only data that does not fit (e.g. floats in 0..1).

    Returns the stored array and the scale applied (1.0 for 16-bit data kept as is).
    """
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0.0 and 255.0 < hi <= 65535.0:
        return np.rint(image).astype(np.uint16), 1.0
    scale = 65535.0 / (hi - lo) if hi > lo else 1.0
    return np.rint((image - lo) * scale).astype(np.uint16), scale


def letterbox(image: np.ndarray, size: tuple[int, int], fill: float = 0.0) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit ``image`` inside (H, W) keeping its aspect ratio; pad the rest with ``fill``.

    Returns:
        the letterboxed image, the scale (output px per input px) and the (x, y) offset of
        the image inside the output: ``x_out = x_in * scale + offset_x``.
    """
    h, w = size
    scale = min(h / image.shape[0], w / image.shape[1])
    nh, nw = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    out = np.full((h, w), fill, dtype=np.float32)
    oy, ox = (h - nh) // 2, (w - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = resize(image, (nh, nw))
    return out, scale, (ox, oy)


def breast_region(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Boolean mask of breast tissue: pixels above a small fraction of the image range."""
    lo, hi = float(image.min()), float(image.max())
    return image > lo + fraction * (hi - lo)


def negative_boxes(breast: np.ndarray, lesions: np.ndarray, count: int, side: int,
                   rng: np.random.Generator, max_tries: int = 200) -> list[Box]:
    """Up to ``count`` ``side``-px boxes centred in the breast that touch no lesion pixel.

    Paper 003: patches outside every ROI are "non-mass". Fewer boxes come back when the
    breast has no room; the caller counts the shortfall.
    """
    ys, xs = np.nonzero(breast)
    boxes: list[Box] = []
    if ys.size == 0:
        return boxes
    for _ in range(max_tries):
        if len(boxes) == count:
            break
        i = int(rng.integers(ys.size))
        box = centred_box(xs[i], ys[i], side, side)
        if not crop_padded(lesions, box, fill=0).any():
            boxes.append(box)
    return boxes
