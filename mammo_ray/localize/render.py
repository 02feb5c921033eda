"""Pictures of localisation results: a heatmap overlay with boxes, as PNG or base64 PNG."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.crops import resize
from mammo_ray.localize.findings import Finding


def _display(image: np.ndarray, heat: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray, float]:
    factor = min(1.0, max_side / max(image.shape))
    size = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
    return resize(image, size), resize(heat, size), factor


def overlay_figure(
    image: np.ndarray,
    heat: np.ndarray,
    boxes: Sequence[Finding],
    *,
    title: str = "",
    max_side: int = 1024,
    alpha: float = 0.45,
    label: str = "mass probability",
):
    """Grayscale image, the heatmap on top (0..1, jet; ``label`` on the colour bar), and each box with its score.

    A ``matplotlib.figure.Figure`` of its own, never pyplot: pyplot keeps one global registry of
    figures, and the Serve replica renders overlays of concurrent requests in threads."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if heat.shape != image.shape:
        raise ValueError(f"heatmap shape {heat.shape} differs from image shape {image.shape}")
    shown, shown_heat, factor = _display(image, heat, max_side)
    h, w = shown.shape
    fig = Figure(figsize=(6 * w / max(h, w) + 1.2, 6 * h / max(h, w) + 0.6), dpi=120)
    ax = fig.add_subplot()
    lo, hi = np.percentile(shown, [0.5, 99.5])
    ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    layer = ax.imshow(shown_heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha)
    for box in boxes:
        ax.add_patch(
            Rectangle(
                (box.x0 * factor, box.y0 * factor),
                (box.x1 - box.x0) * factor,
                (box.y1 - box.y0) * factor,
                fill=False,
                edgecolor="white",
                linewidth=1.5,
            )
        )
        ax.text(
            box.x0 * factor,
            box.y0 * factor - 2,
            f"{box.score:.2f}",
            color="white",
            fontsize=8,
            va="bottom",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"},
        )
    fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.text(0.01, 0.005, DISCLAIMER, fontsize=6, color="0.3")
    return fig


def save_overlay(
    image: np.ndarray,
    heat: np.ndarray,
    boxes: Sequence[Finding],
    path: str | Path,
    *,
    title: str = "",
    max_side: int = 1024,
    label: str = "mass probability",
) -> Path:
    fig = overlay_figure(image, heat, boxes, title=title, max_side=max_side, label=label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def overlay_base64(
    image: np.ndarray,
    heat: np.ndarray,
    boxes: Sequence[Finding],
    *,
    title: str = "",
    max_side: int = 768,
    label: str = "mass probability",
) -> str:
    """The overlay as a base64 PNG string (for JSON replies)."""
    fig = overlay_figure(image, heat, boxes, title=title, max_side=max_side, label=label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def grayscale_png(image: np.ndarray, *, max_side: int = 1024) -> tuple[bytes, float]:
    """The image alone as an 8-bit grayscale PNG, at most ``max_side`` pixels on its long side, and the
    factor from the image's pixels to the PNG's. Its window is the 0.5th to the 99.5th percentile, so a
    few saturated pixels do not wash out the breast. No matplotlib: Pillow writes it."""
    from PIL import Image

    factor = min(1.0, max_side / max(image.shape))
    size = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
    small = resize(np.asarray(image, dtype=np.float32), size)
    lo, hi = np.percentile(small, (0.5, 99.5))
    scaled = np.clip((small - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    buf = io.BytesIO()
    Image.fromarray(np.round(scaled * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue(), factor
