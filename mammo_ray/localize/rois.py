"""The ground truth of one mammogram for paper 003's evaluation: one ROI per mass lesion, on the map grid.

Films, not files. Image identity is the manifest's ``image_id`` (patient, side, view). CBIS-DDSM
stores 71 films twice, once under a Mass-* and once under a Calc-* folder: two image paths, the
same pixels. A film is scanned once, and a film with any MASS row is a mass image with all its
mass ROIs, whichever copy is read. Its Calc copy never makes it a "no mass" negative.

One ROI per lesion. Each MASS row of the film is one ground-truth ROI (identity: its
``lesion_id``; a lesion listed twice counts once, and the duplicates are counted). Its outline
comes from its own ROI mask. A mask stored at another size with the image's aspect ratio is
resampled (:mod:`mammo_ray.data.masks`). Without a usable mask it comes from the row's box, and
failing that from its seed point (a one-pixel ROI). Every ROI is brought onto the map grid by
itself (:func:`~mammo_ray.localize.findings.roi_to_grid`), so touching lesions stay two ROIs
and an ROI smaller than a cell, or in the border the cells do not reach, still covers one cell.
An ROI that nothing places still counts, as missed, and is reported with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray.constants import AbnormalityType
from mammo_ray.data.quirks import film_ids
from mammo_ray.localize.findings import roi_to_grid

__all__ = ["Film", "film_ids", "group_films", "roi_grids", "roi_mask"]


@dataclass(frozen=True)
class Film:
    """One film (``image_id``) of a split: the files that hold it and its mass lesions."""

    image_id: str
    patient_id: str
    paths: tuple[str, ...]  # files holding this film: resolved rows first, mass rows first
    masses: pd.DataFrame  # its MASS rows, one per lesion_id
    duplicate_mass_rows: int  # MASS rows dropped because their lesion_id was already listed

    @property
    def n_masses(self) -> int:
        return len(self.masses)


def _is_mass(rows: pd.DataFrame) -> pd.Series:
    return rows["abnormality_type"].map(lambda v: AbnormalityType.parse(v) is AbnormalityType.MASS).astype(bool)


def group_films(rows: pd.DataFrame) -> list[Film]:
    """The films of ``rows`` (any abnormality), sorted by image_id; see the module docstring."""
    ids = film_ids(rows)
    mass = _is_mass(rows)
    resolved = rows["resolved"].astype(bool) if "resolved" in rows else pd.Series(True, index=rows.index)
    films = []
    for image_id, group in rows.groupby(ids, sort=True):
        order = group.assign(_unresolved=~resolved[group.index], _not_mass=~mass[group.index])
        order = order.sort_values(["_unresolved", "_not_mass", "image_path"], kind="stable")
        paths = tuple(dict.fromkeys(p for p in order["image_path"].astype(str) if p))
        masses = group[mass[group.index]]
        key = masses["lesion_id"].astype(str) if "lesion_id" in masses else pd.Series(masses.index, masses.index)
        unique = masses[~key.duplicated()]
        films.append(Film(str(image_id), str(group["patient_id"].iloc[0]), paths, unique, len(masses) - len(unique)))
    return films


def _number(row: Any, name: str) -> float | None:
    value = getattr(row, name, None)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return float(value)


def _box_mask(row: Any, shape: tuple[int, int], flipped: bool) -> tuple[np.ndarray | None, str]:
    box = [_number(row, f"bbox_{k}") for k in ("x0", "y0", "x1", "y1")]
    if any(v is None for v in box):
        return None, "no bbox"
    x0, y0, x1, y1 = (int(round(v)) for v in box)  # type: ignore[arg-type]
    if flipped:
        x0, x1 = shape[1] - x1, shape[1] - x0
    mask = np.zeros(shape, dtype=bool)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    if not mask.any():
        return None, f"bbox {tuple(box)} lies outside the {shape[0]}x{shape[1]} image"
    return mask, ""


def _seed_mask(row: Any, shape: tuple[int, int], flipped: bool) -> tuple[np.ndarray | None, str]:
    x, y = _number(row, "seed_x"), _number(row, "seed_y")
    if x is None or y is None:
        return None, "no seed point"
    col, line = int(math.floor(x)), int(math.floor(y))
    col = shape[1] - 1 - col if flipped else col
    if not (0 <= line < shape[0] and 0 <= col < shape[1]):
        return None, f"seed point ({x}, {y}) lies outside the {shape[0]}x{shape[1]} image"
    mask = np.zeros(shape, dtype=bool)
    mask[line, col] = True
    return mask, ""


def _file_mask(row: Any, shape: tuple[int, int], flipped: bool) -> tuple[np.ndarray | None, str, str]:
    """(mask, how, why not): the row's own ROI mask file, resampled when it has the image's aspect ratio."""
    from mammo_ray.data.dicom import DicomReadError, read_dicom
    from mammo_ray.data.masks import mask_fit, mask_fit_reason, resample_mask

    path = str(getattr(row, "roi_mask_path", "") or "")
    if not path:
        return None, "", "no ROI mask file"
    try:
        roi, _ = read_dicom(path, flip=flipped)
    except DicomReadError as exc:
        return None, "", f"ROI mask {exc.path}: {exc.reason}"
    fit = mask_fit(roi.shape, shape)
    if fit == "drop":
        return None, "", f"{path}: {mask_fit_reason(roi.shape, shape)}"
    mask = (resample_mask(roi, shape) if fit == "resample" else roi) > 0
    if not mask.any():
        return None, "", f"ROI mask {path} is empty"
    return mask, "mask" if fit == "same" else "mask_resampled", ""


def roi_mask(row: Any, shape: tuple[int, int], flipped: bool) -> tuple[np.ndarray | None, str, str]:
    """One lesion's full-resolution mask in the image's canonical frame (mirrored when ``flipped``).

    Returns:
        ``(mask, placed_by, reason)``: placed_by is "mask", "mask_resampled", "bbox" or "seed";
        reason says why the mask file was not used ("" when it was). ``(None, "", reason)`` when
        nothing places the lesion.
    """
    mask, how, why = _file_mask(row, shape, flipped)
    if mask is not None:
        return mask, how, ""
    box, why_box = _box_mask(row, shape, flipped)
    if box is not None:
        return box, "bbox", why
    seed, why_seed = _seed_mask(row, shape, flipped)
    if seed is not None:
        return seed, "seed", f"{why}; {why_box}"
    return None, "", f"{why}; {why_box}; {why_seed}"


def roi_grids(
    film: Film,
    shape: tuple[int, int],
    flipped: bool,
    map_shape: tuple[int, int],
    scale: float,
    offset: tuple[float, float],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The film's mass ROIs on the map grid, one layer each, and how each was placed.

    Returns:
        ``(rois, placed)``: rois is ``(film.n_masses, h, w)`` bool, every layer with at least one
        cell except for ROIs nothing places (empty layers: counted as missed by ``froc``); placed
        has one dict per ROI: image_id, lesion_id, placed_by ("mask", "mask_resampled", "bbox",
        "seed", or None when nothing places it) and reason (why its mask file was not used).
    """
    layers, placed = [], []
    for row in film.masses.itertuples(index=False):
        mask, how, reason = roi_mask(row, shape, flipped)
        grid = (
            roi_to_grid(mask, map_shape, scale, offset) if mask is not None else np.zeros(tuple(map_shape), dtype=bool)
        )
        layers.append(grid)
        placed.append(
            {
                "image_id": film.image_id,
                "lesion_id": str(getattr(row, "lesion_id", "")),
                "placed_by": how or None,
                "reason": reason,
            }
        )
    rois = np.stack(layers) if layers else np.zeros((0, *map_shape), dtype=bool)
    return rois, placed
