"""Explanations: saliency maps and first-layer filters (paper 001), Directed Dream (paper 000).

Plain torch/numpy (captum for the gradients, matplotlib/Pillow for the pictures), no Ray.
"""

from .dream import DreamConfig, DreamFrame, DreamResult, directed_dream
from .dream_render import render_dream_frame, save_dream_frame, save_dream_gif
from .filters import filter_grid, first_layer_filters, save_filter_grid
from .saliency import saliency_map, save_saliency_png

__all__ = [
    "DreamConfig",
    "DreamFrame",
    "DreamResult",
    "directed_dream",
    "filter_grid",
    "first_layer_filters",
    "render_dream_frame",
    "saliency_map",
    "save_dream_frame",
    "save_dream_gif",
    "save_filter_grid",
    "save_saliency_png",
]
