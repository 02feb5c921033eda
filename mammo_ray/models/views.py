"""The view modes of paper 000 (section 2.2, Fig. 2; see docs/papers.md) behind one interface.

    single      one view per sample: the ``Classifier`` itself; ``model(x)``, x (B, C, H, W).
    parallel    one network, weights shared by CC and MLO: the same ``Classifier`` (training
                feeds CC and MLO crops as separate samples, so ``model(x)`` as in single); at test
                ``model.predict_exam(cc, mlo)`` averages the two softmaxes. Best in paper 000.
    multimodal  ``MultiViewClassifier``: two independent conv branches (CC, MLO), their
                features concatenated, one FC head with dropout; ``model((cc, mlo))`` or
                ``model(cc, mlo)``, each (B, C, H, W).

Every view model has ``view_mode``, ``info``, ``in_chans``, ``expected_input_channels``,
``num_classes``, ``forward_features``, ``forward_head``, ``get_classifier``,
``reset_classifier``, ``layer_groups`` and ``predict_exam(cc, mlo) -> (B, num_classes)``
probabilities, so a training loop branches only on ``view_mode == "multimodal"`` to decide
whether a sample is one image or a (cc, mlo) pair.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Classifier
from .registry import HEAD_GROUP, create_model

VIEW_MODES = ("single", "parallel", "multimodal")


class MultiViewClassifier(nn.Module):
    """Paper 000's multimodal network: separate CC and MLO trunks, one joint head.

    Each branch is a full ``Classifier`` without its final FC (``reset_classifier(0)``); what is
    concatenated is each branch's pre-logit vector, ``forward_head(f, pre_logits=True)``: the
    globally average-pooled feature map for the GAP backbones (ResNet, GoogLeNet, Inception-v3),
    and the fc7 / FC64 output for AlexNet, VGG16 and LevyNet, whose single-view heads are MLPs.
    (The paper flattens the conv features of its AlexNet and puts the whole FC stack after the
    concatenation; pooling keeps the head size independent of the input size and lets both
    branches reuse the ImageNet fc6/fc7.) Then dropout and one FC.
    """

    view_mode = "multimodal"

    def __init__(self, cc: Classifier, mlo: Classifier, num_classes: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        if cc is mlo:
            raise ValueError("multimodal branches must be two separate networks (use view_mode='parallel' to share)")
        cc.reset_classifier(0)
        mlo.reset_classifier(0)
        self.cc, self.mlo = cc, mlo
        self.info = cc.info
        self.in_chans = cc.in_chans
        self.expected_input_channels = cc.expected_input_channels
        self.head_features = cc.head_features + mlo.head_features
        self.head_init = cc.head_init
        self.head_drop = nn.Dropout(dropout)
        self.reset_classifier(num_classes)

    @staticmethod
    def _split(views: Tensor | Sequence[Tensor], mlo: Tensor | None) -> tuple[Tensor, Tensor]:
        if mlo is not None:
            return views, mlo  # type: ignore[return-value]
        if isinstance(views, Tensor) or len(views) != 2:
            raise ValueError("a multimodal model takes a (cc, mlo) pair of (B, C, H, W) tensors")
        return views[0], views[1]

    def forward_features(self, views: Tensor | Sequence[Tensor], mlo: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(cc, mlo) -> (cc feature map, mlo feature map)."""
        cc, mlo = self._split(views, mlo)
        return self.cc.forward_features(cc), self.mlo.forward_features(mlo)

    def forward_head(self, features: Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        """(cc map, mlo map) -> logits; ``pre_logits=True``: the concatenated branch vectors."""
        f_cc, f_mlo = features
        z = torch.cat([self.cc.forward_head(f_cc, pre_logits=True), self.mlo.forward_head(f_mlo, pre_logits=True)], 1)
        return z if pre_logits else self.fc(self.head_drop(z))

    def forward(self, views: Tensor | Sequence[Tensor], mlo: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(*self._split(views, mlo)))

    def predict_exam(self, cc: Tensor, mlo: Tensor) -> Tensor:
        """Per-exam probabilities: the softmax of the joint prediction."""
        return F.softmax(self(cc, mlo), dim=1)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Identity()
        if num_classes > 0:
            self.fc = nn.Linear(self.head_features, num_classes)
            if self.head_init == "xavier":
                nn.init.xavier_uniform_(self.fc.weight)
            else:
                nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def layer_groups(self) -> list[tuple[str, list[str]]]:
        """The branch groups, each naming both branches' modules; the joint FC is the head."""
        groups = [
            (group, [f"{branch}.{p}" for branch in ("cc", "mlo") for p in prefixes])
            for group, prefixes in self.cc.layer_groups()
            if group != HEAD_GROUP
        ]
        return [*groups, (HEAD_GROUP, ["fc"])]


ViewModel: TypeAlias = Classifier | MultiViewClassifier  # what create_view_model and build_view_model return


def as_view_model(model: nn.Module) -> ViewModel:
    """``model`` itself, typed as a view model (e.g. an ensemble member from an ``nn.ModuleList``).

    Raises:
        TypeError: ``model`` is not a ``Classifier`` or ``MultiViewClassifier``.
    """
    if not isinstance(model, Classifier | MultiViewClassifier):
        raise TypeError(
            f"expected a Classifier or MultiViewClassifier (a mammo_ray view model), got {type(model).__name__}"
        )
    return model


def create_view_model(
    name: str,
    view_mode: str = "single",
    *,
    num_classes: int | None = None,
    dropout: float | None = None,
    **kwargs: Any,
) -> ViewModel:
    """A registered model in a view mode; ``kwargs`` go to ``create_model`` (in_chans, pretrained, ...).

    For ``multimodal`` both branches are built (and loaded, when ``pretrained`` is given)
    separately, so they start from the same weights only if they are pretrained.
    """
    if view_mode not in VIEW_MODES:
        raise ValueError(f"unknown view_mode {view_mode!r}; expected one of {VIEW_MODES}")
    if view_mode != "multimodal":
        model = create_model(name, num_classes=num_classes, dropout=dropout, **kwargs)
        model.view_mode = view_mode
        return model
    cc = create_model(name, dropout=dropout, **kwargs)
    mlo = create_model(name, dropout=dropout, **kwargs)
    head: dict[str, Any] = {
        key: value for key, value in dict(num_classes=num_classes, dropout=dropout).items() if value is not None
    }
    return MultiViewClassifier(cc, mlo, **head)


class _ModelSettings(Protocol):  # what build_view_model reads; config.ModelConfig has these (read-only)
    @property
    def name(self) -> str: ...
    @property
    def view_mode(self) -> str: ...
    @property
    def in_chans(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def dropout(self) -> float: ...
    @property
    def pretrained(self) -> str | os.PathLike[str] | None: ...


def build_view_model(cfg: _ModelSettings) -> ViewModel:
    """The model a ``ModelConfig`` describes."""
    return create_view_model(
        cfg.name,
        cfg.view_mode,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        dropout=cfg.dropout,
        pretrained=cfg.pretrained,
    )
