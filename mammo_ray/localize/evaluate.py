"""Paper 003's evaluation over a split of whole mammograms, and its two-stage pipeline.

For every image of the split: the dense mass map of the patch classifier (``whole_image``),
the union of its mass ROI masks brought onto the map grid, then FROC (``froc``): sensitivity
per ground-truth ROI (max or mean of the map inside it against a threshold), false positives
per image from above-threshold blobs outside every ROI, and image-level mass / no-mass
accuracy from the map's maximum. A random heatmap on the same images is the chance baseline.

Two stages (paper 003 §III.B-C): stage 1 calls an image "mass" when its image score (the
maximum of the stage-1 model's map; by default the localizer's own) reaches
``image_threshold``; stage 2 reports boxes only on the images stage 1 called positive. Missed
images count as missed masses, and false positives are divided by all images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from mammo_ray.constants import AbnormalityType
from mammo_ray.localize.findings import mask_to_grid
from mammo_ray.localize.froc import FROCResult, evaluate_image, froc, plot_froc
from mammo_ray.localize.whole_image import Localization, read_mammogram

Localizer = Callable[[np.ndarray, bool], Localization]


@dataclass
class ScannedImage:
    """One image of the split: its map, its mass mask on the map grid, and the stage-1 score."""

    image_path: str
    patient_id: str
    prob_map: np.ndarray
    mask: np.ndarray
    stage1_score: float
    n_masses: int


def split_images(manifest: pd.DataFrame, split_of: pd.Series, split: str) -> pd.DataFrame:
    """The resolved rows of ``split``, all abnormalities (an image without a mass is a negative)."""
    rows = manifest[(split_of == split) & manifest["resolved"].astype(bool)]
    if rows.empty:
        raise ValueError(f"split {split!r} has no resolved images")
    return rows


def _mass_mask(rows: pd.DataFrame, shape: tuple[int, int], flipped: bool, skipped: list[dict[str, Any]]) -> np.ndarray:
    from mammo_ray.data.dicom import DicomReadError, read_dicom

    mask = np.zeros(shape, dtype=bool)
    for row in rows.itertuples(index=False):
        if AbnormalityType.parse(row.abnormality_type) is not AbnormalityType.MASS:
            continue
        path = getattr(row, "roi_mask_path", "") or ""
        if path:
            try:
                roi, _ = read_dicom(path, flip=flipped)
            except DicomReadError as exc:
                skipped.append({"image_path": row.image_path, "path": exc.path, "reason": exc.reason})
                continue
            if roi.shape != shape:
                skipped.append({"image_path": row.image_path, "path": path,
                                "reason": f"mask shape {roi.shape} differs from image shape {shape}"})
                continue
            mask |= roi > 0
            continue
        box = [getattr(row, f"bbox_{k}", float("nan")) for k in ("x0", "y0", "x1", "y1")]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in box):
            skipped.append({"image_path": row.image_path, "path": "", "reason": "mass without mask or bbox"})
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        if flipped:
            x0, x1 = shape[1] - x1, shape[1] - x0
        mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def scan_split(rows: pd.DataFrame, localize: Localizer, stage1: Localizer | None = None, *,
               progress: bool = True) -> tuple[list[ScannedImage], list[dict[str, Any]]]:
    """Dense maps of every image of ``rows``; unreadable images are skipped and listed with a reason."""
    from mammo_ray.data.dicom import DicomReadError

    scanned, skipped = [], []
    groups = list(rows.groupby("image_path", sort=True))
    for image_path, group in tqdm(groups, desc="dense maps", unit="image", disable=not progress):
        try:
            image, flipped = read_mammogram(image_path)
        except (DicomReadError, ValueError) as exc:
            skipped.append({"image_path": image_path, "path": image_path, "reason": str(exc)})
            continue
        mask = _mass_mask(group, image.shape, flipped, skipped)
        found = localize(image, flipped)
        grid = mask_to_grid(mask, found.dense.probs.shape, found.map_scale, found.map_offset)
        score = found.image_score if stage1 is None else stage1(image, flipped).image_score
        n_masses = int(ndimage.label(mask, structure=np.ones((3, 3)))[1])
        scanned.append(ScannedImage(str(image_path), str(group["patient_id"].iloc[0]), found.dense.probs,
                                    grid, score, n_masses))
    if not scanned:
        raise ValueError(f"no image could be scanned ({len(skipped)} skipped: {skipped[:3]})")
    return scanned, skipped


def random_maps(scanned: Sequence[ScannedImage], seed: int) -> list[np.ndarray]:
    """The chance baseline: uniform noise of each map's shape, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.random(s.prob_map.shape).astype(np.float32) for s in scanned]


def two_stage(scanned: Sequence[ScannedImage], image_threshold: float, box_threshold: float, *,
              reduce: str = "max", hit: str = "overlap") -> dict[str, Any]:
    """Stage 1 image call, then localisation at ``box_threshold`` on the images it calls positive."""
    calls = np.array([s.stage1_score >= image_threshold for s in scanned])
    labels = np.array([s.n_masses > 0 for s in scanned])
    detected = fps = n_rois = 0
    for s, call in zip(scanned, calls):
        record = evaluate_image(s.prob_map, s.mask, [box_threshold], reduce=reduce, hit=hit)
        n_rois += record.roi_scores.size
        if call:
            detected += int(record.detected[:, 0].sum())
            fps += int(record.false_positives[0])
    tp = int(np.sum(calls & labels))
    return {"image_threshold": image_threshold, "box_threshold": box_threshold, "reduce": reduce, "hit": hit,
            "stage1_accuracy": float(np.mean(calls == labels)),
            "stage1_sensitivity": float(tp / labels.sum()) if labels.any() else None,
            "stage1_specificity": float(np.sum(~calls & ~labels) / (~labels).sum()) if (~labels).any() else None,
            "images_called_positive": int(calls.sum()), "n_images": len(scanned), "n_rois": n_rois,
            "sensitivity": float(detected / n_rois) if n_rois else None,
            "fp_per_image": float(fps / len(scanned))}


def evaluate_split(scanned: Sequence[ScannedImage], out_dir: str | Path, *, reduce: str = "max",
                   image_threshold: float = 0.5, box_threshold: float = 0.5, seed: int = 0,
                   skipped: Sequence[dict[str, Any]] = (), label: str = "model") -> dict[str, Any]:
    """FROC under both hit rules against a random heatmap, the two-stage figures, PNG + JSON + CSV."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps, masks = [s.prob_map for s in scanned], [s.mask for s in scanned]
    chance = random_maps(scanned, seed)
    results: dict[str, dict[str, FROCResult]] = {}
    for hit in ("overlap", "peak"):
        results[hit] = {"model": froc(maps, masks, reduce=reduce, hit=hit),
                        "random": froc(chance, masks, reduce=reduce, hit=hit)}
    if results["overlap"]["model"].n_rois == 0:
        raise ValueError("no mass ROI among the scanned images: FROC needs at least one")
    plots = []
    for hit, pair in results.items():
        path = out / f"froc_{hit}.png"
        plot_froc(pair["model"], path, label=label, compare={"random heatmap": pair["random"]},
                  title=f"FROC ({reduce} in ROI, {hit} rule)")
        plots.append(str(path))
    summary = {
        "n_images": len(scanned), "n_rois": results["overlap"]["model"].n_rois, "reduce": reduce,
        "skipped": list(skipped),
        "sensitivity_at_1fp": {hit: pair["model"].sensitivity_at(1.0) for hit, pair in results.items()},
        "random_sensitivity_at_1fp": {hit: pair["random"].sensitivity_at(1.0) for hit, pair in results.items()},
        "image_auc": results["overlap"]["model"].image_auc,
        "image_accuracy_at_image_threshold": float(np.mean(
            [(s.prob_map.max() >= image_threshold) == (s.n_masses > 0) for s in scanned])),
        "two_stage": two_stage(scanned, image_threshold, box_threshold, reduce=reduce),
        "two_stage_peak": two_stage(scanned, image_threshold, box_threshold, reduce=reduce, hit="peak"),
        "plots": plots,
        "curves": {hit: {name: r.to_dict() for name, r in pair.items()} for hit, pair in results.items()},
    }
    per_image = pd.DataFrame({"image_path": [s.image_path for s in scanned],
                              "patient_id": [s.patient_id for s in scanned],
                              "n_masses": [s.n_masses for s in scanned],
                              "map_max": [float(s.prob_map.max()) for s in scanned],
                              "stage1_score": [s.stage1_score for s in scanned]})
    per_image.to_csv(out / "per_image.csv", index=False)
    summary["json"], summary["per_image"] = str(out / "froc.json"), str(out / "per_image.csv")
    summary = json_safe(summary)
    (out / "froc.json").write_text(json.dumps(summary, indent=2))
    return summary


def json_safe(value: Any) -> Any:
    """Plain JSON types; NaN (undefined, e.g. sensitivity without ROIs) becomes None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    return value
