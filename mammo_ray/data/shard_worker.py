"""One cache shard: decode each source image once and cut all of its crops.

Runs in a worker process of ``prepare_cache``; everything it takes and returns is plain
data. Output files go to temporary names first and the shard's entry table is renamed
into place last, so a shard either exists whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray.data.crops import (breast_region, crop_padded, crop_resized, lesion_box, letterbox, mask_bbox,
                                  negative_boxes, resize, to_uint16)
from mammo_ray.data.dicom import DicomReadError, read_dicom

# The data-config fields that decide a cache's contents (its fingerprint).
CROP_FIELDS = ("crop", "seed_crop_px", "fixed_pad_px", "proportional_factor", "square_boxes", "patch_px",
               "negatives_per_image", "whole_size", "cache_px", "max_dim", "seed")

ENTRY_COLUMNS = ["shard", "offset", "kind", "lesion_id", "exam_key", "patient_id", "side", "view",
                 "abnormality_type", "malignant", "mass", "split", "image_path", "flipped",
                 "image_h", "image_w", "box_x0", "box_y0", "box_x1", "box_y1", "scale",
                 "offset_x", "offset_y", "value_scale"]


def _row_box(row: dict[str, Any], mask: np.ndarray | None, width: int, flipped: bool) -> tuple[int, int, int, int] | None:
    """The ROI box in canonical (possibly mirrored) coordinates: from the mask, else the manifest."""
    if mask is not None:
        return mask_bbox(mask)
    box = [row.get(k) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
    if all(v is not None and np.isfinite(v) for v in box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
    elif all(row.get(k) is not None and np.isfinite(row[k]) for k in ("seed_x", "seed_y")):
        x0, y0 = int(round(row["seed_x"])), int(round(row["seed_y"]))
        x1, y1 = x0 + 1, y0 + 1  # a seed point is a one-pixel box: enough for seed750 and patch
    else:
        return None
    return (width - x1, y0, width - x0, y1) if flipped else (x0, y0, x1, y1)


def _entry(row: dict[str, Any], kind: str, box, flipped: bool, shape, **extra) -> dict[str, Any]:
    is_calc = str(row["abnormality_type"]).upper().startswith("CALC")
    entry = {
        "kind": kind, "lesion_id": row["lesion_id"], "exam_key": row["exam_key"],
        "patient_id": row["patient_id"], "side": row["side"], "view": row["view"],
        "abnormality_type": row["abnormality_type"], "malignant": int(row["label"]),
        "mass": int(not is_calc), "split": row["split"], "image_path": row["image_path"],
        "flipped": bool(flipped), "image_h": int(shape[0]), "image_w": int(shape[1]),
        "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3],
        "scale": 1.0, "offset_x": 0, "offset_y": 0,
    }
    entry.update(extra)
    return entry


def _cut(image: np.ndarray, lesions: np.ndarray, box, px: int) -> tuple[np.ndarray, np.ndarray]:
    crop = crop_resized(image, box, px)
    mask = resize(crop_padded(lesions, box, fill=0).astype(np.float32), (px, px), nearest=True)
    return crop, mask.astype(np.uint8)


def _process_image(item: dict[str, Any], p: dict[str, Any], rng: np.random.Generator,
                   skipped: list[dict[str, str]]):
    """All crops of one source image as (image, mask, entry) triples."""
    rows = item["rows"]
    image, meta = read_dicom(item["image_path"], max_rows=p["max_dim"], max_cols=p["max_dim"])
    masks: dict[str, np.ndarray | None] = {}
    for row in rows:
        masks[row["lesion_id"]] = None
        if row["roi_mask_path"]:
            try:
                mask, _ = read_dicom(row["roi_mask_path"], flip=meta.flipped, apply_voi=False,
                                     max_rows=p["max_dim"], max_cols=p["max_dim"])
            except DicomReadError as exc:
                skipped.append({"lesion_id": row["lesion_id"], "path": exc.path, "reason": exc.reason})
                row["keep"] = False
                continue
            if mask.shape != image.shape:
                skipped.append({"lesion_id": row["lesion_id"], "path": row["roi_mask_path"],
                                "reason": f"mask shape {mask.shape} differs from image shape {image.shape}"})
                row["keep"] = False
                continue
            masks[row["lesion_id"]] = mask > 0
    lesions = np.zeros(image.shape, dtype=bool)
    boxes = {}
    for row in rows:
        box = _row_box(row, masks[row["lesion_id"]], image.shape[1], meta.flipped)
        boxes[row["lesion_id"]] = box
        if masks[row["lesion_id"]] is not None:
            lesions |= masks[row["lesion_id"]]
        elif box is not None:
            lesions[max(box[1], 0):box[3], max(box[0], 0):box[2]] = True
    kept = [r for r in rows if r["keep"]]
    out = []
    if p["crop"] == "whole":
        canvas, scale, (ox, oy) = letterbox(image, tuple(p["whole_size"]))
        lmask, _, _ = letterbox(lesions.astype(np.float32), tuple(p["whole_size"]))
        head = dict(kept[0], lesion_id=f"{kept[0]['patient_id']}_{kept[0]['side']}_{kept[0]['view']}_whole",
                    label=max(int(r["label"]) for r in kept))
        full = (0, 0, image.shape[1], image.shape[0])
        out.append((canvas, (lmask > 0.5).astype(np.uint8),
                    _entry(head, "whole", full, meta.flipped, image.shape, scale=scale, offset_x=ox, offset_y=oy)))
        return out, 1
    for row in kept:
        box = boxes[row["lesion_id"]]
        if box is None:
            skipped.append({"lesion_id": row["lesion_id"], "path": row["image_path"],
                            "reason": "no ROI: mask empty and no bbox or seed point in the manifest"})
            continue
        crop_box = lesion_box(p["crop"], box, seed_px=p["seed_crop_px"], pad_px=p["fixed_pad_px"],
                              factor=p["proportional_factor"], patch_px=p["patch_px"], square=p["square_boxes"])
        crop, cmask = _cut(image, lesions, crop_box, p["cache_px"])
        out.append((crop, cmask, _entry(row, "lesion", crop_box, meta.flipped, image.shape)))
    if p["crop"] == "patch" and kept:
        wanted = p["negatives_per_image"]
        negs = negative_boxes(breast_region(image), lesions, wanted, p["patch_px"], rng)
        if len(negs) < wanted:
            skipped.append({"lesion_id": "", "path": item["image_path"],
                            "reason": f"room for only {len(negs)} of {wanted} non-mass patches"})
        for k, box in enumerate(negs):
            crop, cmask = _cut(image, lesions, box, p["cache_px"])
            neg = dict(kept[0], lesion_id=f"{kept[0]['patient_id']}_{kept[0]['side']}_{kept[0]['view']}_neg{k}",
                       exam_key="", label=-1)
            out.append((crop, cmask, _entry(neg, "negative", box, meta.flipped, image.shape, mass=0)))
    return out, 1


def process_shard(shard: int, images: list[dict[str, Any]], params: dict[str, Any], cache_dir: str,
                  seed: int) -> int:
    """Write shard ``shard`` of the cache; return how many source images were decoded."""
    folder = Path(cache_dir) / "shards"
    # One generator per shard, seeded by (seed, shard): a resumed run draws the same patches.
    rng = np.random.default_rng([seed, shard])
    crops, masks, entries, skipped = [], [], [], []
    decoded = 0
    for item in images:
        try:
            produced, n = _process_image(item, params, rng, skipped)
        except DicomReadError as exc:
            skipped.extend({"lesion_id": r["lesion_id"], "path": exc.path, "reason": exc.reason}
                           for r in item["rows"] if r["keep"])
            continue
        decoded += n
        for crop, mask, entry in produced:
            stored, value_scale = to_uint16(crop)
            crops.append(stored)
            masks.append(mask)
            entries.append(dict(entry, value_scale=value_scale))
    stem = f"shard-{shard:05d}"
    shape = tuple(params["whole_size"]) if params["crop"] == "whole" else (params["cache_px"],) * 2
    arrays = {"images": np.stack(crops) if crops else np.zeros((0, *shape), np.uint16),
              "masks": np.stack(masks) if masks else np.zeros((0, *shape), np.uint8)}
    for name, array in arrays.items():
        tmp = folder / f"{stem}.{name}.tmp{os.getpid()}.npy"
        np.save(tmp, array)
        tmp.replace(folder / f"{stem}.{name}.npy")
    for offset, entry in enumerate(entries):
        entry.update(shard=shard, offset=offset)
    tmp = folder / f"{stem}.skipped.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(skipped))
    tmp.replace(folder / f"{stem}.skipped.json")
    table = pd.DataFrame(entries, columns=ENTRY_COLUMNS)
    tmp = folder / f"{stem}.parquet.tmp{os.getpid()}"
    table.to_parquet(tmp, index=False)
    tmp.replace(folder / f"{stem}.parquet")  # last: marks the shard complete
    return decoded
