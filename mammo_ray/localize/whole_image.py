"""A whole mammogram through a patch classifier: preprocessing, dense map, boxes (paper 003; see docs/papers.md).

The patch model was trained on ``patch_px``-px squares of the full image (``data.crop=patch``,
or the 750-px squares of ``seed750``) resized to ``cache_px`` and centre-cropped to
``input_px``. So the whole image is resized by ``scale = cache_px / patch_px`` once, normalised
as the checkpoint's eval transform normalises, and scanned densely with ``input_px`` windows
(``fcn.dense_map``): every window then sees exactly what a centre-cropped patch showed the
classifier. Map cells come back to original pixels through ``scale`` and the dense map's stride.

Normalisation. ``global`` (the training set's mean/std) is one affine map for all pixels and is
exact. ``meanvar`` z-scores each training crop by itself, which no single pass can repeat: the
whole image is z-scored over its breast region instead (an approximation; train localisation
models with ``data.normalization=global``). ``mean_image`` subtracts the mean image's average.

Orientation follows the data pipeline: ``read_dicom`` mirrors images whose breast lies on the
right, the map is computed in that frame, and boxes and heatmaps are mirrored back to the
stored image's coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mammo_ray.config import Config
from mammo_ray.data.crops import breast_region, resize, source_value_map
from mammo_ray.data.dicom import DEFAULT_MAX_DIM
from mammo_ray.data.images import read_image
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.localize.fcn import DenseMap, ensemble_dense_map
from mammo_ray.localize.findings import Finding, find_boxes


@dataclass(frozen=True)
class WindowGeometry:
    """How original pixels map to the classifier's input."""

    scale: float  # model-input px per original px (cache_px / patch side)
    window: int  # the classifier's input side, in scaled px
    patch_px: int  # the patch side in original px that one window stands for (about window / scale)


def window_geometry(config: Config, spec: TransformSpec) -> WindowGeometry:
    """The scan geometry of a patch classifier from its config and eval transform.

    Raises:
        ValueError: the model was trained on crops whose size in the image varies (``fixed``,
            ``proportional``) or on letterboxed whole images, so no fixed window exists.
    """
    crop = config.data.crop
    if crop == "patch":
        side = config.data.patch_px
    elif crop == "seed750":
        side = config.data.seed_crop_px
    else:
        raise ValueError(
            f"a dense map needs a patch classifier: data.crop={crop!r} crops vary in size (train with "
            "data.crop=patch, paper 003, or seed750)"
        )
    scale = spec.cache_px / side
    return WindowGeometry(scale=scale, window=spec.input_px, patch_px=round(spec.input_px / scale))


def normalise_whole(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """The eval transform's intensity normalisation, applied to a whole (resized) image."""
    x = np.asarray(image, dtype=np.float32)
    if spec.normalization == "global":
        return (x - spec.train_mean) / max(spec.train_std, 1e-6)
    if spec.normalization == "mean_image":
        if spec.mean_image is None:
            raise ValueError("normalization 'mean_image', but the checkpoint's eval transform holds no mean image")
        return (x - float(np.mean(spec.mean_image))) / max(spec.train_std, 1e-6)
    tissue = x[breast_region(x)]
    tissue = tissue if tissue.size > 1 else x.ravel()
    return (x - float(tissue.mean())) / max(float(tissue.std()), 1e-6)


def prepare_whole_image(image: np.ndarray, spec: TransformSpec, geometry: WindowGeometry) -> torch.Tensor:
    """(H, W) canonical intensities -> a (1, C, h, w) network input at ``geometry.scale``."""
    if image.ndim != 2:
        raise ValueError(f"a whole mammogram must be a 2-D array, got shape {image.shape}")
    h = max(geometry.window, round(image.shape[0] * geometry.scale))
    w = max(geometry.window, round(image.shape[1] * geometry.scale))
    return network_input(image, spec, (h, w))


def network_input(image: np.ndarray, spec: TransformSpec, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) canonical intensities resized to ``size`` and normalised as the eval transform does: (1, C, h, w).

    The values are first put in the cache's stored range with the image's own value map (8-bit
    data x257, as ``prepare`` stores its crops), so global normalisation sees training's units.
    """
    h, w = size
    value_map = source_value_map(image)
    scaled = ((resize(image, (h, w)) - value_map.offset) * value_map.scale).astype(np.float32)
    x = torch.from_numpy(normalise_whole(scaled, spec))[None, None]
    return x.expand(1, spec.channels, h, w).contiguous() if spec.channels > 1 else x


MAP_VALUES = {  # what the map's numbers are, per method (reported with every localization)
    "dense": "P(class 1) of the window centred on each cell, mean over members (paper 003)",
    "cam": "class activation map of class 1 (paper 004, Eq. 1), min-max scaled to [0, 1] per member, averaged, "
    "and the mean scaled to [0, 1] (relative to this image's peak)",
    "gradcam": "Grad-CAM of class 1, min-max scaled to [0, 1] per member, averaged, and the mean scaled to [0, 1] "
    "(relative to this image's peak)",
}
IMAGE_SCORE_MEANS = {
    "dense": "the map's maximum (paper 003's image-level score)",
    "cam": "the members' mean P(class 1) for the whole image (the output the map explains)",
    "gradcam": "the members' mean P(class 1) for the whole image (the output the map explains)",
}


@dataclass
class Localization:
    """A map of one whole image (dense, CAM or Grad-CAM) and what was read off it, in original pixels.

    A class map (``method`` "cam" / "gradcam", :mod:`mammo_ray.localize.class_map`) has no
    window: its ``geometry.window`` and ``patch_px`` are 0, its ``dense`` grid has square cells of
    ``dense.stride`` scaled px with ``window == stride`` (each value at its cell's centre).
    """

    dense: DenseMap  # member-mean map, in the scaled and (if ``flipped``) mirrored frame
    spread: np.ndarray  # member std per cell (zeros for one member)
    geometry: WindowGeometry
    image_shape: tuple[int, int]  # (H, W) of the original image
    flipped: bool  # the map's frame is mirrored relative to the stored image
    threshold: float
    boxes: list[Finding] = field(default_factory=list)
    method: str = "dense"  # "dense", "cam" or "gradcam": how the map was made (MAP_VALUES)
    score: float | None = None  # the image score when it is not the map's maximum (class maps)

    @property
    def image_score(self) -> float:
        """Dense maps: the map's maximum, paper 003's image-level mass / no-mass score. Class maps
        (min-max scaled, so their maximum is 1): the members' mean P(class 1) for the whole image."""
        return float(self.dense.probs.max()) if self.score is None else float(self.score)

    @property
    def map_scale(self) -> float:
        """Original px per map cell."""
        return self.dense.stride / self.geometry.scale

    @property
    def map_offset(self) -> tuple[float, float]:
        """Original (x, y) of map cell (0, 0)'s top-left corner (the cell centred on its window)."""
        ox, oy = self.dense.grid_offset
        return ox / self.geometry.scale, oy / self.geometry.scale

    def heatmap(self, size: tuple[int, int] | None = None, *, spread: bool = False) -> np.ndarray:
        """The map (or the member spread) at ``size`` (default: the original image), stored orientation."""
        values = (
            DenseMap(self.spread, self.dense.stride, self.dense.window, self.dense.image_size) if spread else self.dense
        )
        out = values.to_image(size or self.image_shape)
        return np.ascontiguousarray(np.fliplr(out)) if self.flipped else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "boxes": [b.to_dict() for b in self.boxes],
            "image_score": self.image_score,
            "threshold": self.threshold,
            "image_size": list(self.image_shape),
            "map_shape": list(self.dense.probs.shape),
            "map_stride_px": self.map_scale,
            "window_px": self.geometry.patch_px or None,
            "max_spread": float(self.spread.max(initial=0.0)),
            "method": self.method,
            "map_values": MAP_VALUES[self.method],
            "image_score_means": IMAGE_SCORE_MEANS[self.method],
        }


def _mirror(box: Finding, width: int) -> Finding:
    return Finding(width - box.x1, box.y0, width - box.x0, box.y1, box.score, box.area)


def localize_image(
    models: Sequence[nn.Module],
    spec: TransformSpec,
    config: Config,
    image: np.ndarray,
    *,
    flipped: bool = False,
    threshold: float = 0.5,
    tile: int | None = 1024,
    min_area: int = 1,
    max_boxes: int | None = 20,
) -> Localization:
    """Dense ensemble map of one whole mammogram, and boxes of the blobs above ``threshold``.

    Args:
        models: the ensemble members (one for a single network), all patch classifiers.
        spec, config: the members' eval transform and config (from the checkpoint).
        image: (H, W) canonical intensities, as ``read_dicom`` returns them.
        flipped: ``image`` was mirrored by ``read_dicom`` (``meta.flipped``); boxes and heatmaps
            are mirrored back to the stored orientation.
        threshold: map value a finding must reach.
        tile: tile side in scaled px for ``dense_map`` (bounded memory); None: one pass.
        min_area: smallest blob, in map cells.
        max_boxes: keep the highest-scoring boxes only; None keeps all.
    """
    geometry = window_geometry(config, spec)
    x = prepare_whole_image(image, spec, geometry)
    dense, spread = ensemble_dense_map(list(models), x, geometry.window, tile=tile)
    result = Localization(dense, spread, geometry, tuple(image.shape), flipped, threshold)
    result.boxes = read_boxes(result, min_area=min_area, max_boxes=max_boxes)
    return result


def read_boxes(result: Localization, *, min_area: int = 1, max_boxes: int | None = 20) -> list[Finding]:
    """Boxes of the blobs of ``result``'s map at its threshold, in the stored image's original pixels."""
    boxes = find_boxes(
        result.dense.probs,
        result.threshold,
        scale=result.map_scale,
        offset=result.map_offset,
        min_area=min_area,
        max_boxes=max_boxes,
    )
    width = result.image_shape[1]
    return [_mirror(b, width) for b in boxes] if result.flipped else boxes


def read_mammogram(path: str | Path, *, max_dim: int | None = None) -> tuple[np.ndarray, bool]:
    """A whole mammogram as (canonical float32 image, mirrored?): DICOM, or PNG/TIFF/JPEG grayscale.

    The one image decoder (``data.images.read_image``) reads it, as the Serve app decodes an upload
    of the same file: the same array offline and over HTTP. A DICOM without its preamble is read too.

    Raises:
        DicomReadError / ImageReadError (a ValueError): naming the file and the reason.
    """
    decoded = read_image(path, max_dim=max_dim or DEFAULT_MAX_DIM, force_dicom=True)
    return decoded.image, decoded.flipped
