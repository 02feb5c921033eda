"""Models: the registry, the backbones, the DoG input bank, view modes, pretrained weights.

Plain PyTorch, no Ray. ``create_model(name, ...)`` builds one network (a ``Classifier``);
``create_view_model`` / ``build_view_model`` build it in a view mode (paper 000).
"""

from . import backbones  # noqa: F401  (registers the models)
from .backbones import Classifier
from .dog import DOG_SIGMAS, DoGBank
from .pretrained import (
    IMAGENET,
    PretrainedWeightsError,
    fine_tune_multipliers,
    freeze,
    hub_cache_path,
    param_groups,
    trunk_groups,
    weights_url,
)
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    UnknownModelError,
    create_model,
    get_model_info,
    list_models,
    register_model,
)
from .views import VIEW_MODES, MultiViewClassifier, ViewModel, as_view_model, build_view_model, create_view_model

__all__ = [
    "DOG_SIGMAS",
    "IMAGENET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIEW_MODES",
    "Classifier",
    "DoGBank",
    "ModelInfo",
    "MultiViewClassifier",
    "PretrainedWeightsError",
    "UnknownModelError",
    "ViewModel",
    "as_view_model",
    "build_view_model",
    "create_model",
    "create_view_model",
    "fine_tune_multipliers",
    "freeze",
    "get_model_info",
    "hub_cache_path",
    "list_models",
    "param_groups",
    "register_model",
    "trunk_groups",
    "weights_url",
]
