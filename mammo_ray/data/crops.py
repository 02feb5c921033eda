"""Crop geometry for the papers' crop modes (see docs/papers.md): pure numpy, no I/O.

Boxes are ``(x0, y0, x1, y1)`` in full-image pixels, ``x1``/``y1`` exclusive. A box may
reach past the image border: ``crop_padded`` pads with a fill value and never fails.

Stored values: every crop of one source image is mapped into uint16 by one ``ValueMap``
decided from that whole image (``source_value_map``), never from the crop, so two crops of one
8-bit film keep their relative brightness.

Modes:
    seed750       a fixed square around the ROI centre (paper 000: 750 x 750 px)
    fixed         the mask's bounding box plus a fixed padding (paper 001: 50 px)
    proportional  the bounding box scaled about its centre (paper 001: 2x)
    patch         fixed squares on lesions ("mass") and on breast tissue away from them
                  ("non-mass") (paper 003: 256 x 256)
    whole         the whole image, letterboxed to a fixed size (for localization)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

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


def lesion_box(
    mode: str,
    bbox: Box,
    *,
    seed_px: int = 750,
    pad_px: int = 50,
    factor: float = 2.0,
    patch_px: int = 256,
    square: bool = True,
) -> Box:
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
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
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


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/1 mask resized to (H, W) as uint8 by nearest neighbour: ``resize(mask, size, nearest=True)`` in 8 bits."""
    h, w = size
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask, mode="L").resize((w, h), Image.Resampling.NEAREST))


def crop_resized(image: np.ndarray, box: Box, px: int, fill: float = 0.0) -> np.ndarray:
    """The ``box`` of ``image`` (padded with ``fill`` past the border) resized to ``px`` x ``px``: a cache crop."""
    return resize(crop_padded(image, box, fill=fill), (px, px))


class ValueMap(NamedTuple):
    """How one source image's values become stored uint16: ``stored = (value - offset) * scale``."""

    offset: float
    scale: float


def source_value_map(image: np.ndarray) -> ValueMap:
    """The value map of a whole source image, decided once from its range (never per crop).

    A per-crop stretch would give two crops of one 8-bit image different scales and brighten a
    dark crop: a contrast change the model learns from. So the scale follows the data's depth:
    16-bit data (max above 255, within 0..65535) is kept as is; 8-bit data (max at most 255, or
    integer data at most 1) is multiplied by 257 (255 -> 65535); float data in [0, 1] by 65535.
    Anything else (negative or above 65535) maps the image's own min..max onto 0..65535.
    """
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0.0 and hi <= 65535.0:
        if hi > 255.0:
            return ValueMap(0.0, 1.0)
        if hi > 1.0 or np.array_equal(image, np.rint(image)):
            return ValueMap(0.0, 257.0)
        return ValueMap(0.0, 65535.0)
    return ValueMap(lo, 65535.0 / (hi - lo) if hi > lo else 1.0)


def store_uint16(crop: np.ndarray, value_map: ValueMap) -> np.ndarray:
    """``crop`` in the stored uint16 range of its source image (see ``source_value_map``)."""
    offset, scale = value_map
    values = crop.astype(np.float64)  # the one copy: each step below works in place
    if offset:
        values -= offset
    if scale != 1.0:
        values *= scale
    np.clip(values, 0.0, 65535.0, out=values)
    return np.rint(values, out=values).astype(np.uint16)


def to_uint16(image: np.ndarray, value_map: ValueMap | None = None) -> tuple[np.ndarray, float]:
    """Store values as uint16 with ``value_map`` (default: the map of ``image`` itself, as a source).

    Returns the stored array and the scale applied (1.0 for 16-bit data kept as is).
    """
    value_map = source_value_map(image) if value_map is None else value_map
    return store_uint16(image, value_map), value_map.scale


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
    out[oy : oy + nh, ox : ox + nw] = resize(image, (nh, nw))
    return out, scale, (ox, oy)


def breast_region(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Boolean mask of breast tissue: pixels above a small fraction of the image range."""
    lo, hi = float(image.min()), float(image.max())
    return image > lo + fraction * (hi - lo)


def breast_interior(breast: np.ndarray, min_dist: float) -> np.ndarray:
    """Breast pixels at least ``min_dist`` px (Euclidean) from any non-breast pixel and the image edge.

    When no pixel is that deep, the deepest available ones come back instead (a thin breast still
    gives negatives; the caller counts any shortfall). The image edge is a boundary too: a patch
    centred on it would be half padding. Large images are first measured on blocks of ``s`` px
    (``s <= min_dist / 8``, the exact transform of a whole film takes about a second): a block
    counts as breast only when all of it is, and its centre's distance is lowered by ``s * sqrt(2)``,
    which bounds how far its pixels and the background's lie from their block centres. That
    answer is never outside the true interior; only when it is empty is the exact one computed.
    """
    step = max(1, int(min_dist // 8))
    h, w = breast.shape
    if step > 1:
        padded = np.zeros((-(-h // step) * step, -(-w // step) * step), dtype=bool)
        padded[:h, :w] = breast
        blocks = padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step).all(axis=(1, 3))
        depth = ndimage.distance_transform_edt(np.pad(blocks, 1))[1:-1, 1:-1] * step - step * np.sqrt(2.0)
        deep = blocks & (depth >= min_dist)
        chosen = np.repeat(np.repeat(deep, step, axis=0), step, axis=1)[:h, :w] & breast
        if chosen.any():
            return chosen
    depth = ndimage.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]
    chosen = depth >= min_dist
    if chosen.any() or depth.max() == 0:
        return chosen
    return depth == depth.max()


def negative_boxes(
    breast: np.ndarray, lesions: np.ndarray, count: int, side: int, rng: np.random.Generator, max_tries: int = 200
) -> list[Box]:
    """Up to ``count`` ``side``-px boxes centred in the breast interior that touch no lesion pixel.

    Paper 003: patches outside every ROI are "non-mass". Their centres come from the breast
    interior (``breast_interior``, at least ``side / 4`` from the skin line and the image edge):
    positives sit on masses inside the breast, so negatives on the skin edge or background would
    let a model tell the classes apart by the boundary alone. Fewer boxes come back when the
    breast has no room; the caller counts the shortfall.
    """
    ys, xs = np.nonzero(breast_interior(breast, side / 4.0))
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
