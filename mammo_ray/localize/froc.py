"""Paper 003's localization evaluation: sensitivity per mass ROI vs false positives per image.

Paper 003 (§II.D, §III.C, Fig. 11-14; see docs/papers.md): a ground-truth mass ROI counts as localized at a
threshold ``t`` when the maximum (or the mean) of the probability map inside it is
``>= t``; sensitivity is the fraction of ROIs localized (85% at t = 0.4, with 0.9 false
positives per image). The paper does not spell out how false positives are counted; here
they are 8-connected blobs of ``map >= t`` (per the hit rule below), averaged over *all*
images, those without a mass included. The image-level mass/no-mass call (§III.B, 85%
accuracy) is ``map.max() >= t``, against "the mask has an ROI".

Two hit rules (``hit=``):

``"overlap"`` (default; paper 003 as written)
    ROI localized when ``reduce(map inside ROI) >= t``; a blob is a false positive when it
    touches no ROI pixel, so a blob touching an ROI never is, however far it spills.
    Caveat: blobs are never penalised for size, so a map that is high *everywhere* scores
    well: at a low threshold each image is one blob touching its ROI, giving sensitivity 1
    at (mass-free images / images) FP per image. A random heatmap can thus reach
    sensitivity 1 within 1 FP/image; compare maps at a fixed threshold, or use:
``"peak"`` (FROC with one mark per blob, at the blob's peak)
    a blob's mark is the first pixel (row-major) holding its maximum; it is a false
    positive when that pixel lies outside every ROI, and an ROI is localized when, on top
    of the ``reduce`` criterion, some blob's mark lies inside it. One giant blob then hits
    at most one ROI and is a false positive unless its peak is in a mass.

Ground truth. Each image gives either a stack ``(R, h, w)`` with one layer per ground-truth
ROI (one per lesion, as :mod:`mammo_ray.localize.evaluate` builds it: neighbouring lesions stay
two ROIs, layers may overlap, and an empty layer is an ROI the map can never localize, so it
still counts as missed), or a single ``(h, w)`` union mask whose 8-connected components are the
ROIs (touching lesions merge into one: only for inputs that know no better). With a stack, a
blob is a false positive when it touches no layer; under ``"peak"`` a mark inside several
(overlapping) layers localizes each of them. Maps and masks share the (h, w) grid: bring each
full-resolution ROI down with :func:`mammo_ray.localize.findings.roi_to_grid` (never drops an
ROI) or a union with :func:`~mammo_ray.localize.findings.mask_to_grid`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from mammo_ray.constants import DISCLAIMER
from mammo_ray.localize.findings import check_map, label_components

__all__ = ["DEFAULT_THRESHOLDS", "FROCResult", "ImageRecord", "evaluate_image", "froc", "plot_froc"]

DEFAULT_THRESHOLDS = np.linspace(0.0, 1.0, 101)[1:-1]  # 0.01, 0.02, ..., 0.99
Reduce = Literal["max", "mean"]
Hit = Literal["overlap", "peak"]
REDUCTIONS: tuple[Reduce, ...] = ("max", "mean")
HIT_RULES: tuple[Hit, ...] = ("overlap", "peak")
_Choice = TypeVar("_Choice", bound=str)
_FP_TOLERANCE = 1e-9  # fp_per_image is a ratio of counts; don't lose 0.9 <= 0.9 to rounding


def _optional(value: float) -> float | None:
    """A float for JSON, None for NaN (undefined)."""
    return None if math.isnan(value) else float(value)


def _check_thresholds(thresholds: Any) -> np.ndarray:
    values = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"thresholds: expected a non-empty 1-D array of finite numbers, got {values!r}")
    return np.unique(values)  # ascending, duplicates dropped


def _check_choice(name: str, value: _Choice, allowed: tuple[_Choice, ...]) -> _Choice:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """What one image contributes to the evaluation."""

    thresholds: np.ndarray  # (T,) ascending
    roi_scores: np.ndarray  # (R,) max or mean of the map inside each ground-truth ROI; NaN: empty ROI
    detected: np.ndarray  # (R, T) bool: ROI r localized at threshold t (hit rule)
    false_positives: np.ndarray  # (T,) int: false-positive blobs of map >= t (hit rule)
    image_score: float  # map.max(): the image-level mass score
    reduce: str  # "max" or "mean": how roi_scores were taken
    hit: str  # "overlap" or "peak"

    @property
    def has_mass(self) -> bool:
        return self.roi_scores.size > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds.tolist(),
            "roi_scores": [_optional(v) for v in self.roi_scores],
            "detected": self.detected.tolist(),
            "false_positives": self.false_positives.tolist(),
            "image_score": self.image_score,
            "has_mass": self.has_mass,
            "reduce": self.reduce,
            "hit": self.hit,
        }


def _roi_stack(mask: np.ndarray) -> np.ndarray:
    """(R, h, w) one layer per ROI: a stack as given, or a union mask split into 8-connected components."""
    if mask.ndim == 3:
        return mask
    rois, n_rois = label_components(mask)
    return rois[None] == np.arange(1, n_rois + 1)[:, None, None]


def _roi_scores(array: np.ndarray, stack: np.ndarray, reduce: str) -> np.ndarray:
    """``reduce`` of the map inside each ROI; NaN for an empty ROI (never localized)."""
    pick = np.max if reduce == "max" else np.mean
    return np.array([pick(array[layer]) if layer.any() else np.nan for layer in stack], dtype=np.float64)


def _evaluate(array: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, reduce: str, hit: str) -> ImageRecord:
    stack = _roi_stack(mask)
    union = np.asarray(stack.any(axis=0))  # (h, w); numpy types any(axis=...) as "a bool or an array"
    roi_scores = _roi_scores(array, stack, reduce)
    with np.errstate(invalid="ignore"):  # NaN (an empty ROI) is below every threshold
        detected = roi_scores[:, None] >= thresholds[None, :]
    false_positives = np.zeros(thresholds.size, dtype=np.int64)
    for k, t in enumerate(thresholds):
        blobs, n_blobs = label_components(array >= t)
        if hit == "overlap":
            false_positives[k] = n_blobs - np.unique(blobs[union & (blobs > 0)]).size
        elif n_blobs:  # "peak": each blob is one mark at its (first) maximum pixel
            marks = np.array(ndimage.maximum_position(array, blobs, np.arange(1, n_blobs + 1)))
            false_positives[k] = int(np.count_nonzero(~union[marks[:, 0], marks[:, 1]]))
            detected[:, k] &= stack[:, marks[:, 0], marks[:, 1]].any(axis=1)
        else:
            detected[:, k] = False
    return ImageRecord(
        thresholds=thresholds,
        roi_scores=roi_scores,
        detected=detected,
        false_positives=false_positives,
        image_score=float(array.max()),
        reduce=reduce,
        hit=hit,
    )


def _check_pair(prob_map: Any, gt_mask: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    array = check_map(prob_map, f"{where} prob_map")
    mask = np.asarray(gt_mask)
    if mask.ndim not in (2, 3) or mask.shape[-2:] != array.shape:
        raise ValueError(
            f"{where}: prob_map shape {array.shape} != gt_mask shape {mask.shape} "
            "(expected (h, w) or (n_rois, h, w) on the map grid: bring masks onto it with "
            "roi_to_grid or mask_to_grid)"
        )
    return array, mask != 0


def evaluate_image(
    prob_map: Any, gt_mask: Any, thresholds: Any = None, *, reduce: Reduce = "max", hit: Hit = "overlap"
) -> ImageRecord:
    """Paper 003 (§II.D) evaluation of one map against its ground-truth mask.

    Args:
        prob_map: (h, w) mass probability map.
        gt_mask: on the same grid, non-zero inside ROIs: ``(R, h, w)``, one layer per ROI, or an
            ``(h, w)`` union whose 8-connected components are the ROIs (module docstring).
        thresholds: decision thresholds (sorted ascending, duplicates dropped); None for
            :data:`DEFAULT_THRESHOLDS`.
        reduce: ``"max"`` or ``"mean"`` of the map inside an ROI is compared with ``t``.
        hit: ``"overlap"`` or ``"peak"``; see the module docstring.

    Raises:
        ValueError: for mismatched shapes, a non-finite map or bad thresholds/reduce/hit.
    """
    array, mask = _check_pair(prob_map, gt_mask, "evaluate_image")
    return _evaluate(
        array,
        mask,
        _check_thresholds(thresholds),
        _check_choice("reduce", reduce, REDUCTIONS),
        _check_choice("hit", hit, HIT_RULES),
    )


@dataclass(frozen=True, eq=False)
class FROCResult:
    """Sensitivity, false positives per image and image accuracy per threshold (paper 003)."""

    thresholds: np.ndarray  # (T,) ascending
    sensitivity: np.ndarray  # (T,) localized ROIs / all ROIs; NaN when there is no ROI
    fp_per_image: np.ndarray  # (T,) false-positive blobs / number of images (all images)
    image_accuracy: np.ndarray  # (T,) accuracy of the call "map.max() >= t" vs "has an ROI"
    image_auc: float  # ROC AUC of map.max() for mass/no-mass; NaN with one class
    n_images: int
    n_rois: int
    reduce: str  # "max" or "mean" inside each ROI
    hit: str  # "overlap" or "peak" (module docstring)
    roi_scores: np.ndarray  # (n_rois,) per ROI, in image order (paper 003 Fig. 11-13); NaN: empty ROI
    image_scores: np.ndarray  # (n_images,) map.max() per image
    image_labels: np.ndarray  # (n_images,) 1 where the mask has an ROI

    def _index_at_fp(self, fp: float) -> int | None:
        """Grid index of the best sensitivity with ``fp_per_image <= fp`` (None if none)."""
        if not fp >= 0:
            raise ValueError(f"fp budget must be >= 0 false positives per image, got {fp}")
        candidates = np.flatnonzero(self.fp_per_image <= fp + _FP_TOLERANCE)
        if candidates.size == 0 or self.n_rois == 0:
            return None
        # Highest sensitivity; among equals the fewest FPs, then the highest threshold.
        return int(max(candidates, key=lambda k: (self.sensitivity[k], -self.fp_per_image[k], self.thresholds[k])))

    def sensitivity_at(self, fp: float = 1.0) -> float:
        """Highest sensitivity over the thresholds with at most ``fp`` FPs per image.

        A step function over the evaluated thresholds, not interpolated: only operating
        points that were measured count. When no threshold stays within the budget the
        answer is 0.0 (a threshold above every score localizes nothing and has no false
        positives); with no ROI at all it is NaN (sensitivity undefined).
        """
        if self.n_rois == 0:
            return float("nan")
        k = self._index_at_fp(fp)
        return 0.0 if k is None else float(self.sensitivity[k])

    def operating_point(self, threshold: float) -> dict[str, Any]:
        """Sensitivity, FP per image and image accuracy at one evaluated threshold.

        Raises:
            ValueError: when ``threshold`` is not on the grid (within 1e-6); FP counts need
                the maps, so pass the threshold to :func:`froc` instead.
        """
        k = int(np.argmin(np.abs(self.thresholds - threshold)))
        if abs(self.thresholds[k] - threshold) > 1e-6:
            raise ValueError(
                f"threshold {threshold} was not evaluated (nearest: {self.thresholds[k]:.6g}); "
                "include it in froc(thresholds=...)"
            )
        return {
            "threshold": float(self.thresholds[k]),
            "sensitivity": _optional(self.sensitivity[k]),
            "fp_per_image": float(self.fp_per_image[k]),
            "image_accuracy": float(self.image_accuracy[k]),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain lists, floats and ints; undefined values (NaN) are None."""
        k = self._index_at_fp(1.0)
        return {
            "reduce": self.reduce,
            "hit": self.hit,
            "n_images": self.n_images,
            "n_rois": self.n_rois,
            "thresholds": self.thresholds.tolist(),
            "sensitivity": [_optional(v) for v in self.sensitivity],
            "sensitivity_note": (None if self.n_rois else "undefined (None): no ground-truth ROI in any image"),
            "fp_per_image": self.fp_per_image.tolist(),
            "image_accuracy": self.image_accuracy.tolist(),
            "image_auc": _optional(self.image_auc),
            "sensitivity_at_1fp": _optional(self.sensitivity_at(1.0)),
            "operating_point_at_1fp": None if k is None else self.operating_point(self.thresholds[k]),
            "roi_scores": [_optional(v) for v in self.roi_scores],
            "image_scores": self.image_scores.tolist(),
            "image_labels": self.image_labels.tolist(),
        }


def froc(
    maps: Sequence[Any], masks: Sequence[Any], thresholds: Any = None, *, reduce: Reduce = "max", hit: Hit = "overlap"
) -> FROCResult:
    """Paper 003 (§II.D, §III.C) evaluation over a set of images.

    Args:
        maps: one (h, w) probability map per image.
        masks: per image, its ground truth on its map's grid: an ``(R, h, w)`` stack with one
            layer per ROI, or an ``(h, w)`` union mask (module docstring). ``R = 0`` or an empty
            union is an image without a mass: it still counts in FP per image and image accuracy.
        thresholds: decision thresholds, sorted ascending; None for 0.01, 0.02, ..., 0.99.
        reduce: ``"max"`` (paper 003's criterion, Fig. 14) or ``"mean"`` of the map inside
            an ROI is compared with the threshold.
        hit: ``"overlap"`` (paper 003 as written) or ``"peak"`` (one mark per blob, robust
            to maps that are high everywhere); see the module docstring.

    Raises:
        ValueError: for no images, unequal numbers of maps and masks, or an image whose map
            and mask differ in shape (the message names the image index and both shapes).
    """
    maps, masks = list(maps), list(masks)
    if not maps:
        raise ValueError("froc: no images to evaluate (empty list of maps)")
    if len(maps) != len(masks):
        raise ValueError(f"froc: {len(maps)} maps but {len(masks)} masks")
    grid = _check_thresholds(thresholds)
    reduce, hit = _check_choice("reduce", reduce, REDUCTIONS), _check_choice("hit", hit, HIT_RULES)
    records = [
        _evaluate(*_check_pair(m, g, f"image {i}"), grid, reduce, hit)
        for i, (m, g) in enumerate(zip(maps, masks, strict=True))
    ]

    roi_scores = np.concatenate([r.roi_scores for r in records])
    image_scores = np.array([r.image_score for r in records])
    image_labels = np.array([int(r.has_mass) for r in records])
    n_images, n_rois = len(records), int(roi_scores.size)
    if n_rois:
        sensitivity = np.concatenate([r.detected for r in records]).sum(axis=0) / n_rois
    else:
        sensitivity = np.full(grid.size, np.nan)
    fp_per_image = np.sum([r.false_positives for r in records], axis=0) / n_images
    calls = image_scores[:, None] >= grid[None, :]
    image_accuracy = (calls == image_labels[:, None].astype(bool)).mean(axis=0)
    both = 0 < image_labels.sum() < n_images
    image_auc = float(roc_auc_score(image_labels, image_scores)) if both else float("nan")
    return FROCResult(
        thresholds=grid,
        sensitivity=sensitivity,
        fp_per_image=fp_per_image,
        image_accuracy=image_accuracy,
        image_auc=image_auc,
        n_images=n_images,
        n_rois=n_rois,
        reduce=reduce,
        hit=hit,
        roi_scores=roi_scores,
        image_scores=image_scores,
        image_labels=image_labels,
    )


def plot_froc(
    result: FROCResult,
    path: str | Path,
    *,
    label: str | None = None,
    compare: Mapping[str, FROCResult] | None = None,
    log_x: bool = True,
    title: str | None = None,
) -> Path:
    """FROC curve: sensitivity vs false positives per image, one point per threshold.

    The best operating point within 1 FP/image (:meth:`FROCResult.sensitivity_at`) of
    ``result`` is marked and annotated with its threshold. ``compare`` adds curves (e.g. a
    random-heatmap baseline), each with its sensitivity at 1 FP/image in the legend.

    Args:
        log_x: symmetric-log x axis (linear below 0.1 so zero FPs stay visible).

    Raises:
        ValueError: when a result has no ROI (sensitivity undefined, nothing to draw).
    """
    curves = {label or "model": result, **dict(compare or {})}
    for name, res in curves.items():
        if res.n_rois == 0:
            raise ValueError(f"plot_froc: {name!r} has no ground-truth ROI; its sensitivity is undefined")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name, res in curves.items():
        ax.plot(
            res.fp_per_image,
            res.sensitivity,
            marker=".",
            ms=3,
            lw=1.6,
            label=f"{name} (sensitivity {res.sensitivity_at(1.0):.0%} at <= 1 FP/image)",
        )
    k = result._index_at_fp(1.0)
    if k is not None:
        fp, sens, t = result.fp_per_image[k], result.sensitivity[k], result.thresholds[k]
        ax.plot([fp], [sens], marker="o", ms=8, mfc="none", mec="crimson", mew=1.8, ls="none")
        ax.annotate(
            f"{sens:.0%} at {fp:.2f} FP/image\n(threshold {t:.2f})",
            (fp, sens),
            xytext=(12, -28),
            textcoords="offset points",
            fontsize=8,
            color="crimson",
            arrowprops={"arrowstyle": "-", "color": "crimson", "lw": 0.8},
        )
    ax.axvline(1.0, ls=":", lw=1, color="0.5")
    if log_x:
        ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=0)
    ax.set(
        ylim=(-0.02, 1.02),
        xlabel="False positives per image",
        ylabel=f"Sensitivity (ROI {result.reduce} >= threshold, hit: {result.hit})",
        title=title or f"FROC ({result.n_images} images, {result.n_rois} ROIs)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.text(0.995, 0.005, DISCLAIMER, ha="right", va="bottom", fontsize=5, color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
