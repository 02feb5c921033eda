"""Paper 003's evaluation (see docs/papers.md) over a split of whole mammograms, and its two-stage pipeline.

For every film of the split (``image_id``: scanned once, whatever its copies; ``rois``): the
dense mass map of the patch classifier (``whole_image``), one ground-truth ROI per mass lesion
brought onto the map grid by itself (never merged with its neighbour, never dropped for being
small or at the border), then FROC (``froc``): sensitivity per ROI (max or mean of the map
inside its cells against a threshold), false positives per image from above-threshold blobs
that touch no ROI, and image-level mass / no-mass accuracy from the map's maximum. A random
heatmap on the same images is the chance baseline. Every mass row of the split is accounted
for: evaluated (possibly as an ROI nothing could place, counted as missed), in an unreadable
image, or a duplicate of a lesion already listed (``SplitScan.roi_counts``).

Two stages (paper 003 §III.B-C): stage 1 calls an image "mass" when its image score (the
maximum of the stage-1 model's map; by default the localizer's own) reaches
``image_threshold``; stage 2 reports boxes only on the images stage 1 called positive. Missed
images count as missed masses, and false positives are divided by all images.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook

from mammo_ray.localize.froc import HIT_RULES, FROCResult, Hit, Reduce, evaluate_image, froc, plot_froc
from mammo_ray.localize.rois import Film, group_films, roi_grids
from mammo_ray.localize.whole_image import Localization, read_mammogram

Localizer = Callable[[np.ndarray, bool], Localization]


@dataclass
class ScannedImage:
    """One film of the split: its map, one ground-truth layer per mass lesion, and the stage-1 score."""

    image_id: str  # the film (patient, side, view), scanned once whatever its copies
    image_path: str  # the file that was read
    patient_id: str
    prob_map: np.ndarray
    rois: np.ndarray  # (n_masses, h, w) bool on the map grid, one layer per mass lesion
    lesion_ids: tuple[str, ...]
    stage1_score: float

    @property
    def n_masses(self) -> int:
        return int(self.rois.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """The union of the ROIs on the map grid (for display; the evaluation keeps them apart)."""
        return np.asarray(self.rois.any(axis=0))  # numpy types any(axis=...) as "a bool or an array"


@dataclass
class SplitScan:
    """Every film of a split through the localizer, with the bookkeeping that accounts for each ROI."""

    images: list[ScannedImage]
    skipped: list[dict[str, Any]]  # films none of whose files could be read: image_id, paths, n_masses, reason
    placed: list[dict[str, Any]]  # one per evaluated ROI: image_id, lesion_id, placed_by, reason
    n_films: int  # films of the split
    n_mass_rows: int  # MASS rows of those films
    duplicate_mass_rows: int  # MASS rows repeating a lesion_id of their film (counted once)
    shared_films: int  # films stored under more than one file (CBIS-DDSM's Mass + Calc copies)
    roi_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        evaluated = sum(s.n_masses for s in self.images)
        unreadable = sum(int(s["n_masses"]) for s in self.skipped)
        self.roi_counts = {
            "mass_rows": self.n_mass_rows,
            "evaluated": evaluated,
            "in_unreadable_images": unreadable,
            "duplicate_rows": self.duplicate_mass_rows,
        }
        if evaluated + unreadable + self.duplicate_mass_rows != self.n_mass_rows:
            raise RuntimeError(f"ROI accounting does not add up: {self.roi_counts}")


def split_images(manifest: pd.DataFrame, split_of: pd.Series, split: str) -> pd.DataFrame:
    """Every row of ``split``, all abnormalities (a film without a mass row is a negative), resolved or not.

    Unresolved rows stay: a Mass row whose own file is missing still makes its film a mass image
    when the film's Calc copy reads, and a film with no readable file is reported by ``scan_split``
    with its mass ROIs, not left out unseen.
    """
    rows = manifest[split_of == split]
    if not rows["resolved"].astype(bool).any():
        raise ValueError(f"split {split!r} has no resolved images")
    return rows


def _read_film(film: Film) -> tuple[np.ndarray | None, bool, str, list[str]]:
    """The first of the film's files that reads: (image, flipped, path, errors of the files tried before)."""
    from mammo_ray.data.dicom import DicomReadError

    errors = []
    for path in film.paths:
        try:
            image, flipped = read_mammogram(path)
        except (DicomReadError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        return image, flipped, path, errors
    return None, False, "", errors or ["no image file"]


def scan_split(
    rows: pd.DataFrame, localize: Localizer, stage1: Localizer | None = None, *, progress: bool = True
) -> SplitScan:
    """Maps of every film of ``rows`` (once per image_id); films none of whose files read are skipped
    and listed with the reason and the mass ROIs they take out of the evaluation."""
    films = group_films(rows)
    scanned, skipped, placed = [], [], []
    for film in tqdm(films, desc="dense maps", unit="image", disable=not progress):
        image, flipped, path, errors = _read_film(film)
        if image is None:
            skipped.append(
                {
                    "image_id": film.image_id,
                    "paths": list(film.paths),
                    "n_masses": film.n_masses,
                    "reason": "; ".join(errors),
                }
            )
            continue
        found = localize(image, flipped)
        rois, how = roi_grids(film, image.shape, flipped, found.dense.probs.shape, found.map_scale, found.map_offset)
        placed.extend(how)
        score = found.image_score if stage1 is None else stage1(image, flipped).image_score
        scanned.append(
            ScannedImage(
                film.image_id, path, film.patient_id, found.dense.probs, rois, tuple(r["lesion_id"] for r in how), score
            )
        )
    if not scanned:
        raise ValueError(f"no image could be scanned ({len(skipped)} skipped: {skipped[:3]})")
    masses = sum(f.n_masses + f.duplicate_mass_rows for f in films)
    return SplitScan(
        scanned,
        skipped,
        placed,
        len(films),
        masses,
        sum(f.duplicate_mass_rows for f in films),
        sum(len(f.paths) > 1 for f in films),
    )


def random_maps(scanned: Sequence[ScannedImage], seed: int) -> list[np.ndarray]:
    """The chance baseline: uniform noise of each map's shape, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.random(s.prob_map.shape).astype(np.float32) for s in scanned]


def two_stage(
    scanned: Sequence[ScannedImage],
    image_threshold: float,
    box_threshold: float,
    *,
    reduce: Reduce = "max",
    hit: Hit = "overlap",
) -> dict[str, Any]:
    """Stage 1 image call, then localisation at ``box_threshold`` on the images it calls positive."""
    calls = np.array([s.stage1_score >= image_threshold for s in scanned])
    labels = np.array([s.n_masses > 0 for s in scanned])
    detected = fps = n_rois = 0
    for s, call in zip(scanned, calls, strict=True):
        record = evaluate_image(s.prob_map, s.rois, [box_threshold], reduce=reduce, hit=hit)
        n_rois += record.roi_scores.size
        if call:
            detected += int(record.detected[:, 0].sum())
            fps += int(record.false_positives[0])
    tp = int(np.sum(calls & labels))
    return {
        "image_threshold": image_threshold,
        "box_threshold": box_threshold,
        "reduce": reduce,
        "hit": hit,
        "stage1_accuracy": float(np.mean(calls == labels)),
        "stage1_sensitivity": float(tp / labels.sum()) if labels.any() else None,
        "stage1_specificity": float(np.sum(~calls & ~labels) / (~labels).sum()) if (~labels).any() else None,
        "images_called_positive": int(calls.sum()),
        "n_images": len(scanned),
        "n_rois": n_rois,
        "sensitivity": float(detected / n_rois) if n_rois else None,
        "fp_per_image": float(fps / len(scanned)),
    }


def _roi_summary(scan: SplitScan) -> dict[str, Any]:
    """How the evaluated ROIs were placed, and every one not placed by its own mask, with the reason."""
    return {
        "counts": scan.roi_counts,
        "placed_by": dict(Counter(str(p["placed_by"]) for p in scan.placed)),
        "not_by_own_mask": [p for p in scan.placed if p["placed_by"] not in ("mask", "mask_resampled")],
    }


def evaluate_split(
    scan: SplitScan,
    out_dir: str | Path,
    *,
    reduce: Reduce = "max",
    image_threshold: float = 0.5,
    box_threshold: float = 0.5,
    seed: int = 0,
    label: str = "model",
) -> dict[str, Any]:
    """FROC under both hit rules against a random heatmap, the two-stage figures, PNG + JSON + CSV."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scanned = scan.images
    maps, masks = [s.prob_map for s in scanned], [s.rois for s in scanned]
    chance = random_maps(scanned, seed)
    results: dict[str, dict[str, FROCResult]] = {}
    for hit in HIT_RULES:
        results[hit] = {
            "model": froc(maps, masks, reduce=reduce, hit=hit),
            "random": froc(chance, masks, reduce=reduce, hit=hit),
        }
    if results["overlap"]["model"].n_rois == 0:
        raise ValueError("no mass ROI among the scanned images: FROC needs at least one")
    plots = []
    for rule, pair in results.items():
        path = out / f"froc_{rule}.png"
        plot_froc(
            pair["model"],
            path,
            label=label,
            compare={"random heatmap": pair["random"]},
            title=f"FROC ({reduce} in ROI, {rule} rule)",
        )
        plots.append(str(path))
    summary: dict[str, Any] = {
        "n_images": len(scanned),
        "n_rois": results["overlap"]["model"].n_rois,
        "reduce": reduce,
        "n_films": scan.n_films,
        "shared_films": scan.shared_films,
        "skipped": list(scan.skipped),
        "rois": _roi_summary(scan),
        "sensitivity_at_1fp": {hit: pair["model"].sensitivity_at(1.0) for hit, pair in results.items()},
        "random_sensitivity_at_1fp": {hit: pair["random"].sensitivity_at(1.0) for hit, pair in results.items()},
        "image_auc": results["overlap"]["model"].image_auc,
        "image_accuracy_at_image_threshold": float(
            np.mean([(s.prob_map.max() >= image_threshold) == (s.n_masses > 0) for s in scanned])
        ),
        "two_stage": two_stage(scanned, image_threshold, box_threshold, reduce=reduce),
        "two_stage_peak": two_stage(scanned, image_threshold, box_threshold, reduce=reduce, hit="peak"),
        "plots": plots,
        "curves": {hit: {name: r.to_dict() for name, r in pair.items()} for hit, pair in results.items()},
    }
    per_image = pd.DataFrame(
        {
            "image_id": [s.image_id for s in scanned],
            "image_path": [s.image_path for s in scanned],
            "patient_id": [s.patient_id for s in scanned],
            "n_masses": [s.n_masses for s in scanned],
            "map_max": [float(s.prob_map.max()) for s in scanned],
            "stage1_score": [s.stage1_score for s in scanned],
        }
    )
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
