"""Findings from a mass probability map: thresholded, 8-connected blobs as boxes.

Paper 003 (§II.C, §III.C; see docs/papers.md) runs the patch classifier fully convolutionally over a whole
mammogram and reads masses off the resulting probability map. This module turns such a
map into findings (one box per above-threshold blob) and brings ground-truth masks onto
the map's grid for the evaluation in :mod:`mammo_ray.localize.froc`. Pure numpy/scipy.

Coordinates. A map pixel at ``(row i, col j)`` stands for the original-image rectangle::

    x in [j * scale + offset_x, (j + 1) * scale + offset_x)
    y in [i * scale + offset_y, (i + 1) * scale + offset_y)

i.e. ``original = map_px * scale + offset``, where ``offset = (offset_x, offset_y)`` is
where the top-left corner of map pixel (0, 0) lies in the original image. A full-resolution
map is ``scale=1, offset=(0, 0)`` (the defaults); a stride-8 map whose first cell starts
at the image corner is ``scale=8, offset=(0, 0)``. For a map computed at stride ``s`` on a
letterboxed image (:func:`mammo_ray.data.crops.letterbox` gives ``lb_scale`` and
``(lb_ox, lb_oy)`` with ``x_lb = x * lb_scale + lb_ox``)::

    scale = s / lb_scale,  offset = (-lb_ox / lb_scale, -lb_oy / lb_scale)

Boxes follow :data:`mammo_ray.data.crops.Box`: ``(x0, y0, x1, y1)`` with ``x1``/``y1``
exclusive, in original pixels; fractional edges are widened outwards to whole pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from mammo_ray.data.crops import Box, mask_bbox

__all__ = ["Finding", "check_map", "find_boxes", "label_components", "mask_to_grid", "roi_to_grid"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Finding:
    """One above-threshold blob of a probability map, in original image pixels."""

    x0: int  # left edge (inclusive)
    y0: int  # top edge (inclusive)
    x1: int  # right edge (exclusive)
    y1: int  # bottom edge (exclusive)
    score: float  # maximum map value inside the blob
    area: float  # blob size in original pixels: map pixels * scale ** 2 (not the box area)

    @property
    def box(self) -> Box:
        return self.x0, self.y0, self.x1, self.y1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of plain ints and floats."""
        return asdict(self)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean image: ``(labels, count)``, labels 1..count."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    return labels, int(count)


def check_map(prob_map: Any, name: str = "prob_map") -> np.ndarray:
    """``prob_map`` as a finite 2-D float64 array; ValueError naming ``name`` otherwise."""
    array = np.asarray(prob_map, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D (h, w) map, got shape {array.shape}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"{name}: {bad} of {array.size} values are NaN or infinite")
    return array


def _check_geometry(scale: float, offset: tuple[float, float]) -> tuple[float, float, float]:
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number of original pixels per map pixel, got {scale}")
    if len(offset) != 2 or not all(math.isfinite(float(v)) for v in offset):
        raise ValueError(f"offset must be a finite (x, y) pair in original pixels, got {offset!r}")
    return scale, float(offset[0]), float(offset[1])


def find_boxes(
    prob_map: Any,
    threshold: float,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area: int = 1,
    max_boxes: int | None = None,
) -> list[Finding]:
    """One box per 8-connected blob of ``prob_map >= threshold`` (paper 003, §III.C).

    Args:
        prob_map: (h, w) map of mass probabilities (or any score; nothing assumes [0, 1]).
        threshold: a map pixel belongs to a blob when its value is ``>= threshold``.
        scale: original pixels per map pixel (the map's stride; 1 for a full-resolution map).
        offset: ``(x, y)`` of map pixel (0, 0)'s top-left corner in original pixels; see the
            module docstring for ``original = map_px * scale + offset``.
        min_area: blobs with fewer than this many *map* pixels are dropped (1 keeps all).
        max_boxes: keep only the highest-scoring ones; None keeps all.

    Returns:
        Findings sorted by score, highest first (ties: top-most, then left-most). Boxes
        are not clipped to the image: with a negative offset they may start below 0.

    Raises:
        ValueError: for a map that is not finite and 2-D, or an invalid argument.
    """
    array = check_map(prob_map)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    scale, ox, oy = _check_geometry(scale, offset)
    if int(min_area) < 0:
        raise ValueError(f"min_area must be >= 0 map pixels, got {min_area}")
    if max_boxes is not None and int(max_boxes) < 0:
        raise ValueError(f"max_boxes must be >= 0 or None, got {max_boxes}")

    labels, count = label_components(array >= threshold)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(array), labels, index)
    peaks = ndimage.maximum(array, labels, index)
    findings = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        if sizes[k] < min_area:
            continue
        findings.append(
            Finding(
                x0=math.floor(cols.start * scale + ox),
                y0=math.floor(rows.start * scale + oy),
                x1=math.ceil(cols.stop * scale + ox),
                y1=math.ceil(rows.stop * scale + oy),
                score=float(peaks[k]),
                area=float(sizes[k]) * scale * scale,
            )
        )
    findings.sort(key=lambda f: (-f.score, f.y0, f.x0))
    return findings if max_boxes is None else findings[: int(max_boxes)]


def mask_to_grid(
    mask: Any,
    map_shape: tuple[int, int],
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    *,
    min_fraction: float | None = None,
) -> np.ndarray:
    """A full-resolution ground-truth mask brought down onto a probability map's grid.

    Map cell ``(i, j)`` covers the original rectangle given in the module docstring; the
    original pixels it touches (partly or wholly) are rows ``floor(i*scale + offset_y)`` to
    ``ceil((i+1)*scale + offset_y) - 1``, likewise for columns, clipped to the mask.

    Args:
        mask: (H, W) full-resolution mask; non-zero is lesion.
        map_shape: ``(h, w)`` of the map.
        scale, offset: the map's geometry, as for :func:`find_boxes`.
        min_fraction: None: a cell is lesion when *any* pixel it touches is lesion (small
            masses survive coarse grids). A number in (0, 1]: when at least that fraction
            of the in-image pixels it touches is lesion (e.g. 0.5 for a majority vote).

    Returns:
        (h, w) bool array; cells wholly outside the mask image are False.
    """
    full = np.asarray(mask)
    if full.ndim != 2:
        raise ValueError(f"mask: expected a 2-D (H, W) mask, got shape {full.shape}")
    if len(map_shape) != 2 or min(map_shape) < 1:
        raise ValueError(f"map_shape: expected a positive (h, w), got {tuple(map_shape)}")
    if min_fraction is not None and not 0 < float(min_fraction) <= 1:
        raise ValueError(f"min_fraction must be in (0, 1] or None, got {min_fraction}")
    scale, ox, oy = _check_geometry(scale, offset)
    h, w = int(map_shape[0]), int(map_shape[1])
    counts, pixels = _cell_counts(full != 0, np.arange(h), np.arange(w), scale, (ox, oy), (0, 0))
    if min_fraction is None:
        return counts > 0
    return (pixels > 0) & (counts >= float(min_fraction) * pixels)


def roi_to_grid(
    mask: Any, map_shape: tuple[int, int], scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """One ground-truth ROI on a map grid, never lost on the way (paper 003's FROC denominator).

    The ROI covers every cell it touches (any-pooling, as :func:`mask_to_grid` with
    ``min_fraction=None``). An ROI that touches no cell, because it lies in the image margin the
    map's cells do not reach (a dense map's first cell is centred on its first window, half a
    window in from the border), gets the one cell nearest to its centre instead: it stays in the
    evaluation as an ROI the map can find or miss, instead of silently leaving the denominator.
    Only the ROI's bounding box is read, so this stays cheap on full-size mammograms.

    Args:
        mask: (H, W) full-resolution mask of one ROI; non-zero is lesion.
        map_shape, scale, offset: the map's grid and geometry, as for :func:`mask_to_grid`.

    Returns:
        (h, w) bool array with at least one True cell, or all False when ``mask`` is empty
        (an ROI with no pixel has no place on any grid; the caller reports it).
    """
    full = np.asarray(mask)
    if full.ndim != 2:
        raise ValueError(f"mask: expected a 2-D (H, W) mask of one ROI, got shape {full.shape}")
    if len(map_shape) != 2 or min(map_shape) < 1:
        raise ValueError(f"map_shape: expected a positive (h, w), got {tuple(map_shape)}")
    scale, ox, oy = _check_geometry(scale, offset)
    h, w = int(map_shape[0]), int(map_shape[1])
    grid = np.zeros((h, w), dtype=bool)
    lesion = full != 0
    box = mask_bbox(lesion)
    if box is None:
        return grid
    bx0, by0, bx1, by1 = box
    # Cells that can touch the box, one cell of margin each side (the exact test is the count).
    j0, j1 = max(0, math.floor((bx0 - ox) / scale) - 1), min(w, math.ceil((bx1 - ox) / scale) + 1)
    i0, i1 = max(0, math.floor((by0 - oy) / scale) - 1), min(h, math.ceil((by1 - oy) / scale) + 1)
    if i1 > i0 and j1 > j0:
        counts, _ = _cell_counts(
            lesion[by0:by1, bx0:bx1], np.arange(i0, i1), np.arange(j0, j1), scale, (ox, oy), (bx0, by0)
        )
        grid[i0:i1, j0:j1] = counts > 0
    if not grid.any():  # in the margin outside every cell: the cell nearest to its centre
        rows, cols = np.nonzero(lesion)
        i = min(h - 1, max(0, math.floor((float(rows.mean()) + 0.5 - oy) / scale)))
        j = min(w - 1, max(0, math.floor((float(cols.mean()) + 0.5 - ox) / scale)))
        grid[i, j] = True
    return grid


def _cell_counts(
    lesion: np.ndarray,
    cell_rows: np.ndarray,
    cell_cols: np.ndarray,
    scale: float,
    offset: tuple[float, float],
    origin: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion pixels and in-image pixels touched by each listed cell, for a mask cut out at ``origin``.

    ``lesion`` is the (x, y) = ``origin`` corner of the full mask onwards; the cells are numbered
    on the full grid, so a cut-out holding every lesion pixel counts exactly as the full mask does.
    """
    height, width = lesion.shape

    def edges(cells: np.ndarray, start: float, first: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.floor(cells * scale + start).astype(np.int64) - first
        hi = np.ceil((cells + 1) * scale + start).astype(np.int64) - first
        return np.clip(lo, 0, limit), np.clip(hi, 0, limit)

    y0, y1 = edges(cell_rows, offset[1], origin[1], height)
    x0, x1 = edges(cell_cols, offset[0], origin[0], width)
    # Summed-area table: any cell's lesion pixel count in four lookups, whatever the scale.
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(lesion, axis=0), axis=1)
    counts = (
        table[y1[:, None], x1[None, :]]
        - table[y0[:, None], x1[None, :]]
        - table[y1[:, None], x0[None, :]]
        + table[y0[:, None], x0[None, :]]
    )
    return counts, (y1 - y0)[:, None] * (x1 - x0)[None, :]
