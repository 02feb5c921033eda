"""Fully convolutional dense maps (paper 003): equal to explicit sliding windows, tiling-invariant, bounded memory.

Exactness needs a trunk without zero padding: there, a window's features inside the whole
image are the features of the cropped window, so the dense map equals the sliding-window map
up to float error, and tiles equal the untiled map. The registered backbones pad, so for them
dense cells see neighbouring tissue where a crop sees zeros: close to the crops, not equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mammo_ray.localize.fcn import DenseMap, Geometry, dense_map, ensemble_dense_map, sliding_window_map, trunk_geometry
from mammo_ray.models import Classifier, ModelInfo, create_model, create_view_model

WINDOW = 32  # px; the padding-free nets below have stride 4 and see 6 x 6 feature cells per window


def _valid_net(head: str, seed: int = 0, pool: nn.Module | None = None) -> Classifier:
    """A padding-free trunk (valid 3x3 convs + 2x2 max pools, stride 4) with a GAP+FC or an MLP head."""
    torch.manual_seed(seed)
    info = ModelInfo(
        f"valid_{head}",
        WINDOW,
        14,
        8,
        "features",
        "features.conv1",
        (("trunk", ("features",)), ("head", ("fc",))),
        gap_fc=head == "gap",
    )
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 6, 3),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 8, 3),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
        )
    )
    if pool is not None:
        features.add_module("pool", pool)
    if head == "gap":
        return Classifier(info, features, num_features=8, in_chans=1, head_init="xavier").eval()
    mlp = nn.Sequential(nn.Linear(8 * 4, 16), nn.ReLU())
    return Classifier(
        info,
        features,
        num_features=8,
        head_features=16,
        in_chans=1,
        head_init="xavier",
        global_pool=nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1)),
        pre_logits=mlp,
    ).eval()


def _image(h: int, w: int, channels: int = 1, seed: int = 0, sigma: float = 8.0) -> torch.Tensor:
    """Smooth random texture with two bright Gaussian blobs (``sigma`` px), so maps vary across the image."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, channels, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    blobs = sum(
        torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        for cy, cx in [(0.3 * h, 0.7 * w), (0.75 * h, 0.2 * w)]
    )
    return (torch.nn.functional.avg_pool2d(noise, 5, 1, 2) + 2 * blobs)[0]


def test_trunk_geometry_is_measured_and_cached():
    assert trunk_geometry(_valid_net("gap"), WINDOW) == Geometry(stride=4, k=6)  # floor((32 - 6) / 4)
    levynet = create_model("levynet", in_chans=1).eval()
    assert trunk_geometry(levynet, 224) == Geometry(8, 28)
    resnet = create_model("resnet18", in_chans=9).eval()
    assert trunk_geometry(resnet, 224) == Geometry(32, 7)
    assert trunk_geometry(resnet, 224) is trunk_geometry(resnet, 224)  # cached per model and window
    assert trunk_geometry(create_model("alexnet", in_chans=1).eval(), 224) == Geometry(32, 6)


def test_trunk_geometry_names_the_problem():
    resnet = create_model("resnet18", in_chans=1).eval()
    with pytest.raises(ValueError, match=r"resnet18: window 200 px is not a multiple of the network stride 32 px"):
        trunk_geometry(resnet, 200)
    with pytest.raises(ValueError, match=r"valid_gap: the trunk is not translation-aligned"):
        trunk_geometry(_valid_net("gap", pool=nn.AdaptiveAvgPool2d(3)), WINDOW)
    with pytest.raises(ValueError, match=r"valid_gap: the conv trunk fails on a 4x4 input"):
        trunk_geometry(_valid_net("gap"), 4)


@pytest.mark.parametrize("head", ["gap", "mlp"])
def test_dense_map_equals_sliding_windows_for_a_padding_free_trunk(head):
    model, image = _valid_net(head), _image(72, 90)
    reference = sliding_window_map(model, image, WINDOW, stride=4)
    if head == "gap":  # the FC->conv path must not call forward_head (the unfolded-window path)
        model.forward_head = lambda *args, **kwargs: pytest.fail("forward_head called for a GAP+FC head")
    dense = dense_map(model, image, WINDOW, batch_windows=7)
    assert dense.probs.shape == reference.probs.shape == ((72 - 32) // 4 + 1, (90 - 32) // 4 + 1)
    assert dense.probs.dtype == np.float32 and (dense.stride, dense.window, dense.image_size) == (4, 32, (72, 90))
    assert reference.probs.std() > 0.02  # the map has structure, so equality means something
    np.testing.assert_allclose(dense.probs, reference.probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["gap", "mlp"])
def test_tiled_maps_equal_the_untiled_map(head):
    model, image = _valid_net(head, seed=1), _image(77, 69, seed=1)
    untiled = dense_map(model, image, WINDOW)
    for tile in (35, 50, 64, 1000):  # 1, 5, 9 and all cells per tile side, of 12 x 10: partial tiles at the end
        tiled = dense_map(model, image, WINDOW, tile=tile, halo=4 * (tile % 3), batch_windows=5)
        np.testing.assert_allclose(tiled.probs, untiled.probs, atol=1e-6, rtol=0, err_msg=f"tile={tile}")


def test_a_halo_makes_tiles_of_a_padded_trunk_seamless():
    model, image = create_model("levynet", in_chans=1).eval(), _image(96, 120, seed=2)
    untiled = dense_map(model, image, WINDOW, halo=24)
    seamless = dense_map(model, image, WINDOW, tile=48, halo=24)  # 24 px >= levynet's 22-px receptive field
    np.testing.assert_allclose(seamless.probs, untiled.probs, atol=1e-5, rtol=0)
    seams = dense_map(model, image, WINDOW, tile=48)  # tiles overlap by window - s only: padding at the seams
    assert np.abs(seams.probs - untiled.probs).max() > 1e-4


@pytest.mark.parametrize("name, window", [("levynet", 32), ("resnet18", 64), ("alexnet", 64)])
def test_one_window_image_is_exactly_the_classifier(name, window):
    """An image of exactly one window: one cell, the classifier's own output, padding and all."""
    model, image = create_model(name, in_chans=1).eval(), _image(window, window, seed=5)
    with torch.no_grad():
        expected = model(image[None]).softmax(1)[0, 1].item()
    assert dense_map(model, image, window).probs == pytest.approx(np.array([[expected]], np.float32), abs=1e-6)


@pytest.mark.parametrize(
    "name, window, size, sigma, min_corr, max_mean_abs",
    [
        ("levynet", 32, (96, 128), 8.0, 0.9, 0.015),  # measured: corr 0.944, mean |diff| 0.009, max 0.033
        ("resnet18", 64, (128, 256), 12.0, None, 0.025),  # measured: corr 0.25, mean |diff| 0.015, max 0.037
    ],
)
def test_padded_backbones_are_close_to_sliding_windows(name, window, size, sigma, min_corr, max_mean_abs):
    """Padding makes dense cells differ from crops; how much depends on receptive field vs window.

    LevyNet's 22-px receptive field is small against a 32-px window: the maps agree well. A
    randomly initialised ResNet-18 (435-px receptive field, 64-px windows, so k = 2 cells that
    all touch a crop's zero padding) responds to content about as much as to padding: its map
    sd is 0.007 and the mean |dense - crop| 0.015, and the correlation (0.25 here, 0.55-0.7 on
    other synthetic images) is too unstable to assert; only the mean difference is bounded.
    """
    torch.manual_seed(0)
    model = create_model(name, in_chans=1).eval()
    if name == "resnet18":
        nn.init.normal_(model.get_classifier().weight, std=0.01)
    image = _image(*size, seed=3, sigma=sigma)
    stride = trunk_geometry(model, window).stride
    dense, reference = dense_map(model, image, window), sliding_window_map(model, image, window, stride)
    assert dense.probs.shape == reference.probs.shape
    diff = np.abs(dense.probs - reference.probs)
    corr = np.corrcoef(dense.probs.ravel(), reference.probs.ravel())[0, 1]
    print(
        f"{name}: {dense.probs.shape} cells, corr {corr:.3f}, mean |diff| {diff.mean():.4f}, "
        f"max {diff.max():.4f}, map sd {reference.probs.std():.4f}"
    )
    assert (min_corr is None or corr > min_corr) and diff.mean() < max_mean_abs


def test_dense_map_geometry():
    probs = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = DenseMap(probs, stride=4, window=9, image_size=(17, 21))  # odd window: centres on pixels 4, 8, 12, ...
    assert m.cell_box(0, 0) == (0, 0, 9, 9) and m.cell_box(2, 3) == (12, 8, 21, 17)
    with pytest.raises(IndexError):
        m.cell_box(3, 0)
    full = m.to_image()
    assert full.shape == (17, 21) and full.dtype == np.float32
    np.testing.assert_allclose(full[4::4, 4::4][:3, :4], probs)  # each value at its window centre
    assert full[6, 4] == pytest.approx((probs[0, 0] + probs[1, 0]) / 2)  # bilinear between centres
    np.testing.assert_allclose(full[:4], np.repeat(full[4:5], 4, axis=0))  # edges clamped to the outer centres
    np.testing.assert_allclose(full[12:], np.repeat(full[12:13], 5, axis=0))
    np.testing.assert_allclose(full[:, 16:], np.repeat(full[:, 16:17], 5, axis=1))
    assert m.to_image((34, 42)).shape == (34, 42)
    x, y = m.grid_offset  # findings.find_boxes(probs, scale=4, offset=grid_offset): s x s cells on window centres
    assert (x + 0.5 * 4, y + 0.5 * 4) == (9 / 2, 9 / 2)


def test_ensemble_mean_and_spread():
    image = _image(60, 70, seed=4)
    members = [_valid_net("gap", seed=s) for s in (0, 1, 2)]
    mean, std = ensemble_dense_map(members, image, WINDOW, tile=40)
    singles = np.stack([dense_map(m, image, WINDOW).probs for m in members])
    np.testing.assert_allclose(mean.probs, singles.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, singles.std(0), atol=1e-6)
    assert std.max() > 0.01
    same, spread = ensemble_dense_map([members[0], members[0]], image, WINDOW)
    np.testing.assert_allclose(same.probs, singles[0], atol=1e-6)
    assert not spread.any()
    with pytest.raises(ValueError, match=r"share one network stride.*#0 valid_gap: 4, #1 levynet: 8"):
        ensemble_dense_map([members[0], create_model("levynet", in_chans=1).eval()], image, WINDOW)


def test_dense_map_rejects_bad_inputs():
    model, image = _valid_net("gap"), _image(40, 40)
    with pytest.raises(ValueError, match="training mode"):
        dense_map(_valid_net("gap").train(), image, WINDOW)
    with pytest.raises(ValueError, match=r"expects 1-channel images, got \(1, 3, 40, 40\)"):
        dense_map(model, image.repeat(3, 1, 1), WINDOW)
    with pytest.raises(ValueError, match=r"smaller than one 32-px window"):
        dense_map(model, image[:, :20], WINDOW)
    with pytest.raises(ValueError, match="halo 2 px"):
        dense_map(model, image, WINDOW, halo=2)
    with pytest.raises(ValueError, match=r"tile \(20 px\) must hold one 32-px window"):
        dense_map(model, image, WINDOW, tile=20)
    with pytest.raises(ValueError, match="multimodal"):
        dense_map(create_view_model("levynet", "multimodal", in_chans=1).eval(), image, WINDOW)


_FULL_SIZE = """
import json, time, torch
from mammo_ray.localize.fcn import dense_map
from mammo_ray.models import create_model

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

torch.manual_seed(0)
model = create_model("resnet18", in_chans=1).eval()
image = torch.rand(1, 3000, 5000)
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
start = time.perf_counter()
m = dense_map(model, image, 224, tile=1024)
print(json.dumps(dict(before_kib=before, after_kib=status_kib("VmHWM"), seconds=time.perf_counter() - start,
                      shape=m.probs.shape, finite=bool(torch.isfinite(torch.from_numpy(m.probs)).all()))))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self")
def test_full_size_mammogram_in_bounded_memory():
    """3000 x 5000 through resnet18 (in_chans=1), 224-px windows, 1024-px tiles, in a fresh process.

    The peak is the child's own VmHWM, reset right before ``dense_map``: ``ru_maxrss`` (self or
    children) would not do, because Linux carries the forking parent's peak RSS across exec.
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FULL_SIZE)], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    growth = (stats["after_kib"] - stats["before_kib"]) * 1024
    # Untiled, resnet18's stem alone holds conv1's and bn1's full-resolution outputs at once:
    # 2 x 64 channels x 1500 x 2500 float32.
    untiled_stem = 2 * 64 * 1500 * 2500 * 4
    print(
        f"tiled run: {stats['seconds']:.1f} s, peak RSS {stats['after_kib'] / 2**10:.0f} MiB, growth during "
        f"dense_map {growth / 2**20:.0f} MiB (untiled stem alone: {untiled_stem / 2**20:.0f} MiB)"
    )
    assert stats["shape"] == [(3000 - 224) // 32 + 1, (5000 - 224) // 32 + 1] and stats["finite"]
    assert 0 < growth < 768 * 2**20 and untiled_stem > 2 * growth
    assert stats["after_kib"] < 3 * 2**20  # the whole process, torch and the 60 MB image included
