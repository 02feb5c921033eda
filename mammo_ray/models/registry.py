"""Model registry: every backbone under one name, with the metadata tools need.

torchvision/timm style: a builder registers under an explicit name (a duplicate name is
an error), ``create_model(name, **kwargs)`` drops kwargs left unset (None) so a CLI or
config default never overrides a model default, and ``get_model_info(name)`` tells
``localize/`` which layer CAM hooks, ``train/`` which parameters form which fine-tuning
group, and ``serve/`` what input the model expects, without hard-coding ``"layer4"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backbones import Classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_GROUP = "head"  # the last layer group: the new classifier (fine-tuned with its own LR multipliers)
IN_CHANS = (1, 3, 9)  # 9 = grayscale image + 8 Difference-of-Gaussians channels (paper 000)

LayerGroups = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is, in the module paths of the wrapped ``Classifier``.

    Every path is relative to the model returned by ``create_model`` (for a multimodal
    model, relative to each branch: ``model.cc`` / ``model.mlo``).
    """

    name: str
    input_size: int  # side the papers train and evaluate at (299 for inception_v3)
    min_input_size: int  # smallest side the forward pass accepts
    num_features: int  # channels of the forward_features map
    cam_target_layer: str  # module whose output IS forward_features(x): hook it for CAM / Grad-CAM
    first_conv: str  # the conv adapted to 1 or 9 input channels
    layer_groups: LayerGroups  # (group, module-path prefixes), early to late; last is ("head", (classifier,))
    gap_fc: bool  # ends in global average pooling + one FC, so CAM = sum_i w_i f_i applies as-is (paper 004)
    classifier: str = "fc"  # the final nn.Linear, replaced by reset_classifier
    torchvision_weights: str | None = None  # e.g. "ResNet18_Weights.IMAGENET1K_V1"; None: no ImageNet weights
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation the ImageNet weights expect (RGB)
    std: tuple[float, float, float] = IMAGENET_STD
    paper: str = ""  # where the architecture (or its use here) comes from

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(group for group, _ in self.layer_groups)


Builder = Callable[..., "Classifier"]
_MODELS: dict[str, tuple[Builder, ModelInfo]] = {}


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists the registered names."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def register_model(name: str, info: ModelInfo) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(*, in_chans, num_classes, dropout, pretrained, **kwargs)``.

    Raises:
        ValueError: ``name`` is already registered, or ``info.name`` differs from ``name``.
    """
    if info.name != name:
        raise ValueError(f"register_model({name!r}): info.name is {info.name!r}")
    if not info.layer_groups or info.layer_groups[-1] != (HEAD_GROUP, (info.classifier,)):
        raise ValueError(
            f"register_model({name!r}): the last layer group must be ({HEAD_GROUP!r}, ({info.classifier!r},))"
        )

    def decorator(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name][0].__qualname__})")
        _MODELS[name] = (builder, info)
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def get_model_info(name: str) -> ModelInfo:
    """Metadata of a registered model; ``UnknownModelError`` lists the registered names."""
    if name not in _MODELS:
        raise UnknownModelError(name)
    return _MODELS[name][1]


def create_model(
    name: str,
    *,
    in_chans: int | None = None,
    num_classes: int | None = None,
    dropout: float | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: object,
) -> Classifier:
    """Build a registered model as a ``Classifier`` (see ``backbones.Classifier``).

    Arguments left at None are not passed on, so the builder's defaults apply:
    ``in_chans=3, num_classes=2, dropout=0.5``, trained from scratch.

    Args:
        name: a name from ``list_models()``.
        in_chans: channels the first conv sees: 1 (grayscale), 3 (grayscale replicated to RGB,
            or RGB) or 9 (grayscale + 8 fixed DoG channels, paper 000). A 9-channel model holds
            the DoG bank itself and expects a 1-channel input: ``model.expected_input_channels``
            says what the caller must feed.
        num_classes: outputs of the new classifier.
        dropout: dropout probability right before the final FC (and between fc6/fc7 for
            AlexNet/VGG16).
        pretrained: a local torchvision state-dict file, or ``"imagenet"`` for the torchvision
            ImageNet file in the torch hub cache (``torch.hub.get_dir()/checkpoints``). Nothing
            is ever downloaded; a missing file raises ``PretrainedWeightsError`` naming the URL
            and the place to put it.
        **kwargs: builder-specific options (e.g. ``pool_size`` for levynet); None values dropped.
    """
    if name not in _MODELS:
        raise UnknownModelError(name)
    if in_chans is not None and in_chans not in IN_CHANS:
        raise ValueError(f"{name}: in_chans must be one of {IN_CHANS}, got {in_chans!r}")
    builder, _ = _MODELS[name]
    given = dict(in_chans=in_chans, num_classes=num_classes, dropout=dropout, pretrained=pretrained, **kwargs)
    return builder(**{key: value for key, value in given.items() if value is not None})
