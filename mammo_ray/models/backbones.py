"""The backbones of the papers (see docs/papers.md) behind one interface, ``Classifier``.

torchvision's AlexNet, VGG16, GoogLeNet, Inception-v3, ResNet-18/50 (always built with
``weights=None``; ImageNet weights only from local files, see ``pretrained.py``) and the
shallow LevyNet of paper 001. Each is split into ``features`` (the conv trunk, in
torchvision's own module names so CAM paths read naturally) and a head:

    forward(x) = forward_head(forward_features(x))
    forward_features: [DoG bank] -> conv trunk                    -> (B, C, h, w)
    forward_head:     pool -> pre_logits -> dropout -> fc         -> (B, num_classes)

Heads. ResNet, GoogLeNet, Inception-v3: global average pooling + one FC (CAM applies as-is).
AlexNet and VGG16 keep their fc6-fc7 MLP on the adaptive 6x6 / 7x7 average pool, so
ImageNet fc6/fc7 weights transfer as in paper 001 and any input >= min_input_size works
(the pool repeats a small map up to 6x6 / 7x7); they are not GAP+FC, so ``localize/``
uses Grad-CAM on ``cam_target_layer`` for them (Grad-CAM works for every model).
Dropout: the ``dropout`` argument is applied right before the final FC, and for
AlexNet/VGG16 also after fc6 (Caffe placement, as the papers' AlexNet had; torchvision's
AlexNet drops before fc6 and fc7 instead). GoogLeNet/Inception-v3: no auxiliary
classifiers, and no ``transform_input`` (their ImageNet weights expect inputs normalised
with mean 0.5 / std 0.5, recorded in ``ModelInfo.mean/std``).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from .dog import DoGBank
from .pretrained import PretrainedWeightsError, adapt_input_conv, load_torchvision_weights
from .registry import HEAD_GROUP, IN_CHANS, ModelInfo, register_model


def _gap() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class Classifier(nn.Module):
    """A conv trunk with a replaceable classifier head; the common model of mammo-ray.

    Input: (B, ``expected_input_channels``, H, W) with H, W >= ``info.min_input_size``.
    ``in_chans=9`` models hold the DoG bank and take 1 channel. Output: (B, num_classes)
    logits. ``view_mode`` is "single" or "parallel" (the same network; parallel training just
    feeds CC and MLO as separate samples, and ``predict_exam`` averages them).
    """

    def __init__(
        self,
        info: ModelInfo,
        features: nn.Module,
        *,
        num_features: int,
        in_chans: int = 3,
        num_classes: int = 2,
        dropout: float = 0.5,
        from_pretrained: bool = False,
        global_pool: nn.Module | None = None,
        pre_logits: nn.Module | None = None,
        head_features: int | None = None,
        head_init: str = "normal",
    ) -> None:
        super().__init__()
        if in_chans not in IN_CHANS:
            raise ValueError(f"{info.name}: in_chans must be one of {IN_CHANS}, got {in_chans!r}")
        self.info = info
        self.view_mode = "single"
        self.in_chans = in_chans
        self.expected_input_channels = 1 if in_chans == 9 else in_chans
        self.input_layer = DoGBank() if in_chans == 9 else nn.Identity()
        self.features = features
        parent_path, _, leaf = info.first_conv.rpartition(".")
        parent = self.get_submodule(parent_path)
        setattr(parent, leaf, adapt_input_conv(getattr(parent, leaf), in_chans, from_pretrained))
        self.global_pool = global_pool if global_pool is not None else _gap()
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.num_features = num_features  # channels of forward_features
        self.head_features = head_features or num_features  # inputs of the final FC
        self.head_init = head_init
        self.head_drop = nn.Dropout(dropout)
        self.reset_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, expected_input_channels, H, W) -> the last conv feature map (B, num_features, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.expected_input_channels:
            raise ValueError(
                f"{self.info.name} (in_chans={self.in_chans}) expects input (B, "
                f"{self.expected_input_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.features(self.input_layer(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits; ``pre_logits=True`` stops before the dropout and the final FC."""
        x = self.pre_logits(self.global_pool(x))
        return x if pre_logits else getattr(self, self.info.classifier)(self.head_drop(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def predict_exam(self, cc: Tensor, mlo: Tensor) -> Tensor:
        """Per-exam probabilities: the mean of the CC and MLO softmaxes (paper 000, parallel mode)."""
        return (F.softmax(self(cc), dim=1) + F.softmax(self(mlo), dim=1)) / 2

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.info.classifier)

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised final FC (0: Identity, so forward returns pre-logit features)."""
        self.num_classes = num_classes
        fc: nn.Module = nn.Identity()
        if num_classes > 0:
            fc = nn.Linear(self.head_features, num_classes)
            if self.head_init == "xavier":
                nn.init.xavier_uniform_(fc.weight)
            else:  # "a random Gaussian initialization" (paper 001)
                nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
        setattr(self, self.info.classifier, fc)

    def layer_groups(self) -> list[tuple[str, list[str]]]:
        """(group, module-path prefixes) early to late, for ``param_groups`` and ``freeze``."""
        return [(group, list(prefixes)) for group, prefixes in self.info.layer_groups]


def _trunk(model: nn.Module, names: list[str]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


def _torchvision(arch: str, pretrained: str | os.PathLike[str] | None, **kwargs: object) -> nn.Module:
    model = getattr(tvm, arch)(weights=None, **kwargs)
    if pretrained is not None:
        load_torchvision_weights(model, arch, pretrained)
    return model


def _fc67(classifier: nn.Module, dropout: float) -> nn.Sequential:
    """fc6 - ReLU - dropout - fc7 - ReLU from a torchvision AlexNet/VGG classifier (weights kept)."""
    linears = [m for m in classifier.children() if isinstance(m, nn.Linear)]
    return nn.Sequential(
        OrderedDict(
            fc6=linears[0],
            act6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(dropout),
            fc7=linears[1],
            act7=nn.ReLU(inplace=True),
        )
    )


def _groups(*groups: tuple[str, tuple[str, ...]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (*groups, (HEAD_GROUP, ("fc",)))


def _feat(*names: str | int) -> tuple[str, ...]:
    return tuple(f"features.{name}" for name in names)


_FC67 = (("fc6", ("pre_logits.fc6",)), ("fc7", ("pre_logits.fc7",)))


ALEXNET = ModelInfo(
    "alexnet",
    224,
    63,
    256,
    "features",
    "features.0",
    _groups(*((f"conv{i + 1}", _feat(j)) for i, j in enumerate((0, 3, 6, 8, 10))), *_FC67),
    gap_fc=False,
    torchvision_weights="AlexNet_Weights.IMAGENET1K_V1",
    paper="000, 001",
)


def _with_fc67(info, tv, num_features, in_chans, num_classes, dropout, pretrained) -> Classifier:
    """AlexNet and VGG16: torchvision's ``features`` trunk, its avgpool, and its FC6/FC7 kept as pre-logits."""
    return Classifier(
        info,
        tv.get_submodule("features"),
        num_features=num_features,
        head_features=4096,
        in_chans=in_chans,
        num_classes=num_classes,
        dropout=dropout,
        from_pretrained=pretrained is not None,
        global_pool=nn.Sequential(tv.get_submodule("avgpool"), nn.Flatten(1)),
        pre_logits=_fc67(tv.get_submodule("classifier"), dropout),
    )


@register_model("alexnet", ALEXNET)
def alexnet(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    return _with_fc67(
        ALEXNET, _torchvision("alexnet", pretrained, **kwargs), 256, in_chans, num_classes, dropout, pretrained
    )


_VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # conv indices in features


VGG16 = ModelInfo(
    "vgg16",
    224,
    32,
    512,
    "features",
    "features.0",
    _groups(*((f"block{i + 1}", _feat(*idx)) for i, idx in enumerate(_VGG16_BLOCKS)), *_FC67),
    gap_fc=False,
    torchvision_weights="VGG16_Weights.IMAGENET1K_V1",
    paper="000, 001",
)


@register_model("vgg16", VGG16)
def vgg16(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    return _with_fc67(
        VGG16, _torchvision("vgg16", pretrained, **kwargs), 512, in_chans, num_classes, dropout, pretrained
    )


_GOOGLENET = [
    "conv1",
    "maxpool1",
    "conv2",
    "conv3",
    "maxpool2",
    "inception3a",
    "inception3b",
    "maxpool3",
    "inception4a",
    "inception4b",
    "inception4c",
    "inception4d",
    "inception4e",
    "maxpool4",
    "inception5a",
    "inception5b",
]


GOOGLENET = ModelInfo(
    "googlenet",
    224,
    32,
    1024,
    "features.inception5b",
    "features.conv1.conv",
    _groups(
        ("stem", _feat("conv1", "conv2", "conv3")),
        ("inception3", _feat("inception3a", "inception3b")),
        ("inception4", _feat(*(f"inception4{c}" for c in "abcde"))),
        ("inception5a", _feat("inception5a")),
        ("inception5b", _feat("inception5b")),
    ),
    gap_fc=True,
    torchvision_weights="GoogLeNet_Weights.IMAGENET1K_V1",
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    paper="001 (inception_5a/5b fine-tuning)",
)


@register_model("googlenet", GOOGLENET)
def googlenet(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    # The ImageNet file holds the auxiliary classifiers: build them to load it, then leave them out.
    tv = _torchvision("googlenet", pretrained, aux_logits=pretrained is not None, init_weights=True, **kwargs)
    return Classifier(
        GOOGLENET,
        _trunk(tv, _GOOGLENET),
        num_features=1024,
        in_chans=in_chans,
        num_classes=num_classes,
        dropout=dropout,
        from_pretrained=pretrained is not None,
    )


_INCEPTION = [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
]


INCEPTION_V3 = ModelInfo(
    "inception_v3",
    299,
    75,
    2048,
    "features.Mixed_7c",
    "features.Conv2d_1a_3x3.conv",
    _groups(
        ("stem", _feat(*(n for n in _INCEPTION[:7] if n.startswith("Conv")))),
        ("mixed5", _feat(*_INCEPTION[7:10])),
        ("mixed6", _feat(*_INCEPTION[10:15])),
        *((name.lower().replace("_", ""), _feat(name)) for name in _INCEPTION[15:]),
    ),
    gap_fc=True,
    torchvision_weights="Inception_V3_Weights.IMAGENET1K_V1",
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    paper="000",
)


@register_model("inception_v3", INCEPTION_V3)
def inception_v3(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    tv = _torchvision("inception_v3", pretrained, aux_logits=pretrained is not None, init_weights=True, **kwargs)
    return Classifier(
        INCEPTION_V3,
        _trunk(tv, _INCEPTION),
        num_features=2048,
        in_chans=in_chans,
        num_classes=num_classes,
        dropout=dropout,
        from_pretrained=pretrained is not None,
    )


_RESNET = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def _resnet_info(name: str, channels: int, weights: str) -> ModelInfo:
    return ModelInfo(
        name,
        224,
        32,
        channels,
        "features.layer4",
        "features.conv1",
        _groups(("stem", _feat("conv1", "bn1")), *((f"layer{i}", _feat(f"layer{i}")) for i in range(1, 5))),
        gap_fc=True,
        torchvision_weights=weights,
        paper="000, 004 (CAM)",
    )


def _resnet(
    arch: str,
    info: ModelInfo,
    in_chans: int,
    num_classes: int,
    dropout: float,
    pretrained: str | os.PathLike[str] | None,
    kwargs: dict,
) -> Classifier:
    tv = _torchvision(arch, pretrained, **kwargs)
    return Classifier(
        info,
        _trunk(tv, _RESNET),
        num_features=info.num_features,
        in_chans=in_chans,
        num_classes=num_classes,
        dropout=dropout,
        from_pretrained=pretrained is not None,
    )


RESNET18 = _resnet_info("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1")
RESNET50 = _resnet_info("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V1")


@register_model("resnet18", RESNET18)
def resnet18(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    return _resnet("resnet18", RESNET18, in_chans, num_classes, dropout, pretrained, kwargs)


@register_model("resnet50", RESNET50)
def resnet50(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, **kwargs) -> Classifier:
    return _resnet("resnet50", RESNET50, in_chans, num_classes, dropout, pretrained, kwargs)


def _levy_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # "Convolution (3x3) - Batch Norm - ReLU - Max Pooling"; the padding is ours (the paper does not say).
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2),
        )
    )


LEVYNET = ModelInfo(
    "levynet",
    224,
    8,
    64,
    "features.block3",
    "features.block1.conv",
    _groups(
        ("block1", _feat("block1")), ("block2", _feat("block2")), ("block3", _feat("block3")), ("mlp", ("pre_logits",))
    ),
    gap_fc=False,
    paper="001 section 4.1",
)


@register_model("levynet", LEVYNET)
def levynet(*, in_chans=3, num_classes=2, dropout=0.5, pretrained=None, pool_size: int = 7) -> Classifier:
    """LevyNet (paper 001, section 4.1): 3 x [conv3x3 (32, 32, 64) - BN - ReLU - maxpool] - FC128 - FC64 - FC.

    Input-size agnostic: an adaptive average pool to ``pool_size`` x ``pool_size`` sits before
    FC128 (the paper feeds the flattened 28x28x64 map of a 224 input; ``pool_size=28``
    reproduces that exactly at 224). Xavier initialisation throughout, as in the paper.
    """
    if pretrained is not None:
        raise PretrainedWeightsError("levynet has no ImageNet weights (paper 001 trains it from scratch)")
    features = nn.Sequential(
        OrderedDict(block1=_levy_block(3, 32), block2=_levy_block(32, 32), block3=_levy_block(32, 64))
    )
    mlp = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64 * pool_size**2, 128),
            act1=nn.ReLU(inplace=True),
            fc2=nn.Linear(128, 64),
            act2=nn.ReLU(inplace=True),
        )
    )
    for module in [*features.modules(), *mlp.modules()]:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return Classifier(
        LEVYNET,
        features,
        num_features=64,
        head_features=64,
        in_chans=in_chans,
        num_classes=num_classes,
        dropout=dropout,
        head_init="xavier",
        global_pool=nn.Sequential(nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(1)),
        pre_logits=mlp,
    )
