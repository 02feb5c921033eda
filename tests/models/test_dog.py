"""The Difference-of-Gaussians input bank (paper 000): constant, and numerically a DoG."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mammo_ray.models import DOG_SIGMAS, DoGBank, create_model
from mammo_ray.models.dog import gaussian_radius, mirror_indices

BLUR_SIGMAS = [*DOG_SIGMAS, DOG_SIGMAS[-1] * math.sqrt(2)]


def _scipy_bank(image: np.ndarray, mode: str) -> np.ndarray:
    """[image, G(s1) - G(s2), ..., G(s8) - G(s9)] with scipy, in float64."""
    blurred = [ndimage.gaussian_filter(image, s, mode=mode, radius=gaussian_radius(s)) for s in BLUR_SIGMAS]
    return np.stack([image] + [blurred[i] - blurred[i + 1] for i in range(8)])


def test_sigmas_are_the_papers():
    r2 = math.sqrt(2)
    np.testing.assert_allclose(DOG_SIGMAS, [r2, 2, 2 * r2, 4, 4 * r2, 8, 8 * r2, 16])
    assert DoGBank().radius == 68  # 3 sigma of 16 sqrt2, the widest Gaussian of the last DoG


def test_filters_are_constant_buffers_outside_parameters_and_checkpoints():
    bank = DoGBank()
    assert list(bank.parameters()) == [] and not bank.kernels.requires_grad
    assert bank.state_dict() == {}
    model = create_model("levynet", in_chans=9)
    assert not any(name.startswith("input_layer") for name, _ in model.named_parameters())
    kernels = model.input_layer.kernels.clone()
    conv = model.features.block1.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.1)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(model.input_layer.kernels, kernels, rtol=0, atol=0)
    assert not torch.allclose(model.features.block1.conv.weight, conv)  # the step did happen


def test_matches_scipy_on_the_interior_of_a_random_image():
    image = np.random.default_rng(0).standard_normal((180, 170))
    ours = DoGBank()(torch.from_numpy(image).float()[None, None])[0].double().numpy()
    ref = _scipy_bank(image, mode="reflect")  # any mode: the interior is 68 px from every border
    inner = (slice(None), slice(68, -68), slice(68, -68))
    assert ours.shape == (9, 180, 170)
    for c in range(9):
        scale = np.abs(ref[inner][c]).max()
        np.testing.assert_allclose(ours[inner][c], ref[inner][c], rtol=0, atol=1e-4 * scale, err_msg=f"channel {c}")


def test_matches_scipy_mirror_everywhere_even_on_an_image_smaller_than_the_kernel():
    image = np.random.default_rng(1).standard_normal((40, 33))  # radius 68: reflected several times
    ours = DoGBank()(torch.from_numpy(image).float()[None, None])[0].double().numpy()
    ref = _scipy_bank(image, mode="mirror")  # scipy's "mirror" is torch's "reflect" (d c b | a b c d)
    for c in range(9):
        np.testing.assert_allclose(ours[c], ref[c], rtol=0, atol=1e-4 * np.abs(ref[c]).max(), err_msg=f"channel {c}")


def test_impulse_response_of_each_dog_sums_to_zero():
    impulse = torch.zeros(1, 1, 161, 161, dtype=torch.float64)  # > 2 * 68 + 1: nothing reaches a border
    impulse[..., 80, 80] = 1.0
    out = DoGBank().double()(impulse)[0]
    torch.testing.assert_close(out[0], impulse[0, 0])  # channel 0 is the image itself
    sums = out[1:].sum(dim=(1, 2))
    assert sums.abs().max() < 1e-6, sums  # float32 kernels, each normalised to sum 1
    assert (out[1:, 80, 80] > 0).all()  # centre-surround: G(sigma_i) - G(sigma_i sqrt2) peaks positive
    flat = DoGBank()(torch.full((1, 1, 50, 50), 3.0))
    torch.testing.assert_close(flat[:, 1:], torch.zeros(1, 8, 50, 50), rtol=0, atol=1e-5)


def test_mirror_indices_match_numpy_reflect():
    for n, pad in [(10, 3), (10, 9), (5, 23), (2, 4), (1, 3)]:
        expected = np.pad(np.arange(n), pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, int)
        np.testing.assert_array_equal(mirror_indices(n, pad).numpy(), expected)


def test_rejects_anything_but_one_channel():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        DoGBank()(torch.zeros(2, 3, 32, 32))
