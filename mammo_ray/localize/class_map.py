"""A class activation map of a whole mammogram (paper 004, section III-D): CAM or Grad-CAM, boxes.

Paper 004 (see docs/papers.md) feeds a full mammogram to its fine-tuned ResNet crop classifier and projects the output
layer's weights back onto the last conv feature maps (CAM, its Eq. 1). Here every ensemble member
does so on the whole image (:func:`mammo_ray.localize.cam.cam`: CAM where ``ModelInfo.gap_fc``,
Grad-CAM on every backbone), and the members' maps are averaged, as the dense maps are.

Scale. A crop classifier saw its lesions at a scale the crop mode sets. ``patch`` and ``seed750``
crops have a fixed side, so the whole image is resized by ``cache_px / side`` exactly as for a
dense map; ``whole`` models saw the image letterboxed to ``data.whole_size``, so that scale is
used. ``fixed`` and ``proportional`` crops follow their lesion's size, so no scale is the
training one: the image goes in with its long side at ``DEFAULT_LONG_SIDE_INPUTS`` network
inputs (a lesion of 1/8 of the long side then fills half an input, as a 2x proportional crop
shows it), or at ``long_side`` px when the caller says so. Intensities are normalised as the
checkpoint's eval transform does (``whole_image.normalise_whole``).

Values. CAM is in logit units and Grad-CAM in gradient x activation units; neither is a
probability. Each member's map is min-max scaled to [0, 1] (``cam.normalize_map``) before the
members are averaged, and the mean is min-max scaled again: members that look at different places
average to a low, flat map, and a threshold on it would then find nothing. So the heatmap and the
box threshold are relative to the ensemble's own peak on this image (0.5: the upper half of it),
the peak always makes a box, and how much the members disagree is the spread map's to say. The
image score is the members' mean P(class 1) for the whole image: the output the map explains, not a
validated image-level call.

Grid. Member maps come at feature resolution (finer for LevyNet than for ResNet); each is
resampled bilinearly onto one grid of square cells over the scaled image: the finest member's
rows, ``cell = h_in / rows`` scaled px, and ``round(w_in / cell)`` columns. Cells have no window:
``DenseMap(window=stride=cell)``, offset 0, so ``Localization`` maps cells and boxes back to
original pixels as it does for dense maps (to within a fraction of a cell on the width).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mammo_ray.config import Config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.localize.cam import cam, normalize_map, upsample_map
from mammo_ray.localize.fcn import DenseMap
from mammo_ray.localize.whole_image import Localization, WindowGeometry, network_input, read_boxes, window_geometry
from mammo_ray.models import Classifier, ViewModel, as_view_model

__all__ = ["CLASS_MAP_METHODS", "DEFAULT_LONG_SIDE_INPUTS", "class_map_scale", "localize_class_map"]

CLASS_MAP_METHODS = ("cam", "gradcam")
DEFAULT_LONG_SIDE_INPUTS = 4  # fixed/proportional crop models: the image's long side in network inputs


def class_map_scale(
    config: Config, spec: TransformSpec, image_shape: tuple[int, int], long_side: int | None = None
) -> tuple[float, str]:
    """Network px per original px for the whole image, and a sentence saying how it was chosen."""
    height, width = (int(v) for v in image_shape)
    if long_side is not None:
        if long_side < 1:
            raise ValueError(f"long_side must be a positive number of network px, got {long_side}")
        return long_side / max(height, width), f"long side {long_side} px (as asked)"
    crop = config.data.crop
    if crop in ("patch", "seed750"):
        geometry = window_geometry(config, spec)
        return geometry.scale, f"the {crop} crops' scale, cache_px / {geometry.patch_px} px"
    if crop == "whole":
        wh, ww = config.data.whole_size
        return min(wh / height, ww / width), f"letterboxed to data.whole_size {wh}x{ww}, as in training"
    side = DEFAULT_LONG_SIDE_INPUTS * spec.input_px
    return side / max(height, width), (
        f"long side {side} px ({DEFAULT_LONG_SIDE_INPUTS} x input_px: data.crop={crop} crops have no fixed scale)"
    )


def _device(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


def _member_map(model: ViewModel, x: torch.Tensor, method: str, target_class: int) -> tuple[torch.Tensor, float]:
    """One member's (h, w) map at feature resolution and its P(target_class) for the image."""
    if not isinstance(model, Classifier):
        raise ValueError(
            f"{model.info.name}: a multimodal model classifies CC+MLO pairs; a whole-image class map takes one view"
        )
    if model.training:
        raise ValueError(f"{model.info.name} is in training mode: call model.eval() before a class map")
    x = x.to(_device(model))
    maps = cam(model, x, target_class=target_class, method=method)
    with torch.inference_mode():
        prob = float(model(x).float().softmax(1)[0, target_class])
    return maps[0].detach().float().cpu(), prob


def _rescale(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant map becomes zeros."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def localize_class_map(
    models: Sequence[nn.Module],
    spec: TransformSpec,
    config: Config,
    image: np.ndarray,
    *,
    method: str = "cam",
    flipped: bool = False,
    threshold: float = 0.5,
    long_side: int | None = None,
    target_class: int = 1,
    min_area: int = 1,
    max_boxes: int | None = 20,
) -> Localization:
    """The members' mean CAM (or Grad-CAM) of one whole mammogram, and boxes of its blobs above ``threshold``.

    Args:
        models: the ensemble members (single-view classifiers in eval mode); CAM needs every one to
            be GAP+FC (``ModelInfo.gap_fc``), Grad-CAM takes any.
        spec, config: the members' eval transform and config (from the checkpoint).
        image: (H, W) canonical intensities, as ``read_dicom`` returns them.
        method: "cam" (paper 004) or "gradcam".
        flipped: ``image`` was mirrored by ``read_dicom``; boxes and heatmaps come back unmirrored.
        threshold: relative map value (0..1) a box must reach.
        long_side: the image's long side in network px; None: from the crop mode (module docstring).
        target_class: the class whose map is made (1: malignant / mass / calcification, by task).
        min_area, max_boxes: as for ``findings.find_boxes``.

    Raises:
        ValueError: an unknown method, CAM on a member that is not GAP+FC (naming it), a
            multimodal member, or a 1-D / empty image.
    """
    if method not in CLASS_MAP_METHODS:
        raise ValueError(f"method must be one of {CLASS_MAP_METHODS} for a class map, got {method!r}")
    if not models:
        raise ValueError("a class map needs at least one model")
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"a whole mammogram must be a non-empty 2-D array, got shape {image.shape}")
    scale, _ = class_map_scale(config, spec, image.shape, long_side)
    members = [as_view_model(m) for m in models]
    smallest = max(m.info.min_input_size for m in members)
    scale = max(scale, smallest / min(image.shape))  # upscale a tiny image uniformly, never stretch it
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    x = network_input(image, spec, size)
    raw, probs = zip(*(_member_map(m, x, method, target_class) for m in members), strict=True)
    rows = max(int(m.shape[0]) for m in raw)
    cell = size[0] / rows
    cols = max(1, round(size[1] / cell))
    stack = torch.stack([normalize_map(upsample_map(m, (rows, cols))) for m in raw]).numpy()
    dense = DenseMap(_rescale(stack.mean(0)).astype(np.float32), cell, cell, size)
    geometry = WindowGeometry(scale=scale, window=0, patch_px=0)
    result = Localization(
        dense,
        stack.std(0).astype(np.float32),
        geometry,
        tuple(image.shape),
        flipped,
        threshold,
        method=method,
        score=float(np.mean(probs)),
    )
    result.boxes = read_boxes(result, min_area=min_area, max_boxes=max_boxes)
    return result
