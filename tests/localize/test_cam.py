"""CAM (paper 004, Eq. 1) and Grad-CAM: where they peak, how they relate, and every backbone."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mammo_ray.localize.cam import cam, class_activation_map, grad_cam, normalize_map, upsample_map
from mammo_ray.models import Classifier, ModelInfo, create_model, create_view_model, get_model_info, list_models

SIDE = 64
BLOB = (46, 18)  # (row, col): centre of the bright disc, in the lower-left quadrant


def _blob_detector() -> Classifier:
    """A hand-set GAP+FC Classifier: channel 0 fires on bright tissue and alone drives class 1.

    conv 5x5 (padding 2): channel 0 = local mean - 0.5, channel 1 = 0.5 - local mean; ReLU;
    4x4 max pool (16 x 16 features at 64 px); fc row 1 = [1, 0], row 0 = [0, 0.02], so a small
    bright disc outweighs a large dark background.
    """
    info = ModelInfo(
        "blob_detector",
        SIDE,
        8,
        2,
        "features",
        "features.conv",
        (("trunk", ("features",)), ("head", ("fc",))),
        gap_fc=True,
    )
    features = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 5, padding=2), act=nn.ReLU(), pool=nn.MaxPool2d(4)))
    model = Classifier(info, features, num_features=2, in_chans=1).eval()
    with torch.no_grad():
        features.conv.weight.copy_(torch.stack([torch.full((1, 5, 5), 1 / 25), torch.full((1, 5, 5), -1 / 25)]))
        features.conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        model.fc.weight.copy_(torch.tensor([[0.0, 0.02], [1.0, 0.0]]))
        model.fc.bias.zero_()
    return model


def _blob_image() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    disc = ((yy - BLOB[0]) ** 2 + (xx - BLOB[1]) ** 2 <= 6**2).float()
    return disc[None, None]  # (1, 1, 64, 64): a bright disc of radius 6 on black


def _peak(maps: torch.Tensor) -> tuple[int, int]:
    full = upsample_map(maps, SIDE)[0]
    index = int(full.argmax())
    return divmod(index, SIDE)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_maps_peak_on_the_region_that_decides_the_class(method):
    model, x = _blob_detector(), _blob_image()
    with torch.no_grad():
        assert model(x).argmax(1).item() == 1
    row, col = _peak(cam(model, x, target_class=1, method=method))
    assert (row - BLOB[0]) ** 2 + (col - BLOB[1]) ** 2 <= 8**2, (row, col)  # on the disc
    maps = cam(model, x, target_class=1, method=method)
    assert maps.shape == (1, 16, 16)
    cells = maps[0] > 0
    assert cells[8:, :8].any() and not cells[:8].any() and not cells[:, 8:].any()  # only the disc's quadrant fires
    row, col = _peak(cam(model, x, target_class=0, method=method))  # class 0 is driven by the dark background
    assert (row - BLOB[0]) ** 2 + (col - BLOB[1]) ** 2 > 8**2


def test_cam_is_the_fc_weighted_sum_of_the_feature_maps():
    torch.manual_seed(0)
    model = create_model("resnet18", in_chans=1).eval()
    x = torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        features = model.forward_features(x)  # (2, 512, 2, 2)
    weight = model.get_classifier().weight[1]
    expected = (weight[None, :, None, None] * features).sum(1)
    torch.testing.assert_close(class_activation_map(model, x), expected)
    # For GAP + FC, d logit / d f_c = w_c / (h w), so Grad-CAM is exactly relu(CAM) / (h w).
    torch.testing.assert_close(grad_cam(model, x), expected.clamp_min(0) / 4, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cam(model, x), expected)  # auto picks CAM for a GAP+FC model


def test_cam_needs_a_gap_fc_head():
    model = create_model("levynet", in_chans=1).eval()
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"levynet: CAM .*\(ModelInfo.gap_fc=False\); use grad_cam"):
        class_activation_map(model, x)
    torch.testing.assert_close(cam(model, x), grad_cam(model, x))  # auto falls back to Grad-CAM
    with pytest.raises(ValueError, match="unknown CAM method 'saliency'"):
        cam(model, x, method="saliency")
    with pytest.raises(ValueError, match="target_class 2 is out of range for 2 classes"):
        grad_cam(model, x, target_class=2)


def _gradcam_cases():
    # in_chans only changes the input end (the first conv, the DoG bank before it), so 1 and 9
    # run on the quick backbones; the slow ones to build or run on 2 cores get 3 channels only.
    for name in list_models():
        quick = name in ("levynet", "resnet18", "resnet50")
        for in_chans in (1, 3, 9) if quick else (3,):
            yield name, in_chans


@pytest.mark.parametrize("name, in_chans", list(_gradcam_cases()))
def test_grad_cam_runs_on_every_backbone(name, in_chans):
    torch.manual_seed(0)
    info = get_model_info(name)
    side = max(info.min_input_size, 64 if name != "levynet" else 32)
    model = create_model(name, in_chans=in_chans).eval()
    x = torch.randn(2, model.expected_input_channels, side, side)
    with torch.no_grad():
        features = model.forward_features(x)
    maps = grad_cam(model, x)
    assert maps.shape == (2, *features.shape[-2:])
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert not any(p.grad is not None for p in model.parameters())  # captum takes input grads only


def test_grad_cam_checks_the_target_layer():
    model = create_model("resnet18", in_chans=1).eval()
    x = torch.randn(1, 1, SIDE, SIDE)
    model.info = dataclasses.replace(model.info, cam_target_layer="features.layer3")
    with pytest.raises(
        ValueError,
        match=r"cam_target_layer 'features.layer3' \(1, 256, 4, 4\) is not the "
        r"forward_features map \(1, 512, 2, 2\)",
    ):
        grad_cam(model, x)
    model.info = dataclasses.replace(model.info, cam_target_layer="features.layer9")
    with pytest.raises(ValueError, match="'features.layer9' is not a submodule"):
        grad_cam(model, x)


def test_multimodal_maps_one_per_view():
    torch.manual_seed(0)
    model = create_view_model("resnet18", "multimodal", in_chans=1).eval()
    cc, mlo = torch.randn(2, 1, SIDE, SIDE), torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        f_cc, f_mlo = model.forward_features((cc, mlo))
    w = model.get_classifier().weight[1]
    cam_cc, cam_mlo = class_activation_map(model, (cc, mlo))
    torch.testing.assert_close(cam_cc, torch.einsum("c,bchw->bhw", w[:512], f_cc))
    torch.testing.assert_close(cam_mlo, torch.einsum("c,bchw->bhw", w[512:], f_mlo))
    g_cc, g_mlo = grad_cam(model, (cc, mlo))  # through the joint head: relu(CAM) / (h w) per branch
    torch.testing.assert_close(g_cc, cam_cc.clamp_min(0) / 4, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_mlo, cam_mlo.clamp_min(0) / 4, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"multimodal model: pass a \(cc, mlo\) pair"):
        grad_cam(model, cc)
    levynet = create_view_model("levynet", "multimodal", in_chans=1).eval()
    maps = cam(levynet, (cc[:, :, :32, :32], mlo[:, :, :32, :32]))  # auto: Grad-CAM for an MLP head
    assert [m.shape for m in maps] == [(2, 4, 4)] * 2 and all((m >= 0).all() for m in maps)


def test_upsample_and_normalize():
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_map(grid, 4)  # align_corners=False: edges clamped, quarter steps inside
    assert up.shape == (4, 4)
    torch.testing.assert_close(up[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert upsample_map(grid[None].repeat(3, 1, 1), (4, 6)).shape == (3, 4, 6)
    maps = torch.stack([grid * 5 - 1, torch.full((2, 2), 7.0)])
    norm = normalize_map(maps)
    torch.testing.assert_close(norm[0], grid / 3)  # per-map min-max to [0, 1]
    torch.testing.assert_close(norm[1], torch.zeros(2, 2))  # a constant map gives zeros
    torch.testing.assert_close(normalize_map(grid), grid / 3)
    with pytest.raises(ValueError, match=r"\(B, h, w\) or \(h, w\)"):
        normalize_map(torch.zeros(1, 1, 2, 2))
