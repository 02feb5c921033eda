"""One cache shard: decode each film once and cut all of its crops.

Runs in a worker process of ``prepare_cache``; everything it takes and returns is plain
data. Output files go to temporary names first and the shard's entry table is renamed
into place last, so a shard either exists whole or not at all.

A film is one ``image_id`` (patient, side, view). CBIS-DDSM stores some films twice, under a
Mass and a Calc folder: all rows of a film travel together, the film is decoded once from its
first image path, and the masks of all its rows (of every abnormality type) form the lesion
map that keeps non-mass patches off every lesion. Each lesion entry stores its own ROI mask,
cropped like its image; negatives store the lesion map (empty by construction); ``whole``
entries store the union of the kept rows' masks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray.data.crops import (
    ValueMap,
    breast_region,
    crop_padded,
    crop_resized,
    lesion_box,
    letterbox,
    mask_bbox,
    negative_boxes,
    resize_mask,
    source_value_map,
    store_uint16,
)
from mammo_ray.data.dicom import DicomMeta, DicomReadError, read_dicom, read_dicom_header, read_dicom_mask
from mammo_ray.data.masks import mask_fit, mask_fit_reason, resample_mask

# What the stored crops mean; raised whenever that changes. 2: films by image_id, a lesion's own
# mask, per-film value scale, negatives from the breast interior, laterality-first orientation.
CACHE_FORMAT = 2

# The data-config fields that decide a cache's contents (its fingerprint).
CROP_FIELDS = (
    "crop",
    "seed_crop_px",
    "fixed_pad_px",
    "proportional_factor",
    "square_boxes",
    "patch_px",
    "negatives_per_image",
    "whole_size",
    "cache_px",
    "max_dim",
    "seed",
)

ENTRY_COLUMNS = [
    "shard",
    "offset",
    "kind",
    "lesion_id",
    "exam_key",
    "patient_id",
    "side",
    "view",
    "abnormality_type",
    "malignant",
    "mass",
    "split",
    "image_path",
    "flipped",
    "image_h",
    "image_w",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "scale",
    "offset_x",
    "offset_y",
    "value_scale",
    "value_offset",
    "image_id",
    "mask_resampled",
]

# The entry table's column types, as a reader of its parquet file sees them: a shard's table is
# cast to these where it is made, so new and reused shards concatenate alike without a read-back.
_TEXT_COLUMNS = ("kind", "lesion_id", "exam_key", "patient_id", "side", "view", "abnormality_type", "split")
ENTRY_DTYPES = dict.fromkeys(ENTRY_COLUMNS, "int64") | dict.fromkeys(_TEXT_COLUMNS, "str")
ENTRY_DTYPES |= dict.fromkeys(("image_path", "image_id"), "str")
ENTRY_DTYPES |= dict.fromkeys(("flipped", "mask_resampled"), "bool")
ENTRY_DTYPES |= dict.fromkeys(("scale", "value_scale", "value_offset"), "float64")


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``ENTRY_DTYPES``; only the columns of another type are cast (a cast costs about 0.5 ms)."""
    wrong = {name: dtype for name, dtype in ENTRY_DTYPES.items() if table[name].dtype != dtype}
    return table.astype(wrong) if wrong else table


# Per-shard counts (``shard-*.stats.json``), summed into the prepare report.
STAT_KEYS = ("resampled_masks", "orientation_from_content", "orientation_disagreements")


def _skip(lesion_id: str, path: str, reason: str) -> dict[str, str]:
    return {"lesion_id": lesion_id, "path": path, "reason": reason}


def _row_box(
    row: dict[str, Any], mask: np.ndarray | None, width: int, flipped: bool
) -> tuple[int, int, int, int] | None:
    """The ROI box in canonical (possibly mirrored) coordinates: from the mask, else the manifest."""
    if mask is not None and (box := mask_bbox(mask)) is not None:
        return box
    values = [row.get(k) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if len(finite) == 4:
        x0, y0, x1, y1 = (int(round(v)) for v in finite)
    elif all(row.get(k) is not None and np.isfinite(row[k]) for k in ("seed_x", "seed_y")):
        x0, y0 = int(round(row["seed_x"])), int(round(row["seed_y"]))
        x1, y1 = x0 + 1, y0 + 1  # a seed point is a one-pixel box: enough for seed750 and patch
    else:
        return None
    return (width - x1, y0, width - x0, y1) if flipped else (x0, y0, x1, y1)


def _entry(row: dict[str, Any], kind: str, box, flipped: bool, shape, value_map: ValueMap, **extra) -> dict[str, Any]:
    is_calc = str(row["abnormality_type"]).upper().startswith("CALC")
    entry = {
        "kind": kind,
        "lesion_id": row["lesion_id"],
        "exam_key": row["exam_key"],
        "patient_id": row["patient_id"],
        "side": row["side"],
        "view": row["view"],
        "abnormality_type": row["abnormality_type"],
        "malignant": int(row["label"]),
        "mass": int(not is_calc),
        "split": row["split"],
        "image_path": row["image_path"],
        "flipped": bool(flipped),
        "image_h": int(shape[0]),
        "image_w": int(shape[1]),
        "box_x0": box[0],
        "box_y0": box[1],
        "box_x1": box[2],
        "box_y1": box[3],
        "scale": 1.0,
        "offset_x": 0,
        "offset_y": 0,
        "value_scale": float(value_map.scale),
        "value_offset": float(value_map.offset),
        "image_id": row["image_id"],
        "mask_resampled": bool(row.get("mask_resampled_here", False)),
    }
    entry.update(extra)
    return entry


def _cut(image: np.ndarray, mask: np.ndarray, box, px: int, value_map: ValueMap) -> tuple[np.ndarray, np.ndarray]:
    """The stored crop of ``box`` and ``mask`` cut the same way (padding maps to stored 0)."""
    crop = store_uint16(crop_resized(image, box, px, fill=value_map.offset), value_map)
    return crop, resize_mask(crop_padded(mask, box, fill=0), (px, px))


def _same_film(
    item: dict[str, Any], meta: DicomMeta, p: dict[str, Any], skipped: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """The film's rows whose own image file is a copy of the decoded one (same Rows x Columns).

    Copies are trusted to hold the same pixels (CBIS-DDSM's Mass/Calc duplicates do) and are not
    decoded; a copy of other dimensions is another image under the same ``image_id``: its rows
    are left out and reported rather than cropped from the wrong pixels.
    """
    rows, reasons = [], {}
    for row in item["rows"]:
        path = row["image_path"]
        if path != item["image_path"] and path not in reasons:
            try:
                other = read_dicom_header(path, max_rows=p["max_dim"], max_cols=p["max_dim"])
                reasons[path] = (
                    ""
                    if (other.rows, other.columns) == (meta.rows, meta.columns)
                    else (
                        f"film {item['image_id']} is decoded from {item['image_path']} ({meta.rows}x{meta.columns}), "
                        f"but this copy is {other.rows}x{other.columns}: another image under the same image_id"
                    )
                )
            except DicomReadError as exc:
                reasons[path] = exc.reason
        if reasons.get(path):
            if row["keep"]:
                skipped.append(_skip(row["lesion_id"], path, reasons[path]))
            continue
        rows.append(row)
    return rows


def _read_mask(
    row: dict[str, Any],
    shape: tuple[int, int],
    meta: DicomMeta,
    p: dict[str, Any],
    skipped: list[dict[str, str]],
    stats: dict[str, int],
) -> np.ndarray | None:
    """The row's ROI mask on the film's pixel grid, or None (no mask, unreadable, or unplaceable)."""
    if not row["roi_mask_path"]:
        return None
    try:  # the mask follows its film's mirror decision
        mask, _ = read_dicom_mask(row["roi_mask_path"], flip=meta.flipped, max_rows=p["max_dim"], max_cols=p["max_dim"])
    except DicomReadError as exc:
        skipped.append(_skip(row["lesion_id"], exc.path, exc.reason))
        row["keep"] = False
        return None
    fit = mask_fit(mask.shape, shape)
    if fit == "drop":
        skipped.append(_skip(row["lesion_id"], row["roi_mask_path"], mask_fit_reason(mask.shape, shape)))
        row["keep"] = False
        return None
    if fit == "resample":
        mask = resample_mask(mask, shape)
        stats["resampled_masks"] += 1
        row["mask_resampled_here"] = True
    return mask


def _own_mask(mask: np.ndarray | None, box, shape: tuple[int, int]) -> np.ndarray:
    """A row's lesion pixels: its mask, else its manifest box (or seed pixel) filled in."""
    if mask is not None and mask.any():
        return mask
    own = np.zeros(shape, dtype=bool)
    own[max(box[1], 0) : max(box[3], 0), max(box[0], 0) : max(box[2], 0)] = True
    return own


def _union(rows: list[dict[str, Any]], masks: dict, boxes: dict, shape: tuple[int, int]) -> np.ndarray:
    union = np.zeros(shape, dtype=bool)
    for row in rows:
        if boxes[row["lesion_id"]] is not None:
            union |= _own_mask(masks[row["lesion_id"]], boxes[row["lesion_id"]], shape)
    return union


def _negatives(item, image, rows, boxes, lesions, kept, meta, p, value_map, rng, skipped) -> list[tuple]:
    """Paper 003's non-mass patches of one film, or none when a lesion of it cannot be placed."""
    wanted = p["negatives_per_image"]
    unplaced = [r["lesion_id"] for r in rows if boxes[r["lesion_id"]] is None]
    if unplaced and wanted:
        skipped.append(
            _skip(
                "",
                item["image_path"],
                f"no non-mass patches from film {item['image_id']}: "
                f"lesion(s) {unplaced} have no usable mask, bbox or seed point to keep them off",
            )
        )
        return []
    negs = negative_boxes(breast_region(image), lesions, wanted, p["patch_px"], rng)
    if len(negs) < wanted:
        skipped.append(_skip("", item["image_path"], f"room for only {len(negs)} of {wanted} non-mass patches"))
    out, head = [], kept[0]
    for k, box in enumerate(negs):
        crop, cmask = _cut(image, lesions, box, p["cache_px"], value_map)
        neg = dict(
            head,
            lesion_id=f"{head['patient_id']}_{head['side']}_{head['view']}_neg{k}",
            exam_key="",
            label=-1,
            mask_resampled_here=False,
        )
        out.append((crop, cmask, _entry(neg, "negative", box, meta.flipped, image.shape, value_map, mass=0)))
    return out


def _process_image(
    item: dict[str, Any],
    p: dict[str, Any],
    rng: np.random.Generator,
    skipped: list[dict[str, str]],
    stats: dict[str, int],
) -> tuple[list[tuple], int]:
    """All crops of one film as (stored crop, mask, entry) triples, and the number of decodes (1)."""
    image, meta = read_dicom(item["image_path"], max_rows=p["max_dim"], max_cols=p["max_dim"])
    stats["orientation_from_content"] += int(meta.orientation_source == "content")
    stats["orientation_disagreements"] += int(meta.content_disagrees)
    value_map = source_value_map(image)  # once per film: every crop of it shares one scale
    rows = _same_film(item, meta, p, skipped)
    masks = {r["lesion_id"]: _read_mask(r, image.shape, meta, p, skipped, stats) for r in rows}
    boxes = {r["lesion_id"]: _row_box(r, masks[r["lesion_id"]], image.shape[1], meta.flipped) for r in rows}
    kept = [r for r in rows if r["keep"]]
    out: list[tuple] = []  # (stored crop, mask, entry)
    if p["crop"] == "whole":
        if not kept:
            return out, 1
        canvas, scale, (ox, oy) = letterbox(image, tuple(p["whole_size"]), fill=value_map.offset)
        lmask, _, _ = letterbox(_union(kept, masks, boxes, image.shape).astype(np.float32), tuple(p["whole_size"]))
        head = dict(
            kept[0],
            lesion_id=f"{kept[0]['patient_id']}_{kept[0]['side']}_{kept[0]['view']}_whole",
            label=max(int(r["label"]) for r in kept),
            mask_resampled_here=any(r.get("mask_resampled_here", False) for r in kept),
        )
        full = (0, 0, image.shape[1], image.shape[0])
        out.append(
            (
                store_uint16(canvas, value_map),
                (lmask > 0.5).astype(np.uint8),
                _entry(
                    head, "whole", full, meta.flipped, image.shape, value_map, scale=scale, offset_x=ox, offset_y=oy
                ),
            )
        )
        return out, 1
    for row in kept:
        box = boxes[row["lesion_id"]]
        if box is None:
            skipped.append(
                _skip(
                    row["lesion_id"], row["image_path"], "no ROI: mask empty and no bbox or seed point in the manifest"
                )
            )
            continue
        crop_box = lesion_box(
            p["crop"],
            box,
            seed_px=p["seed_crop_px"],
            pad_px=p["fixed_pad_px"],
            factor=p["proportional_factor"],
            patch_px=p["patch_px"],
            square=p["square_boxes"],
        )
        own = _own_mask(masks[row["lesion_id"]], box, image.shape)  # this lesion only, not its neighbours
        crop, cmask = _cut(image, own, crop_box, p["cache_px"], value_map)
        out.append((crop, cmask, _entry(row, "lesion", crop_box, meta.flipped, image.shape, value_map)))
    if p["crop"] == "patch" and kept:
        lesions = _union(rows, masks, boxes, image.shape)  # every lesion of the film, of any type
        out += _negatives(item, image, rows, boxes, lesions, kept, meta, p, value_map, rng, skipped)
    return out, 1


@dataclass
class ShardResult:
    """What the parent needs of one shard: its entries, reports and training-crop sums.

    A shard written by this run returns it from its worker; a shard an earlier run wrote is
    read back from its files (``read_shard``). Both give the same values.
    """

    decoded: int  # films decoded (0 when read back)
    table: pd.DataFrame  # the shard's entries, ``ENTRY_COLUMNS``
    skipped: list[dict[str, str]]
    stats: dict[str, int]
    train: TrainSums


@dataclass
class TrainSums:
    """Per-pixel sum, sum of squares and count of a shard's training crops, in float64.

    The parent adds the shards' sums in shard order, so the mean image and the global mean and
    std are the same whether a shard was written now or reused, and whatever the worker count.
    """

    total: np.ndarray | None  # (H, W) float64; None without training crops
    squares: float
    count: int

    @classmethod
    def of(cls, images: np.ndarray, table: pd.DataFrame) -> TrainSums:
        offsets = table.loc[table["split"] == "train", "offset"].to_numpy()
        if not len(offsets):
            return cls(None, 0.0, 0)
        block = images[offsets].astype(np.float64)
        total = block.sum(axis=0)
        # Squared in place: no second copy. Not a BLAS dot, whose threads would spin beside the other workers.
        return cls(total, float(np.square(block, out=block).sum()), int(block.shape[0]))


def read_shard(cache_dir: str | Path, shard: int) -> ShardResult:
    """The ``ShardResult`` of a shard already on disk."""
    folder = Path(cache_dir) / "shards"
    stem = f"shard-{shard:05d}"
    table = _typed(pd.read_parquet(folder / f"{stem}.parquet"))
    images = np.load(folder / f"{stem}.images.npy", mmap_mode="r")
    return ShardResult(
        decoded=0,
        table=table,
        skipped=json.loads((folder / f"{stem}.skipped.json").read_text()),
        stats={key: int(value) for key, value in json.loads((folder / f"{stem}.stats.json").read_text()).items()},
        train=TrainSums.of(images, table),
    )


def process_shard(
    shard: int, images: list[dict[str, Any]], params: dict[str, Any], cache_dir: str, seed: int
) -> ShardResult:
    """Write shard ``shard`` of the cache; return its entries, reports and training sums."""
    folder = Path(cache_dir) / "shards"
    # One generator per shard, seeded by (seed, shard): a resumed run draws the same patches.
    rng = np.random.default_rng([seed, shard])
    crops: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    stats = dict.fromkeys(STAT_KEYS, 0)
    decoded = 0
    for item in images:
        try:
            produced, n = _process_image(item, params, rng, skipped, stats)
        except DicomReadError as exc:
            skipped.extend(_skip(r["lesion_id"], exc.path, exc.reason) for r in item["rows"] if r["keep"])
            continue
        decoded += n
        for crop, mask, entry in produced:
            crops.append(crop)
            masks.append(mask)
            entries.append(entry)
    stem = f"shard-{shard:05d}"
    shape = tuple(params["whole_size"]) if params["crop"] == "whole" else (params["cache_px"],) * 2
    arrays = {
        "images": np.stack(crops) if crops else np.zeros((0, *shape), np.uint16),
        "masks": np.stack(masks) if masks else np.zeros((0, *shape), np.uint8),
    }
    for name, array in arrays.items():
        tmp = folder / f"{stem}.{name}.tmp{os.getpid()}.npy"
        np.save(tmp, array)
        tmp.replace(folder / f"{stem}.{name}.npy")
    for offset, entry in enumerate(entries):
        entry.update(shard=shard, offset=offset)
    for name, payload in (("skipped", skipped), ("stats", stats)):
        tmp = folder / f"{stem}.{name}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(payload))
        tmp.replace(folder / f"{stem}.{name}.json")
    table = _typed(pd.DataFrame(entries, columns=ENTRY_COLUMNS))
    tmp = folder / f"{stem}.parquet.tmp{os.getpid()}"
    table.to_parquet(tmp, index=False)
    tmp.replace(folder / f"{stem}.parquet")  # last: marks the shard complete
    return ShardResult(decoded, table, skipped, stats, TrainSums.of(arrays["images"], table))
