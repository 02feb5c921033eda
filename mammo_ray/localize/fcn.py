"""Fully convolutional dense probability maps (paper 003, sections II.C and III.C; see docs/papers.md).

Paper 003 turns its patch classifier into a fully convolutional net "to slide the original
network across a larger image in a single forward pass". The equivalent, for any
``Classifier``: the conv trunk (``forward_features``) runs once over the image (or once per
tile), then the head is applied to every k x k window of the feature map at feature stride 1,
i.e. to every ``window``-px image window at the network stride s. Window (i, j) covers image
rows [i s, i s + window) and cols [j s, j s + window); k is the feature side of one window (7
for a ResNet at 224 px, 6 for AlexNet). GAP+FC heads (``info.gap_fc``) become the literal
FC->conv conversion, ``avg_pool2d(k, stride 1)`` then the FC as a 1x1 convolution; the MLP
heads (AlexNet/VGG16 fc6/fc7, LevyNet) run ``forward_head`` on unfolded feature windows,
``batch_windows`` at a time, so memory stays bounded. Each cell is P(``target_class``).

Exactness. For a trunk without zero padding (valid convolutions) each dense cell equals the
classifier on the cropped window (``sliding_window_map``) up to float error, and tiled maps
equal untiled ones. Every registered backbone pads: a dense cell's edge features see the
neighbouring tissue where a crop sees zeros, so cells approximate the crops, and with
``halo=0`` cells next to tile seams differ from the untiled map (by up to the map's own spread
for randomly initialised LevyNet / ResNet-18). A ``halo`` of at least the trunk's receptive
field makes tiled == untiled again. 9-channel models mirror-pad each tile in the DoG bank.

Tiling. A tile computes a block of output cells; its input is exactly the union of those
cells' windows (plus ``halo`` px of context, clipped to the image), so tiles start on the
s-px grid and consecutive tiles overlap by ``window - s`` px; untiled is one such block, so
image px beyond the last window are not read. Peak memory follows the tile, not the image:
the image stays where it is and each tile is copied to the model's device.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mammo_ray.models import Classifier, MultiViewClassifier

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive: mammo_ray.data.crops.Box

_MAX_PROBE_PX = 4096  # give up looking for the next feature cell beyond window + this


@dataclass(frozen=True)
class Geometry:
    """How a trunk maps windows to feature cells, measured by ``trunk_geometry``."""

    stride: int  # s: image px per feature cell (the network stride)
    k: int  # feature cells per side of one window


@dataclass(frozen=True)
class DenseMap:
    """Window probabilities on the s-px grid of an image (paper 003's classification map)."""

    probs: np.ndarray  # (h, w) float32: P(target_class) of window (i, j)
    # Whole px for a dense map; a class map's cells (localize/class_map.py) may be fractional.
    stride: float  # s, image px between neighbouring windows
    window: float  # window side in image px (the classifier's input_px)
    image_size: tuple[int, int]  # (H, W) of the image the map was computed on

    @property
    def grid_offset(self) -> tuple[float, float]:
        """(x, y) for ``findings.find_boxes(probs, scale=stride, offset=grid_offset)``: the s x s cell centred
        on each window's centre."""
        offset = (self.window - self.stride) / 2
        return offset, offset

    def cell_box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """The image window of cell (i, j): ``(x0, y0, x1, y1) = (j s, i s, j s + window, i s + window)``."""
        h, w = self.probs.shape
        if not (0 <= i < h and 0 <= j < w):
            raise IndexError(f"cell ({i}, {j}) is outside the {h}x{w} dense map")
        s = self.stride
        return j * s, i * s, j * s + self.window, i * s + self.window

    def to_image(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """A full-resolution (H, W) float32 map: each value at its window centre, bilinear in between.

        Pixels outside the outermost centres take the nearest centre's value (edges clamped).
        ``size`` defaults to ``image_size``; another size resamples the same image extent.
        """
        out_h, out_w = size if size is not None else self.image_size
        rows = self._axis(out_h, self.image_size[0], self.probs.shape[0])
        cols = self._axis(out_w, self.image_size[1], self.probs.shape[1])
        (r0, r1, tr), (c0, c1, tc) = rows, cols
        p = self.probs.astype(np.float32)
        by_row = p[r0] * (1 - tr)[:, None] + p[r1] * tr[:, None]  # (out_h, w)
        return (by_row[:, c0] * (1 - tc) + by_row[:, c1] * tc).astype(np.float32)

    def _axis(self, n_out: int, n_image: int, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_image / n_out) - 0.5  # image pixel coordinates
        u = np.clip((y - (self.window - 1) / 2) / self.stride, 0, n_cells - 1)  # fractional cell index
        lo = np.floor(u).astype(np.int64)
        return lo, np.minimum(lo + 1, n_cells - 1), (u - lo).astype(np.float32)


class _Trunk(nn.Module):  # forward = forward_features, for functional_call
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


_GEOMETRY: weakref.WeakKeyDictionary[nn.Module, dict[int, Geometry]] = weakref.WeakKeyDictionary()


def trunk_geometry(model: Classifier, window: int) -> Geometry:
    """Network stride and feature cells per window, measured on the trunk; cached per (model, window).

    The trunk runs on shape-only ("meta") square inputs of ``window`` px and up, finding where
    the feature side grows: consecutive growth points are s px apart, and each must add exactly
    one cell (f(window + m s) = k + m).

    Raises:
        ValueError: ``window`` is too small for the trunk, is not a multiple of s (the head would
            see k cells spanning k s != window px of a padded trunk), or the trunk is not
            translation-aligned (its output does not grow one cell per s px: an adaptive pool,
            a resize, or a non-square response).
    """
    cache = _GEOMETRY.setdefault(model, {})
    if window in cache:
        return cache[window]
    name, trunk = model.info.name, _Trunk(model)
    state = {key: torch.empty_like(t, device="meta") for key, t in [*trunk.named_parameters(), *trunk.named_buffers()]}
    channels, sides = model.expected_input_channels, {}

    def side(n: int) -> int:
        if n not in sides:
            try:
                out = functional_call(trunk, state, (torch.empty(1, channels, n, n, device="meta"),))
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"{name}: the conv trunk fails on a {n}x{n} input ({error})") from error
            if out.dim() != 4 or out.shape[-2] != out.shape[-1]:
                raise ValueError(
                    f"{name}: the trunk is not translation-aligned: a {n}x{n} input gives features "
                    f"{tuple(out.shape)}, not a square (1, C, h, h) map"
                )
            sides[n] = int(out.shape[-1])
        return sides[n]

    def next_growth(start: int) -> int:  # smallest n > start with side(n) > side(start); side() is monotone
        value, lo, step = side(start), start, 1
        while side(start + step) <= value:
            lo, step = start + step, step * 2
            if step > _MAX_PROBE_PX:
                raise ValueError(
                    f"{name}: the trunk is not translation-aligned: its feature map stays {value} "
                    f"cells from {start} to {start + step} px (not fully convolutional: an "
                    f"adaptive pool or a resize in forward_features?)"
                )
        hi = start + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if side(mid) <= value else (lo, mid)
        return hi

    k, n1 = side(window), next_growth(window)
    stride = next_growth(n1) - n1
    if window % stride:
        raise ValueError(
            f"{name}: window {window} px is not a multiple of the network stride {stride} px, so the "
            f"{k} feature cells the head sees would not span the window; use "
            f"{window // stride * stride or stride} or {(window // stride + 1) * stride} px"
        )
    for n, expected in [
        (n1, k + 1),
        (n1 + stride - 1, k + 1),
        (n1 + stride, k + 2),
        *((window + m * stride, k + m) for m in (1, 2, 3)),
    ]:
        if side(n) != expected:
            raise ValueError(
                f"{name}: the trunk is not translation-aligned at stride {stride}: a {n}-px input "
                f"gives {side(n)} feature cells, expected {expected} (a {window}-px window gives "
                f"{k}, and every {stride} px more should add exactly one cell)"
            )
    cache[window] = Geometry(stride, k)
    return cache[window]


def _check_model(model: nn.Module, target_class: int) -> Classifier:
    """``model`` itself, once it is a single-view ``Classifier`` in eval mode with a ``target_class`` logit."""
    if isinstance(model, MultiViewClassifier):
        raise ValueError(
            f"{model.info.name}: dense maps run a single-view patch classifier; a multimodal model has none"
        )
    if not isinstance(model, Classifier):
        raise ValueError(f"dense maps run a single-view patch classifier (a Classifier), got {type(model).__name__}")
    name = model.info.name
    if model.training:
        raise ValueError(
            f"{name} is in training mode: call model.eval() before computing a dense map "
            f"(dropout and batch-norm batch statistics would make every window different)"
        )
    num_classes = getattr(model, "num_classes", 0)
    if num_classes < 2 or not 0 <= target_class < num_classes:
        raise ValueError(
            f"{name}: target_class {target_class} needs a classifier with more than "
            f"{target_class} classes (num_classes={num_classes}) for the softmax"
        )
    return model


def _as_batch(model: Classifier, image: Tensor, window: int) -> Tensor:
    if (
        not isinstance(image, Tensor)
        or not image.is_floating_point()
        or image.dim() not in (3, 4)
        or (image.dim() == 4 and image.shape[0] != 1)
    ):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{model.info.name}: the image must be a float (C, H, W) or (1, C, H, W) tensor, got {shape}")
    image = image if image.dim() == 4 else image[None]
    if image.shape[1] != model.expected_input_channels:
        raise ValueError(
            f"{model.info.name} (in_chans={model.in_chans}) expects "
            f"{model.expected_input_channels}-channel images, got {tuple(image.shape)}"
        )
    if min(image.shape[-2:]) < window:
        raise ValueError(f"{model.info.name}: image {tuple(image.shape[-2:])} is smaller than one {window}-px window")
    return image


def _device(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


def _head_probs(model: Classifier, features: Tensor, k: int, batch_windows: int, target_class: int) -> Tensor:
    """(1, C, h, w) features -> (h - k + 1, w - k + 1) probabilities of every k x k window."""
    fc = model.get_classifier()
    if model.info.gap_fc and isinstance(model.pre_logits, nn.Identity) and isinstance(fc, nn.Linear):
        pooled = F.avg_pool2d(features, k, stride=1)  # the global average pool of each window
        logits = F.conv2d(pooled, fc.weight[:, :, None, None], fc.bias)  # the FC as a 1x1 convolution
        return logits.softmax(1)[0, target_class]
    windows = features[0].unfold(1, k, 1).unfold(2, k, 1)  # (C, h', w', k, k), a view: nothing copied
    h, w = windows.shape[1:3]
    out = torch.empty(h * w, dtype=features.dtype, device=features.device)
    for start in range(0, h * w, batch_windows):
        index = torch.arange(start, min(h * w, start + batch_windows), device=features.device)
        batch = windows[:, index // w, index % w].permute(1, 0, 2, 3)  # (n, C, k, k)
        out[start : start + len(index)] = model.forward_head(batch).softmax(1)[:, target_class]
    return out.view(h, w)


def _span(first: int, stop: int, geo: Geometry, window: int, halo: int, limit: int) -> tuple[int, int, int]:
    """Input px [lo, hi) for cells [first, stop) on one axis, and the feature cells to skip before them."""
    start, end = first * geo.stride, (stop - 1) * geo.stride + window  # the union of the cells' windows
    lo, hi = max(0, start - halo), min(limit, end + halo)
    return lo, hi, (start - lo) // geo.stride


def dense_map(
    model: nn.Module,
    image: Tensor,
    window: int,
    *,
    tile: int | None = None,
    halo: int = 0,
    batch_windows: int = 256,
    target_class: int = 1,
) -> DenseMap:
    """The patch classifier applied to every ``window``-px window at the network stride (paper 003).

    Args:
        model: a single-view ``Classifier`` in eval mode.
        image: (C, H, W) or (1, C, H, W) float tensor, normalised as the model expects,
            C = ``model.expected_input_channels``; it may stay on the CPU when the model is not.
        window: the patch side the classifier was trained on (its input_px); a multiple of s.
        tile: tile side in image px, >= ``window`` (rounded down to a multiple of s); None runs
            the trunk once over the whole image.
        halo: extra context px around each tile (a multiple of s; clipped to the image).
        batch_windows: feature windows per ``forward_head`` call for non-GAP heads.
        target_class: the class whose softmax probability is mapped.

    Returns:
        A ``DenseMap`` of ``((H - window) // s + 1, (W - window) // s + 1)`` cells.
    """
    model = _check_model(model, target_class)
    image = _as_batch(model, image, window)
    geo = trunk_geometry(model, window)
    s, k = geo.stride, geo.k
    if halo < 0 or halo % s:
        raise ValueError(f"{model.info.name}: halo {halo} px must be a non-negative multiple of the stride {s} px")
    if tile is not None and tile < window or batch_windows < 1:
        raise ValueError(
            f"{model.info.name}: tile ({tile} px) must hold one {window}-px window and batch_windows "
            f"({batch_windows}) must be >= 1"
        )
    H, W = image.shape[-2:]
    rows, cols = (H - window) // s + 1, (W - window) // s + 1
    cells = max(rows, cols) if tile is None else (max(window, tile // s * s) - window) // s + 1
    probs = np.empty((rows, cols), dtype=np.float32)
    device = _device(model)
    with torch.inference_mode():
        for r0 in range(0, rows, cells):
            r1 = min(rows, r0 + cells)
            y0, y1, skip_y = _span(r0, r1, geo, window, halo, H)
            for c0 in range(0, cols, cells):
                c1 = min(cols, c0 + cells)
                x0, x1, skip_x = _span(c0, c1, geo, window, halo, W)
                piece = image[..., y0:y1, x0:x1].to(device, torch.float32).contiguous()
                features = model.forward_features(piece)
                features = features[..., skip_y : skip_y + r1 - r0 + k - 1, skip_x : skip_x + c1 - c0 + k - 1]
                block = _head_probs(model, features, k, batch_windows, target_class)
                if block.shape != (r1 - r0, c1 - c0):
                    raise RuntimeError(
                        f"{model.info.name}: tile rows {y0}:{y1}, cols {x0}:{x1} gave "
                        f"{tuple(block.shape)} cells, expected {(r1 - r0, c1 - c0)} (s={s}, k={k})"
                    )
                probs[r0:r1, c0:c1] = block.float().cpu().numpy()
    return DenseMap(probs, s, window, (int(H), int(W)))


def sliding_window_map(
    model: nn.Module, image: Tensor, window: int, stride: int, *, batch: int = 64, target_class: int = 1
) -> DenseMap:
    """The explicit reference: every ``window`` crop at ``stride`` through the full model, ``batch`` at a time."""
    model = _check_model(model, target_class)
    image = _as_batch(model, image, window)
    if stride < 1 or batch < 1:
        raise ValueError(f"sliding_window_map: stride ({stride}) and batch ({batch}) must be >= 1")
    H, W = image.shape[-2:]
    crops = image[0].unfold(1, window, stride).unfold(2, window, stride)  # (C, rows, cols, window, window) view
    rows, cols = crops.shape[1:3]
    out = torch.empty(rows * cols)
    device = _device(model)
    with torch.inference_mode():
        for start in range(0, rows * cols, batch):
            index = torch.arange(start, min(rows * cols, start + batch))
            x = crops[:, index // cols, index % cols].permute(1, 0, 2, 3).to(device, torch.float32)
            out[start : start + len(index)] = model(x).softmax(1)[:, target_class].float().cpu()
    return DenseMap(out.view(rows, cols).numpy().astype(np.float32), stride, window, (int(H), int(W)))


def ensemble_dense_map(
    models: Sequence[nn.Module],
    image: Tensor,
    window: int,
    *,
    tile: int | None = None,
    halo: int = 0,
    batch_windows: int = 256,
    target_class: int = 1,
) -> tuple[DenseMap, np.ndarray]:
    """Mean dense map over ensemble members (paper 000) and the member spread (population std, ddof 0).

    Raises:
        ValueError: no members, or members with different network strides (different grids).
    """
    if not models:
        raise ValueError("ensemble_dense_map needs at least one model")
    members = [_check_model(model, target_class) for model in models]
    strides = [trunk_geometry(model, window).stride for model in members]
    if len(set(strides)) > 1:
        named = ", ".join(f"#{i} {m.info.name}: {s}" for i, (m, s) in enumerate(zip(members, strides, strict=True)))
        raise ValueError(
            f"ensemble members must share one network stride to share the dense-map grid of "
            f"{window}-px windows; strides: {named}"
        )
    maps = [
        dense_map(model, image, window, tile=tile, halo=halo, batch_windows=batch_windows, target_class=target_class)
        for model in members
    ]
    stack = np.stack([m.probs for m in maps])
    mean = DenseMap(stack.mean(0).astype(np.float32), maps[0].stride, window, maps[0].image_size)
    return mean, stack.std(0).astype(np.float32)
