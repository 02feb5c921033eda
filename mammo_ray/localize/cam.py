"""Class activation maps (paper 004, section III-D; see docs/papers.md) and Grad-CAM, for every registered backbone.

CAM. Paper 004 feeds a full mammogram to the fine-tuned ResNet patch classifier and projects
the output-layer weights back onto the last conv feature maps f_i (its Eq. 1):

    CAM = sum_i w_i f_i,   w = the final FC's row for the target class.

That needs a network that ends in global average pooling + one FC (``ModelInfo.gap_fc``:
ResNet-18/50, GoogLeNet, Inception-v3); the bias and the 1/(h w) of the pooling are left out,
as in the paper, so CAM is in "logit per unit of feature" units, not a probability.

Grad-CAM (Selvaraju et al.) works for every head, including the fc6/fc7 MLPs of AlexNet/VGG16
and LevyNet: captum's ``LayerGradCam`` on ``ModelInfo.cam_target_layer`` (the module whose
output is ``forward_features(x)``; checked on each call), weights each channel by its
spatially averaged gradient and applies a ReLU. For a GAP+FC model Grad-CAM is exactly
``relu(CAM) / (h w)``.

Multimodal models (``MultiViewClassifier``, paper 000) take a ``(cc, mlo)`` pair and return a
pair of maps, one per branch: CAM splits the joint FC row into its CC and MLO halves; Grad-CAM
differentiates the joint logit with respect to each branch's feature map.

Maps come out at feature resolution, (B, h, w); ``upsample_map`` and ``normalize_map`` put
them on the image grid and in [0, 1] for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn

from mammo_ray.models import Classifier, MultiViewClassifier, ViewModel

METHODS = ("auto", "cam", "gradcam")

Views = Tensor | Sequence[Tensor]
Maps = Tensor | tuple[Tensor, Tensor]


def _name(model: nn.Module) -> str:
    info = getattr(model, "info", None)
    return info.name if info is not None else type(model).__name__


def _views(model: nn.Module, x: Views) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor) or len(x) != 2:
        raise ValueError(
            f"{_name(model)} is a multimodal model: pass a (cc, mlo) pair of (B, C, H, W) tensors, "
            f"got {type(x).__name__}"
        )
    return x[0], x[1]


def _image_batch(model: nn.Module, x: Views) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{_name(model)} is a single-view model: pass one (B, C, H, W) tensor, got {type(x).__name__}")
    return x


def _check_target(model: nn.Module, target_class: int) -> None:
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError(f"{_name(model)} has no classifier (num_classes={num_classes}): a class map needs logits")
    if not 0 <= target_class < num_classes:
        raise ValueError(f"{_name(model)}: target_class {target_class} is out of range for {num_classes} classes")


def _weighted_sum(model: nn.Module, weight: Tensor, features: Tensor) -> Tensor:
    if weight.shape[0] != features.shape[1]:
        raise ValueError(
            f"{_name(model)}: the classifier row has {weight.shape[0]} weights but the feature map "
            f"{tuple(features.shape)} has {features.shape[1]} channels"
        )
    return torch.einsum("c,bchw->bhw", weight.to(features.dtype), features)


def class_activation_map(model: ViewModel, x: Views, target_class: int = 1) -> Maps:
    """CAM = sum_i w_i f_i over ``model.forward_features(x)`` (paper 004, Eq. 1).

    Args:
        model: a ``Classifier`` (or a multimodal ``MultiViewClassifier``) whose ``info.gap_fc``
            is True. Put it in eval mode first if its trunk has batch norm.
        x: (B, expected_input_channels, H, W); a (cc, mlo) pair for a multimodal model.
        target_class: the class whose FC row weights the feature maps (1: malignant / mass).

    Returns:
        (B, h, w) at feature resolution; a (cc map, mlo map) pair for a multimodal model.

    Raises:
        ValueError: the model's head is not global average pooling + one FC (use ``grad_cam``),
            it has no classifier, or ``target_class`` is out of range.
    """
    info = model.info
    if not info.gap_fc:
        raise ValueError(
            f"{info.name}: CAM (paper 004, Eq. 1) needs a network ending in global average pooling + "
            f"one FC, and {info.name}'s head is not (ModelInfo.gap_fc=False); use grad_cam instead"
        )
    _check_target(model, target_class)
    fc = model.get_classifier()
    assert isinstance(fc, nn.Linear)  # num_classes > 0 (checked just above): reset_classifier made an nn.Linear
    weight = fc.weight[target_class].detach()
    with torch.no_grad():
        if isinstance(model, MultiViewClassifier):
            f_cc, f_mlo = model.forward_features(_views(model, x))
            n_cc = f_cc.shape[1]  # the joint FC sees [GAP(cc), GAP(mlo)]
            return _weighted_sum(model, weight[:n_cc], f_cc), _weighted_sum(model, weight[n_cc:], f_mlo)
        return _weighted_sum(model, weight, model.forward_features(_image_batch(model, x)))


def _target_layer(branch: Classifier) -> nn.Module:
    path = branch.info.cam_target_layer
    try:
        return branch.get_submodule(path)
    except AttributeError as error:
        raise ValueError(
            f"{branch.info.name}: ModelInfo.cam_target_layer {path!r} is not a submodule of the model"
        ) from error


def _layer_grad_cam(
    model: ViewModel, forward: nn.Module, branch: Classifier, inputs: tuple[Tensor, ...], target_class: int
) -> Tensor:
    """captum LayerGradCam on ``branch``'s CAM layer, checking that layer's output is forward_features."""
    layer = _target_layer(branch)
    seen: dict[str, Tensor] = {}

    def keep(key: str):
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            seen[key] = output.detach()

        return hook

    hooks = [layer.register_forward_hook(keep("layer"))]
    trunk = getattr(branch, "features", None)  # forward_features = features(input_layer(x)) in a Classifier
    if isinstance(trunk, nn.Module):
        hooks.append(trunk.register_forward_hook(keep("features")))
    # Inputs that require grad keep the layer in the autograd graph even if the trunk is frozen.
    inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
    try:
        with torch.enable_grad():
            maps = LayerGradCam(forward, layer).attribute(
                inputs if len(inputs) > 1 else inputs[0], target=target_class, relu_attributions=True
            )
    finally:
        for handle in hooks:
            handle.remove()
    if "features" in seen and not (
        seen["layer"].shape == seen["features"].shape and torch.equal(seen["layer"], seen["features"])
    ):
        raise ValueError(
            f"{_name(model)}: the output of cam_target_layer {branch.info.cam_target_layer!r} "
            f"{tuple(seen['layer'].shape)} is not the forward_features map "
            f"{tuple(seen['features'].shape)}; fix ModelInfo.cam_target_layer"
        )
    return maps.detach()[:, 0]


def grad_cam(model: ViewModel, x: Views, target_class: int = 1) -> Maps:
    """Grad-CAM on ``ModelInfo.cam_target_layer``, with the ReLU (captum ``LayerGradCam``).

    Works for every registered backbone and in_chans (a 9-channel model takes its 1-channel
    input; the DoG bank sits before the trunk). The model's mode is left as it is: call
    ``model.eval()`` first so dropout and batch norm behave as at test time.

    Args:
        model: a ``Classifier``, or a ``MultiViewClassifier`` (multimodal).
        x: (B, expected_input_channels, H, W), H, W >= ``info.min_input_size``; a (cc, mlo)
            pair for a multimodal model.
        target_class: the logit differentiated.

    Returns:
        Non-negative (B, h, w) at feature resolution; for a multimodal model a (cc, mlo) pair,
        each the Grad-CAM of the joint logit on that branch's feature map.

    Raises:
        ValueError: no classifier, ``target_class`` out of range, or ``cam_target_layer`` is
            missing or is not the layer that produces ``forward_features``.
    """
    _check_target(model, target_class)
    if isinstance(model, MultiViewClassifier):
        views = _views(model, x)
        return (
            _layer_grad_cam(model, model, model.cc, views, target_class),
            _layer_grad_cam(model, model, model.mlo, views, target_class),
        )
    return _layer_grad_cam(model, model, model, (_image_batch(model, x),), target_class)


def cam(model: ViewModel, x: Views, target_class: int = 1, method: str = "auto") -> Maps:
    """A class map: ``"cam"`` (paper 004), ``"gradcam"``, or ``"auto"`` (CAM where ``info.gap_fc``)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {METHODS}")
    if method == "auto":
        method = "cam" if model.info.gap_fc else "gradcam"
    return (class_activation_map if method == "cam" else grad_cam)(model, x, target_class)


def upsample_map(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of a (B, h, w) or (h, w) map; the rank is kept."""
    if maps.dim() not in (2, 3):
        raise ValueError(f"upsample_map expects a (B, h, w) or (h, w) map, got shape {tuple(maps.shape)}")
    height, width = (size, size) if isinstance(size, int) else size
    batch = maps if maps.dim() == 3 else maps[None]
    out = F.interpolate(batch[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return out if maps.dim() == 3 else out[0]


def normalize_map(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-map min-max scaling of a (B, h, w) or (h, w) map to [0, 1]; a constant map gives zeros."""
    if maps.dim() not in (2, 3):
        raise ValueError(f"normalize_map expects a (B, h, w) or (h, w) map, got shape {tuple(maps.shape)}")
    flat = (maps if maps.dim() == 3 else maps[None]).flatten(1).float()
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    out = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view(maps.shape)
