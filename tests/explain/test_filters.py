"""First-layer filter grids (paper 001, section 5.5.2)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mammo_ray.explain import filter_grid, first_layer_filters, save_filter_grid
from mammo_ray.models import create_view_model


def test_first_layer_filters_come_from_info_first_conv():
    torch.manual_seed(0)
    levy = create_view_model("levynet", in_chans=3)
    weights = first_layer_filters(levy)
    assert weights.shape == (32, 3, 3, 3)
    torch.testing.assert_close(weights, levy.features.block1.conv.weight.detach())
    assert first_layer_filters(create_view_model("resnet18", in_chans=9)).shape == (64, 9, 7, 7)
    multi = create_view_model("levynet", "multimodal", in_chans=1)
    torch.testing.assert_close(first_layer_filters(multi), multi.cc.features.block1.conv.weight.detach())
    assert not torch.equal(first_layer_filters(multi, branch="mlo"), first_layer_filters(multi))
    with pytest.raises(ValueError, match="branch"):
        first_layer_filters(multi, branch="left")


def _tile(grid, index, per_row, k):
    r, c = divmod(index, per_row)
    return grid[1 + r * (k + 1) : 1 + r * (k + 1) + k, 1 + c * (k + 1) : 1 + c * (k + 1) + k]


@pytest.mark.parametrize("in_ch, shape", [(3, (25, 25, 3)), (1, (25, 25))])
def test_square_grid_of_normalised_tiles(in_ch, shape):
    weights = torch.randn(32, in_ch, 3, 3, generator=torch.Generator().manual_seed(0))
    grid = filter_grid(weights)  # 32 filters: 6 per row, 6 rows of 3 + 1 px
    assert grid.shape == shape and grid.dtype == np.uint8
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[4] == 255).all()  # 1-px borders
    for index in (0, 31):
        tile = _tile(grid, index, 6, 3)
        assert tile.min() == 0 and tile.max() == 255  # each filter min-max normalised on its own
    assert (_tile(grid, 32, 6, 3) == 255).all()  # the 4 unused cells of the last row stay blank
    weight = weights[5].permute(1, 2, 0).squeeze(-1)
    expected = ((weight - weight.min()) / (weight.max() - weight.min()) * 255).round().numpy()
    np.testing.assert_allclose(_tile(grid, 5, 6, 3), expected, atol=1)


def test_nine_channel_filters_one_row_per_filter():
    weights = torch.randn(64, 9, 7, 7, generator=torch.Generator().manual_seed(0))
    weights[3] = 0.25  # a constant filter shows as mid-grey
    grid = filter_grid(weights)
    assert grid.shape == (64 * 8 + 1, 9 * 8 + 1)
    row = grid[1 + 3 * 8 : 1 + 3 * 8 + 7]
    assert (row[:, 1:-1][:, (np.arange(71) % 8) != 7] == 128).all()
    both = np.stack([_tile(grid, 9 * 10 + c, 9, 7) for c in range(9)])  # filter 10, its 9 channels together
    assert both.min() == 0 and both.max() == 255


def test_save_filter_grid_png(tmp_path):
    model = create_view_model("levynet", in_chans=3)
    path = save_filter_grid(model, tmp_path / "f" / "filters.png", scale=4)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (25 * 4, 25 * 4) and image.mode == "RGB"
    gray = save_filter_grid(create_view_model("resnet18", in_chans=1), tmp_path / "g.png", scale=2)
    with Image.open(gray) as image:
        assert image.size == (8 * 8 * 2 + 2, 8 * 8 * 2 + 2) and image.mode == "L"  # 64 filters, 8 x 8 of 7 + 1 px
    with pytest.raises(ValueError, match="scale"):
        save_filter_grid(model, tmp_path / "x.png", scale=0)
