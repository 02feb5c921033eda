"""ImageNet weights from local files, first-conv channel adaptation, fine-tuning policies.

Nothing here downloads. ``pretrained`` is either a path to a torchvision state dict or the
word ``"imagenet"``, meaning torchvision's IMAGENET1K_V1 file in the torch hub cache,
``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub/checkpoints``), exactly where
``torchvision.models.resnet18(weights=...)`` would have cached it. A missing file raises
``PretrainedWeightsError`` naming the URL to fetch on a connected machine and the path to
put it at.

Fine-tuning policies (papers 001 and 004, see docs/papers.md) are plain functions over a model's layer groups
(``model.layer_groups()``: ordered early to late, the last one the new ``"head"``):
``param_groups`` builds optimizer groups with per-group LR multipliers and ``freeze``
stops gradients to whole groups.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import Tensor, nn

from .registry import HEAD_GROUP, get_model_info

if TYPE_CHECKING:
    from .views import ViewModel

IMAGENET = "imagenet"  # the `pretrained` value meaning "torchvision's ImageNet file from the hub cache"


class PretrainedWeightsError(FileNotFoundError):
    """Weights that are missing, unreadable, or not a state dict for this architecture."""


def weights_url(name: str) -> str:
    """URL of the torchvision ImageNet weights of a registered model (read from the enum, no download)."""
    spec = get_model_info(name).torchvision_weights
    if spec is None:
        raise PretrainedWeightsError(f"{name} has no torchvision ImageNet weights; train it from scratch")
    enum_name, member = spec.split(".")
    return getattr(getattr(torchvision.models, enum_name), member).url


def hub_cache_path(name: str) -> Path:
    """Where torch.hub keeps (and this package looks for) the ImageNet file of ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights_url(name).rsplit("/", 1)[-1]


def resolve_weights(name: str, pretrained: str | os.PathLike[str]) -> Path:
    """The file ``pretrained`` names for model ``name``; raises if it is not there."""
    if str(pretrained) == IMAGENET:
        path = hub_cache_path(name)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"ImageNet weights for {name} not found at {path}. Nothing is downloaded here: fetch "
                f"{weights_url(name)} on a connected machine and put it at {path} (the torch hub cache, "
                f"$TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}), "
                f"or pass the file's path as model.pretrained"
            )
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        hint = ""
        if get_model_info(name).torchvision_weights is not None:
            hint = f" (torchvision's ImageNet weights for {name}: {weights_url(name)})"
        raise PretrainedWeightsError(f"pretrained weights file for {name} not found: {path}{hint}")
    return path


def load_torchvision_weights(model: nn.Module, name: str, pretrained: str | os.PathLike[str]) -> Path:
    """Load a torchvision state dict into the *unwrapped* torchvision ``model``, strictly."""
    path = resolve_weights(name, pretrained)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download, an HTML error page, a pickle of a whole model
        raise PretrainedWeightsError(f"{path}: not a readable state dict for {name} ({exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: expected a torchvision state dict (name -> tensor) for {name}")
    expected = model.state_dict()
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "wrong shape": [k for k in expected if k in state and state[k].shape != expected[k].shape],
    }
    if any(problems.values()):  # a file for another architecture: say which keys, briefly
        detail = "; ".join(
            f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in problems.items() if keys
        )
        raise PretrainedWeightsError(f"{path} does not match torchvision's {name}: {detail}")
    model.load_state_dict(state)
    return path


def adapt_input_conv(conv: nn.Conv2d, in_chans: int, from_pretrained: bool) -> nn.Conv2d:
    """A copy of an RGB first conv that takes ``in_chans`` (1 or 9) channels.

    Pretrained (the kernels mean something):
        1: the sum of the RGB kernels, so a grayscale image gives exactly what the RGB model
           gives on that image replicated to 3 channels.
        9: channel 0 (the image) gets the RGB sum; the 8 DoG channels start at zero, so the
           adapted model initially computes what the 1-channel one does, and the DoG kernels
           are learned from there (their gradients are not zero).
    From scratch (random kernels): channel c takes RGB kernel c mod 3, scaled by sqrt(3 / in_chans)
    so the conv's output variance matches the model's own 3-channel initialisation.
    """
    if conv.in_channels == in_chans:
        return conv
    if conv.in_channels != 3 or conv.groups != 1 or in_chans not in (1, 9):
        raise ValueError(f"cannot adapt a {conv.in_channels}-channel conv to {in_chans} channels")
    weight = conv.weight.detach()
    if from_pretrained:
        rgb_sum = weight.sum(dim=1, keepdim=True)
        extra = weight.new_zeros(weight.shape[0], in_chans - 1, *weight.shape[2:])
        new_weight = torch.cat([rgb_sum, extra], dim=1)
    else:
        new_weight = weight[:, [c % 3 for c in range(in_chans)]] * math.sqrt(3 / in_chans)
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        _pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        dilation=_pair(conv.dilation),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(new_weight)
        if conv.bias is not None:
            assert new.bias is not None  # built with bias=True just above
            new.bias.copy_(conv.bias)
    return new


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D conv's (height, width) setting; torch types them as tuples of any length."""
    height, width = value
    return height, width


def _groups(model: ViewModel) -> list[tuple[str, list[str]]]:
    return [(group, list(prefixes)) for group, prefixes in model.layer_groups()]


def _in(param_name: str, prefixes: Iterable[str]) -> bool:
    # Whole path components only: "features.2" must not claim "features.21.weight".
    return any(param_name == p or param_name.startswith(p + ".") for p in prefixes)


def _check_groups(model: ViewModel, names: Iterable[str], what: str) -> None:
    known = [group for group, _ in _groups(model)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown layer group(s) {unknown}; this model's groups: {known}")


def trunk_groups(model: ViewModel) -> list[str]:
    """Layer group names, early to late, without the head."""
    return [group for group, _ in _groups(model) if group != HEAD_GROUP]


def fine_tune_multipliers(model: ViewModel, train_last: int, early_mult: float = 0.1) -> dict[str, float]:
    """LR multipliers: the last ``train_last`` trunk groups at 1.0, the earlier ones at ``early_mult``.

    Paper 001: GoogLeNet "shallow" = ``train_last=1`` (inception5b), "deeper" = 2 (5a and 5b);
    AlexNet = 0 (every pretrained layer x0.1, only the new FC at full rate).
    """
    trunk = trunk_groups(model)
    if not 0 <= train_last <= len(trunk):
        raise ValueError(f"train_last must be in [0, {len(trunk)}], got {train_last}")
    return {group: (1.0 if i >= len(trunk) - train_last else early_mult) for i, group in enumerate(trunk)}


def param_groups(
    model: ViewModel,
    base_lr: float,
    weight_decay: float,
    multipliers: Mapping[str, float] | None = None,
    head_weight_mult: float = 10.0,
    head_bias_mult: float = 20.0,
    default_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with per-layer-group learning rates (paper 001).

    Args:
        multipliers: LR multiplier per trunk group name; groups not named get ``default_mult``.
            The head is not named here: its weight and bias take ``head_weight_mult`` and
            ``head_bias_mult`` (paper 001: x10 / x20; paper 004: 20 / 20; from scratch: 1 / 1).
        weight_decay: L2 on every parameter (the papers' single L2 coefficient).

    Frozen parameters (``requires_grad=False``) are left out. Each group carries ``name`` and
    ``lr_mult`` keys beside ``params``, ``lr`` and ``weight_decay``.
    """
    multipliers = dict(multipliers or {})
    if HEAD_GROUP in multipliers:
        raise ValueError(
            f"param_groups: set the head's LR with head_weight_mult / head_bias_mult, not multipliers[{HEAD_GROUP!r}]"
        )
    _check_groups(model, multipliers, "param_groups")
    groups = _groups(model)
    buckets: dict[str, list[nn.Parameter]] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g for g, prefixes in groups if _in(pname, prefixes)), None)
        if group is None:
            raise ValueError(f"param_groups: parameter {pname!r} is in no layer group of {type(model).__name__}")
        if group == HEAD_GROUP:
            group = f"{HEAD_GROUP}.{'bias' if pname.endswith('bias') else 'weight'}"
        buckets.setdefault(group, []).append(param)
    result = []
    for group, params in buckets.items():
        if group == f"{HEAD_GROUP}.weight":
            mult = head_weight_mult
        elif group == f"{HEAD_GROUP}.bias":
            mult = head_bias_mult
        else:
            mult = multipliers.get(group, default_mult)
        result.append(dict(name=group, params=params, lr=base_lr * mult, lr_mult=mult, weight_decay=weight_decay))
    return result


def freeze(model: ViewModel, groups: Iterable[str]) -> list[str]:
    """Stop gradients to every parameter of the named layer groups (paper 004: frozen trunk).

    Only ``requires_grad`` changes: BatchNorm running statistics in frozen groups still update
    in ``train()`` mode unless the caller puts those modules in ``eval()``. Returns the names of
    the parameters frozen.
    """
    groups = list(groups)
    _check_groups(model, groups, "freeze")
    prefixes = [p for group, ps in _groups(model) if group in groups for p in ps]
    frozen = []
    for pname, param in model.named_parameters():
        if _in(pname, prefixes):
            param.requires_grad_(False)
            frozen.append(pname)
    return frozen
