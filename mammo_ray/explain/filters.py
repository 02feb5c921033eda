"""First-layer filter images (paper 001, section 5.5.2, Fig. 6; see docs/papers.md).

Paper 001 looks at the first conv layer's weights as a sanity check: smooth, noise-free
filters mean the network trained well, and on grayscale mammograms (replicated to RGB) an
ImageNet-initialised filter that turned grey has adapted. The first conv is the module
``model.info.first_conv`` names (for a multimodal model, in one branch: ``model.cc`` or
``model.mlo``). For a 9-channel model that conv sees the image plus the 8 DoG channels.

Grid layout (``filter_grid``). Every filter is min-max normalised on its own, jointly over its
input channels (so the relative weight of the channels stays visible), then tiled with a 1-px
white border:

    in_ch == 3   one RGB tile per filter, tiles in a near-square grid (paper 001's Fig. 6);
    in_ch == 1   one grayscale tile per filter, tiles in a near-square grid;
    otherwise    one grayscale row per filter, one tile per input channel (9-channel models:
                 column 0 is the image, columns 1..8 the DoG channels, finest sigma first).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid

BORDER_PX = 1
BORDER_VALUE = 1.0  # white, in the [0, 1] scale of the normalised filters


def first_layer_filters(model: nn.Module, branch: str = "cc") -> Tensor:
    """The first conv's weights, (out_ch, in_ch, kh, kw), detached on the CPU.

    Args:
        model: a ``Classifier`` or a ``MultiViewClassifier``.
        branch: for a multimodal model, the branch to read ("cc" or "mlo"); ignored otherwise.
    """
    net = model
    if getattr(model, "view_mode", "single") == "multimodal":
        if branch not in ("cc", "mlo"):
            raise ValueError(f"first_layer_filters: branch must be 'cc' or 'mlo', got {branch!r}")
        net = getattr(model, branch)
    info = getattr(net, "info", None)
    if info is None:
        raise ValueError(f"first_layer_filters: {type(net).__name__} has no ModelInfo (.info.first_conv)")
    conv = net.get_submodule(info.first_conv)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"first_layer_filters: {info.name}.{info.first_conv} is a {type(conv).__name__}, not a Conv2d")
    return conv.weight.detach().float().cpu().clone()


def _normalise_per_filter(weights: Tensor) -> Tensor:
    """Each filter min-max scaled to [0, 1] over (in_ch, kh, kw); a constant filter becomes 0.5."""
    flat = weights.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = high - low
    scaled = torch.where(
        span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.full_like(flat, 0.5)
    )
    return scaled.view_as(weights)


def filter_grid(weights: Tensor) -> np.ndarray:
    """Tile conv weights into one uint8 image (layout in the module docstring).

    Args:
        weights: (out_ch, in_ch, kh, kw), e.g. from ``first_layer_filters``.

    Returns:
        (H, W, 3) uint8 for in_ch == 3, else (H, W) uint8, where with ``n`` tiles across and
        ``m`` down, H = m * (kh + 1) + 1 and W = n * (kw + 1) + 1.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 4 or 0 in weights.shape:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"filter_grid: weights must be a non-empty (out_ch, in_ch, kh, kw) tensor, got {shape}")
    out_ch, in_ch, kh, kw = weights.shape
    scaled = _normalise_per_filter(weights.detach().float().cpu())
    if in_ch in (1, 3):
        tiles, per_row = scaled, math.ceil(math.sqrt(out_ch))
    else:
        tiles, per_row = scaled.reshape(out_ch * in_ch, 1, kh, kw), in_ch
    grid = make_grid(tiles, nrow=per_row, padding=BORDER_PX, pad_value=BORDER_VALUE)  # (3, H, W), 1 ch repeated
    image = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy() if in_ch == 3 else image[0].numpy()


def save_filter_grid(model: nn.Module, path: str | os.PathLike[str], *, scale: int = 8, branch: str = "cc") -> Path:
    """Write the first-layer filter grid of ``model`` as a PNG, each pixel ``scale`` x ``scale``.

    Returns the path; the PNG is ``filter_grid(...)`` upscaled by nearest neighbour, so its size
    is ``(W * scale, H * scale)``.
    """
    if scale < 1:
        raise ValueError(f"save_filter_grid: scale must be >= 1, got {scale}")
    grid = filter_grid(first_layer_filters(model, branch=branch))
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
