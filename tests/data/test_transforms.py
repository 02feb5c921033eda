"""Transforms: shapes, normalisation values, determinism, offline 25x, the spec round trip."""

import numpy as np
import pytest
import torch

from mammo_ray.config import DataConfig
from mammo_ray.data.transforms import (
    TransformSpec,
    build_eval_transform,
    build_offline_transform,
    build_train_transform,
    offline_variant_params,
)


def crop(seed=0, size=64):
    return np.random.default_rng(seed).integers(1000, 3000, (size, size)).astype(np.uint16)


def spec(**kw):
    base = dict(cache_px=64, input_px=48, channels=3)
    return TransformSpec(**{**base, **kw})


def test_eval_is_deterministic_and_normalised():
    t = build_eval_transform(spec())
    a, b = t(crop()), t(crop())
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    # per-crop z-score: the full crop has mean 0 / std 1, so the centre crop is close to that
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])  # grayscale replicated


def test_mean_image_subtraction():
    mean = np.full((64, 64), 2000.0, np.float32)
    t = build_eval_transform(spec(normalization="mean_image", mean_image=mean, train_std=500.0, channels=1))
    x = np.full((64, 64), 2500, np.uint16)
    out = t(x)
    assert out.shape == (1, 48, 48)
    torch.testing.assert_close(out, torch.ones(1, 48, 48))


def test_global_normalisation_is_one_affine_map():
    t = build_eval_transform(spec(normalization="global", train_mean=2000.0, train_std=500.0, channels=1))
    x = crop()
    out = t(x)
    # the same affine map for every pixel (then the resize), unlike the per-crop z-score
    expected = build_eval_transform(spec(normalization="global", train_mean=0.0, train_std=1.0, channels=1))(x)
    torch.testing.assert_close(out, (expected - 2000.0) / 500.0, rtol=1e-5, atol=1e-4)
    assert abs(float(out.mean()) - (float(x.mean()) - 2000.0) / 500.0) < 0.05


def test_resizes_other_sizes_to_cache_px():
    out = build_eval_transform(spec())(crop(size=100))
    assert out.shape == (3, 48, 48)


def test_train_transform_varies_and_rotates_with_mean_fill():
    torch.manual_seed(0)
    t = build_train_transform(spec(rotation_deg=45, channels=1))
    outs = [t(crop()) for _ in range(4)]
    assert all(o.shape == (1, 48, 48) for o in outs)
    assert not torch.equal(outs[0], outs[1])


def test_integer_rotation_fills_with_the_mean():
    from mammo_ray.data.transforms import Normalize, RandomIntegerRotation

    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 2000 + 1000).astype(np.uint16)  # mean 2000
    x = Normalize(spec())(torch.from_numpy(checker.astype(np.float32))[None])
    torch.testing.assert_close(x.abs(), torch.ones_like(x), atol=1e-3, rtol=0)
    torch.manual_seed(1)
    rotated = RandomIntegerRotation(45)(x)
    # corners come from outside the image: exactly the normalised mean, 0
    assert rotated[0, 0, 0] == 0 and rotated[0, -1, -1] == 0
    assert not torch.equal(rotated, x)


def test_offline_variants_are_25_fixed_and_distinct():
    s = spec(channels=1, hflip=False)
    params = offline_variant_params(seed=3, sample=7, spec=s)
    assert len(params) == 25 and params == offline_variant_params(3, 7, s)
    assert params != offline_variant_params(3, 8, s)
    assert len({p[0] for p in params}) <= 5 and all(0 <= p[0] < 360 for p in params)
    assert all(0 <= p[1] <= 16 and 0 <= p[2] <= 16 for p in params)
    apply = build_offline_transform(s)
    a, b = apply(crop(), params[0]), apply(crop(), params[0])
    torch.testing.assert_close(a, b)
    assert a.shape == (1, 48, 48)


def test_spec_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = DataConfig(normalization="mean_image", cache_px=64, input_px=48, rotation_deg=10)
    s = TransformSpec.from_config(cfg, train_mean=1.5, train_std=2.5, mean_image=np.ones((64, 64), np.float32))
    torch.save({"transform": s.to_state()}, tmp_path / "c.pt")
    back = TransformSpec.from_state(torch.load(tmp_path / "c.pt", weights_only=True)["transform"])
    assert back == s and back.rotation_deg == 10 and back.train_std == 2.5
    np.testing.assert_array_equal(back.mean_image, s.mean_image)
    with pytest.raises(ValueError, match="mean_image"):
        TransformSpec.from_config(cfg)


def blob(size: int = 64, radius: int = 10) -> np.ndarray:
    """A bright disc on a flat background, centred."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    return np.where(np.hypot(yy, xx) < radius, 3000, 1000).astype(np.uint16)


def blob_area(x: torch.Tensor) -> int:
    return int((x[0] > x[0].mean() + 0.5 * x[0].std()).sum())  # bright pixels after normalisation


def test_scale_aug_changes_apparent_size_and_leaves_eval_alone():
    # no crop jitter to speak of (input_px = cache_px), no flips: only the zoom changes the blob
    base = dict(cache_px=64, input_px=64, channels=1, hflip=False)
    plain, zoomed = spec(**base), spec(**base, scale_aug=(0.6, 1.4))
    areas = []
    for seed in range(12):
        torch.manual_seed(seed)
        areas.append(blob_area(build_train_transform(zoomed)(blob())))
    torch.manual_seed(0)
    unzoomed = blob_area(build_train_transform(plain)(blob()))
    assert min(areas) < 0.8 * unzoomed < unzoomed * 1.25 < max(areas)
    assert all(0.3 * unzoomed < a < 2.2 * unzoomed for a in areas)  # within the (0.6, 1.4)^2 area range
    # zoom is training-only: the eval transform of a scale_aug spec is the plain one
    torch.testing.assert_close(build_eval_transform(zoomed)(blob()), build_eval_transform(plain)(blob()))


def test_scale_aug_from_config_is_checked_and_round_trips(tmp_path):
    cfg = DataConfig(cache_px=64, input_px=48, scale_aug=(0.8, 1.2))
    s = TransformSpec.from_config(cfg)
    assert s.scale_aug == (0.8, 1.2)
    torch.save({"transform": s.to_state()}, tmp_path / "c.pt")
    assert TransformSpec.from_state(torch.load(tmp_path / "c.pt", weights_only=True)["transform"]) == s
    assert TransformSpec.from_config(DataConfig(cache_px=64, input_px=48)).scale_aug is None
    with pytest.raises(ValueError, match=r"data.scale_aug.*\(1.2, 0.8\)"):
        TransformSpec.from_config(DataConfig(cache_px=64, input_px=48, scale_aug=(1.2, 0.8)))
