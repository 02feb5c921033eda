"""Frames, GIF and PNG of a Directed Dream (paper 000, Fig. 4; see docs/papers.md).

Paper 000's Fig. 4 is a video: each frame shows, side by side, the image, the most recent
saliency map added in the gradient ascent, and the Directed Dream so far. Here one row per
view (CC above MLO for an exam), three panels of ``PANEL_PX`` x ``PANEL_PX`` each:

    image      x_t (channel mean), gray, fixed range [-clip_x, clip_x] so frames compare
    saliency   |dy/dx| of the step, hot, scaled to its own maximum (each step's map is noisy)
    dream      x_t - x_0 (channel mean), diverging (red up, blue down), centred at 0, one
               symmetric range per view for the whole run

The title carries the step and the target probability; the disclaimer sits at the bottom. A
frame is ``3 * PANEL_PX`` wide and ``rows * PANEL_PX + MARGIN_PX`` high. Rendering uses a bare
matplotlib ``Figure`` (no pyplot state); Pillow writes the GIF.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from mammo_ray.constants import DISCLAIMER
from mammo_ray.explain.dream import DreamResult

DPI = 80
PANEL_INCHES = 2.0
TITLE_INCHES, FOOTER_INCHES = 0.35, 0.2
PANEL_PX = round(PANEL_INCHES * DPI)  # 160
MARGIN_PX = round((TITLE_INCHES + FOOTER_INCHES) * DPI)  # 44
PANELS = ("image", "saliency", "dream")


def _view_indices(result: DreamResult, view: int | str) -> list[int]:
    names = result.view_names
    if view == "both":
        return list(range(len(names)))
    if isinstance(view, str) and view.upper() in names:
        return [names.index(view.upper())]
    if isinstance(view, int) and not isinstance(view, bool) and 0 <= view < len(names):
        return [view]
    raise ValueError(f"dream view {view!r}: expected 'both', an index below {len(names)} or one of {list(names)}")


def render_dream_frame(result: DreamResult, step: int = -1, *, view: int | str = "both", index: int = 0) -> np.ndarray:
    """One frame as an RGB uint8 array (rows * PANEL_PX + MARGIN_PX, 3 * PANEL_PX, 3).

    Args:
        result: from ``directed_dream``.
        step: which frame (0 = the input, -1 = the last).
        view: "both" (every view, one row each), a view index, or a view name ("CC", "MLO").
        index: which sample of the batch.
    """
    frame = result.frames[step]
    batch = frame.score.shape[0]
    if not 0 <= index < batch:
        raise ValueError(f"dream sample index {index} out of range for a batch of {batch}")
    rows = _view_indices(result, view)
    height_in = len(rows) * PANEL_INCHES + TITLE_INCHES + FOOTER_INCHES
    fig = Figure(figsize=(3 * PANEL_INCHES, height_in), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    clip = result.config.clip_x
    for row, v in enumerate(rows):
        extent = max(float(f.dream[v][index].abs().max()) for f in result.frames) or 1.0
        sal = frame.saliency[v][index].numpy()
        panels = (  # (array, colormap, vmin, vmax)
            (frame.images[v][index].mean(0).numpy(), "gray", -clip, clip),
            (sal, "hot", 0.0, float(sal.max()) or 1.0),
            (frame.dream[v][index].mean(0).numpy(), "RdBu_r", -extent, extent),
        )
        bottom = (FOOTER_INCHES + (len(rows) - 1 - row) * PANEL_INCHES) / height_in
        for col, (array, cmap, vmin, vmax) in enumerate(panels):
            ax = fig.add_axes((col / 3, bottom, 1 / 3, PANEL_INCHES / height_in))
            ax.imshow(array, interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_axis_off()
            ax.text(
                0.02,
                0.98,
                f"{result.view_names[v]} {PANELS[col]}",
                transform=ax.transAxes,
                fontsize=6,
                va="top",
                ha="left",
                color="black",
                bbox=dict(facecolor="white", alpha=0.7, pad=1, lw=0),
            )
    target = result.config.target
    fig.suptitle(
        f"Directed Dream towards {target}: step {frame.step}/{len(result.frames) - 1}, "
        f"P({target}) = {float(frame.score[index]):.3f}",
        fontsize=8,
        y=1 - 0.05 * TITLE_INCHES / height_in,
    )
    fig.text(0.5, 0.02 * FOOTER_INCHES / height_in, DISCLAIMER, ha="center", va="bottom", fontsize=5)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_dream_gif(
    result: DreamResult, path: str | os.PathLike[str], *, view: int | str = "both", index: int = 0, fps: float = 5.0
) -> Path:
    """Write every frame (``config.steps + 1``) as a looping GIF at ``fps`` frames per second."""
    if fps <= 0:
        raise ValueError(f"save_dream_gif: fps must be > 0, got {fps}")
    images = [Image.fromarray(render_dream_frame(result, t, view=view, index=index)) for t in range(len(result.frames))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Consecutive frames always differ (the title shows the step), so Pillow keeps every one.
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def save_dream_frame(
    result: DreamResult, path: str | os.PathLike[str], *, step: int = -1, view: int | str = "both", index: int = 0
) -> Path:
    """Write one frame (by default the last: the finished dream) as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_dream_frame(result, step, view=view, index=index)).save(path, format="PNG")
    return path
