"""Saliency maps (paper 001, section 5.5.1, after Simonyan et al. 2013; see docs/papers.md).

The saliency of a pixel is the magnitude of the gradient of the (pre-softmax) class score with
respect to that input pixel, maximised over the input channels: one (H, W) map per image. The
gradient comes from captum's ``Saliency``. The input is what the model takes
(``model.expected_input_channels``): for a 9-channel model the 1-channel image, so the
gradient flows back through the DoG bank to the pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from captum.attr import Saliency
from torch import Tensor, nn

from mammo_ray.constants import DISCLAIMER


def _is_multimodal(model: nn.Module) -> bool:
    return getattr(model, "view_mode", "single") == "multimodal"


def _check_image_batch(x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"saliency_map: {what} must be a (B, C, H, W) tensor, got {shape}")
    return x


def saliency_map(
    model: nn.Module, x: Tensor | Sequence[Tensor], target_class: int = 1
) -> Tensor | tuple[Tensor, Tensor]:
    """|d score(target_class) / d x|, maximised over channels (paper 001, section 5.5.1).

    The model is put in eval mode for the call (no dropout, BatchNorm on running statistics)
    and its mode restored afterwards; no parameter gradient is accumulated.

    Args:
        model: a ``Classifier`` (single or parallel view mode) or a ``MultiViewClassifier``.
        x: a (B, C, H, W) batch for a Classifier, or a (cc, mlo) pair of batches. A pair is
            required for a multimodal model; for a Classifier each view of the pair goes through
            the shared network on its own (parallel mode).
        target_class: index of the class score to differentiate (1 = malignant).

    Returns:
        (B, H, W) non-negative maps, or a (cc map, mlo map) pair when ``x`` was a pair.
    """
    pair = not isinstance(x, Tensor)
    if pair and len(x) != 2:
        raise ValueError(f"saliency_map: expected a (B, C, H, W) tensor or a (cc, mlo) pair, got {len(x)} tensors")
    if _is_multimodal(model) and not pair:
        raise ValueError("saliency_map: a multimodal model takes a (cc, mlo) pair of (B, C, H, W) tensors")
    views = (
        tuple(_check_image_batch(v, f"view {i}") for i, v in enumerate(x)) if pair else (_check_image_batch(x, "x"),)
    )
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and not 0 <= target_class < num_classes:
        raise ValueError(f"saliency_map: target_class {target_class} is not a class of a {num_classes}-class model")
    was_training = model.training
    model.eval()
    try:
        if _is_multimodal(model):
            grads = Saliency(lambda cc, mlo: model(cc, mlo)).attribute(
                tuple(v.detach().clone().requires_grad_(True) for v in views), target=target_class, abs=True
            )
        else:
            saliency = Saliency(model)
            grads = tuple(
                saliency.attribute(v.detach().clone().requires_grad_(True), target=target_class, abs=True)
                for v in views
            )
    finally:
        model.train(was_training)
    maps = tuple(g.amax(dim=1).detach() for g in grads)
    return maps if pair else maps[0]


def _as_2d(array: Tensor | np.ndarray, what: str) -> np.ndarray:
    out = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    out = np.squeeze(out)
    if out.ndim == 3:  # (C, H, W): show the channel mean (RGB replicas of a grayscale image)
        out = out.mean(axis=0)
    if out.ndim != 2:
        raise ValueError(f"save_saliency_png: {what} must be (H, W) (or (C, H, W)), got shape {np.shape(array)}")
    return out.astype(np.float32)


def save_saliency_png(
    image: Tensor | np.ndarray,
    saliency: Tensor | np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str = "Saliency map",
    dpi: int = 100,
) -> Path:
    """Write the image and the saliency overlaid on it side by side, with the disclaimer.

    Args:
        image: (H, W) image (network input space is fine: it is min-max scaled for display).
        saliency: (H, W) map from ``saliency_map`` (e.g. ``maps[0]``).
        path: the PNG to write (parent folders are created).
        title: figure title.
        dpi: resolution of the figure (each panel is 3 inches).
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    img, sal = _as_2d(image, "image"), _as_2d(saliency, "saliency")
    if img.shape != sal.shape:
        raise ValueError(f"save_saliency_png: image {img.shape} and saliency {sal.shape} differ in shape")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 3.4), dpi=dpi)
    axes = fig.subplots(1, 2)
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(img, cmap="gray")
    axes[1].imshow(sal, cmap="hot", alpha=0.6, vmin=0.0, vmax=float(sal.max()) or 1.0)
    axes[1].set_title("saliency |d score / d x|", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.01, DISCLAIMER, ha="center", va="bottom", fontsize=6)
    fig.savefig(path, format="png")
    return path
