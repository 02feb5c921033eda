"""Which map localizes a model, and one call that makes it: dense (paper 003), CAM (paper 004), Grad-CAM.

    dense    the patch classifier run fully convolutionally (``whole_image.localize_image``): needs
             a classifier trained on fixed-size windows (``data.crop`` patch or seed750)
    cam      the class activation map (``class_map``): needs every member to end in global average
             pooling + one FC (``ModelInfo.gap_fc``: ResNet, GoogLeNet, Inception-v3)
    gradcam  Grad-CAM (``class_map``): every single-view backbone

The default, per model: ``dense`` for patch classifiers (``data.crop=patch`` or
``data.task=mass_presence``, when a dense map is possible), otherwise ``cam`` where every member
is GAP+FC, otherwise ``gradcam``. A multimodal model (a CC+MLO pair in, one answer out) has no
map of one image: no method. The CLI (``mammo-ray localize --method``) and the served
``/v1/localize`` (field ``method``) both decide here, so they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from mammo_ray.config import Config
from mammo_ray.constants import CLASS_NAMES, Task
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.localize.class_map import localize_class_map
from mammo_ray.localize.whole_image import Localization, localize_image, window_geometry
from mammo_ray.models import as_view_model

__all__ = ["METHODS", "MethodUnavailable", "choose_method", "default_method", "localize", "map_label", "method_reasons"]

METHODS = ("dense", "cam", "gradcam")


class MethodUnavailable(ValueError):
    """The asked localization method cannot run on this model: ``method`` and ``reason`` say why."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"method {method!r} is not available for this model: {reason}")
        self.method, self.reason = method, reason


def method_reasons(models: Sequence[nn.Module], config: Config, spec: TransformSpec) -> dict[str, str]:
    """Per method, why this model cannot use it ("" when it can)."""
    if config.model.view_mode == "multimodal":
        why = "a multimodal model classifies CC+MLO pairs; a localization map is of one image"
        return {method: why for method in METHODS}
    reasons = {"dense": "", "cam": "", "gradcam": ""}
    try:
        window_geometry(config, spec)
    except ValueError as exc:
        reasons["dense"] = str(exc)
    infos = [as_view_model(m).info for m in models]
    not_gap = sorted({info.name for info in infos if not info.gap_fc})
    if not_gap:
        reasons["cam"] = (
            f"CAM (paper 004, Eq. 1) needs a network ending in global average pooling + one FC, "
            f"and {', '.join(not_gap)} does not (ModelInfo.gap_fc=False); use gradcam"
        )
    return reasons


def default_method(config: Config, reasons: dict[str, str]) -> str | None:
    """The method a model localizes with unless told otherwise (module docstring); None: none can."""
    patch_classifier = config.data.crop == "patch" or config.data.task == "mass_presence"
    if patch_classifier and not reasons["dense"]:
        return "dense"
    return next((m for m in ("cam", "gradcam") if not reasons[m]), None)


def choose_method(
    models: Sequence[nn.Module], config: Config, spec: TransformSpec, requested: str | None = None
) -> str:
    """``requested`` if the model can use it, else its default.

    Raises:
        ValueError: ``requested`` is not one of ``METHODS``.
        MethodUnavailable: the model cannot use ``requested`` (or any method, when None), with why.
    """
    if requested is not None and requested not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {requested!r}")
    reasons = method_reasons(models, config, spec)
    method = requested or default_method(config, reasons)
    if method is None:
        raise MethodUnavailable("dense", reasons["dense"])
    if reasons[method]:
        raise MethodUnavailable(method, reasons[method])
    return method


def map_label(method: str, config: Config) -> str:
    """What the heatmap shows, for titles and colour bars: "mass probability", "CAM of 'malignant' (relative)"."""
    positive = CLASS_NAMES[Task.parse(config.data.task)][1]
    if method == "dense":
        return f"{positive} probability"
    return f"{'CAM' if method == 'cam' else 'Grad-CAM'} of '{positive}' (relative)"


def localize(
    models: Sequence[nn.Module],
    spec: TransformSpec,
    config: Config,
    image: np.ndarray,
    *,
    method: str | None = None,
    flipped: bool = False,
    threshold: float = 0.5,
    tile: int | None = 1024,
    long_side: int | None = None,
    min_area: int = 1,
    max_boxes: int | None = 20,
) -> Localization:
    """A map of one whole mammogram by ``method`` (None: the model's default) and boxes above ``threshold``.

    ``tile`` applies to dense maps, ``long_side`` to class maps; both in network px.

    Raises:
        MethodUnavailable: the model cannot use ``method`` (the reason is in the message).
    """
    chosen = choose_method(models, config, spec, method)
    if chosen == "dense":
        return localize_image(
            models,
            spec,
            config,
            image,
            flipped=flipped,
            threshold=threshold,
            tile=tile,
            min_area=min_area,
            max_boxes=max_boxes,
        )
    return localize_class_map(
        models,
        spec,
        config,
        image,
        method=chosen,
        flipped=flipped,
        threshold=threshold,
        long_side=long_side,
        min_area=min_area,
        max_boxes=max_boxes,
    )
