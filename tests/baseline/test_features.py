"""Hand-crafted lesion features (paper 000 §2.4): synthetic shapes and textures, hand-counted runs."""

from collections import Counter

import numpy as np
import pytest

from mammo_ray.baseline.features import (
    ANGLES,
    FEATURE_NAMES,
    glrlm_features,
    largest_component,
    lesion_features,
    quantize,
    run_length_matrix,
    run_lengths,
)

SIZE = 64


def polar() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2
    return np.hypot(yy, xx), np.arctan2(yy, xx)


def disc(radius: float = 14) -> np.ndarray:
    r, _ = polar()
    return (r < radius).astype(np.uint8)


def star(radius: float = 14, points: int = 5) -> np.ndarray:
    """A spiculated outline: a core of 0.7 x radius with ``points`` sharp spikes to 1.3 x radius."""
    r, theta = polar()
    return (r < radius * (0.7 + 0.6 * np.abs(np.cos(points * theta / 2)) ** 6)).astype(np.uint8)


def textured(rng: np.random.Generator, noise: float) -> np.ndarray:
    """A bright lesion on a darker background: a smooth ramp plus white noise of ``noise`` std."""
    r, _ = polar()
    ramp = np.linspace(0, 100, SIZE)[None, :] * np.ones((SIZE, 1))
    image = 10_000 + 2_000 * (r < 14) + ramp + rng.normal(0, noise, (SIZE, SIZE))
    return np.clip(image, 0, 65_535).astype(np.uint16)


def feature(vector: np.ndarray, name: str) -> float:
    return float(vector[FEATURE_NAMES.index(name)])


def test_vector_has_one_finite_value_per_name():
    vector = lesion_features(textured(np.random.default_rng(0), 50), disc())
    assert vector.shape == (len(FEATURE_NAMES),) and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert np.all(np.isfinite(vector))


@pytest.mark.parametrize("name", ["shape_radial_cv", "shape_radial_peaks", "shape_compactness", "shape_perimeter"])
def test_star_is_rougher_than_disc(name):
    image = textured(np.random.default_rng(1), 50)
    assert feature(lesion_features(image, star()), name) > feature(lesion_features(image, disc()), name)


def test_shape_values_of_disc_and_star():
    image = textured(np.random.default_rng(2), 50)
    round_, spiky = lesion_features(image, disc()), lesion_features(image, star(points=5))
    assert feature(round_, "shape_compactness") == pytest.approx(1.0, abs=0.1)
    assert feature(round_, "shape_radial_cv") < 0.03 and feature(round_, "shape_radial_peaks") == 0
    assert feature(round_, "shape_eccentricity") < 0.1 and feature(round_, "shape_solidity") > 0.95
    assert feature(round_, "shape_area") == pytest.approx(np.pi * 14**2 / SIZE**2, rel=0.05)
    assert feature(spiky, "shape_radial_peaks") == 5
    assert feature(spiky, "shape_solidity") < 0.8


def test_noisy_texture_has_higher_glcm_contrast():
    flat = lesion_features(textured(np.random.default_rng(3), 0), disc())
    noisy = lesion_features(textured(np.random.default_rng(3), 300), disc())
    for d in (1, 2, 4):
        assert feature(noisy, f"glcm_contrast_d{d}") > 4 * feature(flat, f"glcm_contrast_d{d}")
    assert feature(noisy, "glcm_homogeneity_d1") < feature(flat, "glcm_homogeneity_d1")
    assert feature(noisy, "glrlm_sre") > feature(flat, "glrlm_sre")  # noise breaks runs up
    assert feature(noisy, "int_std") > feature(flat, "int_std")


def test_bright_lesion_has_positive_ring_contrast_and_sharp_margin():
    image = textured(np.random.default_rng(4), 20)
    vector = lesion_features(image, disc())
    assert feature(vector, "int_ring_contrast") > 1.0
    blurred = lesion_features(np.full_like(image, 10_000), disc())  # no edge at all
    assert feature(vector, "int_margin_sharpness") > feature(blurred, "int_margin_sharpness") == 0.0


# Hand example: every maximal run of equal levels, per direction.
HAND_Q = np.array([[0, 0, 1, 1], [1, 1, 1, 0], [2, 2, 2, 2], [0, 1, 0, 1]])
HAND_RUNS = {  # angle index -> Counter of (level, length)
    0: Counter({(0, 2): 1, (1, 2): 1, (1, 3): 1, (0, 1): 3, (2, 4): 1, (1, 1): 2}),
    # 45 deg lines (r + c constant): 0 | 0 1 | 1 1 2 | 1 1 2 0 | 0 2 1 | 2 0 | 1
    1: Counter({(0, 1): 5, (1, 1): 3, (1, 2): 2, (2, 1): 4}),
    # columns: 0 1 2 0 | 0 1 2 1 | 1 1 2 0 | 1 0 2 1
    2: Counter({(0, 1): 5, (1, 1): 5, (2, 1): 4, (1, 2): 1}),
    # 135 deg lines (c - r constant): no two neighbours agree
    3: Counter({(0, 1): 5, (1, 1): 7, (2, 1): 4}),
}
# [SRE, LRE, GLN, RLN, RP] per direction from the runs above (Galloway's formulas).
HAND_GLRLM = [
    [(4 * 1 + 2 / 4 + 1 / 9 + 1 / 16 + 1) / 9, 38 / 9, (16 + 16 + 1) / 9, (25 + 4 + 1 + 1) / 9, 9 / 16],
    [(12 + 2 / 4) / 14, 20 / 14, (25 + 25 + 16) / 14, (144 + 4) / 14, 14 / 16],
    [(14 + 1 / 4) / 15, 18 / 15, (25 + 36 + 16) / 15, (196 + 1) / 15, 15 / 16],
    [1.0, 1.0, (25 + 49 + 16) / 16, 256 / 16, 1.0],
]


@pytest.mark.parametrize("angle_index", range(len(ANGLES)))
def test_run_lengths_match_hand_count(angle_index):
    levels, lengths = run_lengths(HAND_Q, angle_index)
    assert Counter(zip(levels.tolist(), lengths.tolist(), strict=True)) == HAND_RUNS[angle_index]
    matrix = run_length_matrix(HAND_Q, 3, angle_index)
    assert matrix.shape == (3, 4) and matrix.sum() == sum(HAND_RUNS[angle_index].values())
    for (level, length), count in HAND_RUNS[angle_index].items():
        assert matrix[level, length - 1] == count


def test_glrlm_features_match_hand_values():
    np.testing.assert_allclose(glrlm_features(HAND_Q, 3), np.mean(HAND_GLRLM, axis=0), rtol=1e-12)


def test_runs_stop_at_the_region_border():
    q = np.array([[1, 1, -1, 1, 1, 1]])
    levels, lengths = run_lengths(q, 0)
    assert levels.tolist() == [1, 1] and lengths.tolist() == [2, 3]


def test_quantize_spans_the_region_range_only():
    image = np.array([[0, 100, 200], [300, 400, 60_000]])
    region = np.array([[False, True, True], [True, True, False]])
    q = quantize(image, region, 4)
    assert q.tolist() == [[-1, 0, 1], [2, 3, -1]]
    assert quantize(np.full((2, 2), 7), np.ones((2, 2), bool), 8).tolist() == [[0, 0], [0, 0]]


def test_largest_component():
    mask = disc(12)
    mask[:4, :4] = 1  # a small second blob in the corner
    assert largest_component(mask).sum() == disc(12).sum()
    with pytest.raises(ValueError, match="mask is empty"):
        largest_component(np.zeros((4, 4)))


def test_the_own_mask_is_the_lesion_whole():
    # The cache stores each lesion's own ROI, so every component of it is this lesion (e.g. a
    # calcification cluster): nothing is dropped as a supposed neighbour.
    mask = disc(12)
    mask[:4, :4] = 1
    image = textured(np.random.default_rng(5), 20)
    assert feature(lesion_features(image, mask), "shape_area") == pytest.approx(mask.sum() / SIZE**2)
    assert feature(lesion_features(image, disc(12)), "shape_area") == pytest.approx(disc(12).sum() / SIZE**2)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="mask is empty"):
        lesion_features(np.ones((8, 8), np.uint16), np.zeros((8, 8), np.uint8))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(8, 9\)"):
        lesion_features(np.ones((8, 8), np.uint16), np.ones((8, 9), np.uint8))


@pytest.mark.parametrize(
    "mask", [np.pad(np.ones((1, 1), np.uint8), 3), np.ones((7, 7), np.uint8)], ids=["one_pixel", "whole_crop"]
)
def test_degenerate_lesions_give_finite_features(mask):
    image = np.random.default_rng(6).integers(0, 4_000, mask.shape).astype(np.uint16)
    vector = lesion_features(image, mask)
    assert np.all(np.isfinite(vector))
    if mask.all():  # no room for a ring around the lesion
        assert feature(vector, "int_ring_contrast") == 0.0
