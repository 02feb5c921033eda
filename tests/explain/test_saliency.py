"""Saliency maps (paper 001, section 5.5.1): |d class score / d input|, max over channels."""

import pytest
import torch
from PIL import Image
from torch import nn

from mammo_ray.explain import saliency_map, save_saliency_png
from mammo_ray.models import create_view_model


class TopLeftNet(nn.Module):
    """Logits from a linear map of the top-left quadrant only."""

    num_classes = 2

    def __init__(self, channels: int = 3, side: int = 16) -> None:
        super().__init__()
        self.half = side // 2
        self.fc = nn.Linear(channels * self.half**2, 2)

    def forward(self, x):
        return self.fc(x[:, :, : self.half, : self.half].flatten(1))


def test_saliency_is_zero_outside_the_region_the_model_reads():
    torch.manual_seed(0)
    model = TopLeftNet()
    x = torch.randn(2, 3, 16, 16)
    maps = saliency_map(model, x, target_class=1)
    assert maps.shape == (2, 16, 16) and (maps >= 0).all()
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:8, :8] = True
    assert (maps[:, ~inside] == 0).all()
    assert (maps[:, inside] > 0).all()
    # A linear score: the gradient is the weight row, whatever the input.
    expected = model.fc.weight[1].detach().view(3, 8, 8).abs().amax(dim=0)
    torch.testing.assert_close(maps[0, :8, :8], expected)
    torch.testing.assert_close(maps[1, :8, :8], expected)
    other = saliency_map(model, x, target_class=0)
    torch.testing.assert_close(other[0, :8, :8], model.fc.weight[0].detach().view(3, 8, 8).abs().amax(dim=0))


@pytest.mark.parametrize("in_chans", [1, 3, 9])
@pytest.mark.parametrize("name", ["levynet", "resnet18"])
def test_saliency_on_backbones(name, in_chans):
    torch.manual_seed(0)
    model = create_view_model(name, "single", in_chans=in_chans).train()
    x = torch.randn(2, model.expected_input_channels, 32, 32)
    maps = saliency_map(model, x)
    assert maps.shape == (2, 32, 32)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and (maps.flatten(1).amax(1) > 0).all()
    assert model.training, "the model's mode is restored"
    assert all(p.grad is None for p in model.parameters()), "no parameter gradient accumulated"
    if name == "levynet":  # eval mode inside: the map is deterministic although the model has dropout
        torch.testing.assert_close(saliency_map(model, x), maps)


def test_parallel_pair_is_each_view_through_the_shared_network():
    torch.manual_seed(0)
    model = create_view_model("levynet", "parallel", in_chans=1)
    cc, mlo = torch.randn(2, 1, 24, 24), torch.randn(2, 1, 24, 24)
    cc_map, mlo_map = saliency_map(model, (cc, mlo))
    torch.testing.assert_close(cc_map, saliency_map(model, cc))
    torch.testing.assert_close(mlo_map, saliency_map(model, mlo))


def test_multimodal_takes_a_pair_and_returns_two_maps():
    torch.manual_seed(0)
    model = create_view_model("levynet", "multimodal", in_chans=3)
    cc, mlo = torch.randn(2, 3, 24, 24), torch.randn(2, 3, 32, 32)
    cc_map, mlo_map = saliency_map(model, (cc, mlo))
    assert cc_map.shape == (2, 24, 24) and mlo_map.shape == (2, 32, 32)
    assert (cc_map > 0).any() and (mlo_map > 0).any() and (cc_map >= 0).all()
    with pytest.raises(ValueError, match="pair"):
        saliency_map(model, cc)
    with pytest.raises(ValueError, match="target_class 2"):
        saliency_map(model, (cc, mlo), target_class=2)


def test_save_saliency_png(tmp_path):
    torch.manual_seed(0)
    model = TopLeftNet(channels=1)
    x = torch.randn(1, 1, 16, 16)
    path = save_saliency_png(x[0, 0], saliency_map(model, x)[0], tmp_path / "out" / "sal.png", dpi=50)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (300, 170)
    with pytest.raises(ValueError, match="differ in shape"):
        save_saliency_png(x[0, 0], torch.zeros(8, 8), tmp_path / "bad.png")
