"""Crop modes: output size, centring, boxes past the border (padded, never crashing), negatives from the
breast interior, and one value scale per source image."""

import numpy as np
import pytest
from scipy import ndimage

from mammo_ray.data.crops import (
    ValueMap,
    box_centre,
    breast_interior,
    crop_padded,
    crop_resized,
    lesion_box,
    letterbox,
    mask_bbox,
    negative_boxes,
    resize,
    source_value_map,
    squarify,
    store_uint16,
    to_uint16,
)

BBOX = (100, 200, 140, 260)  # 40 wide, 60 tall, centre (120, 230)


def test_mask_bbox():
    mask = np.zeros((300, 200), bool)
    mask[200:260, 100:140] = True
    assert mask_bbox(mask) == BBOX
    assert mask_bbox(np.zeros((5, 5))) is None


@pytest.mark.parametrize(
    "mode, size",
    [
        ("seed750", (750, 750)),
        ("patch", (256, 256)),
        ("fixed", (160, 160)),  # 60 + 2*50 tall, squared
        ("proportional", (120, 120)),  # 2 * 60 tall, squared
    ],
)
def test_lesion_box_size_and_centre(mode, size):
    box = lesion_box(mode, BBOX)
    assert (box[3] - box[1], box[2] - box[0]) == size
    cx, cy = box_centre(box)
    assert abs(cx - 120) <= 0.5 and abs(cy - 230) <= 0.5


def test_unsquared_boxes_keep_aspect():
    assert lesion_box("fixed", BBOX, square=False) == (50, 150, 190, 310)
    assert lesion_box("proportional", BBOX, square=False) == (80, 170, 160, 290)
    assert squarify((0, 0, 10, 4)) == (0, -3, 10, 7)


def test_crop_inside_is_exact():
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    np.testing.assert_array_equal(crop_padded(image, (10, 20, 30, 50)), image[20:50, 10:30])


@pytest.mark.parametrize("box", [(-20, -10, 30, 40), (60, 90, 120, 150), (-50, -50, 150, 150), (200, 200, 210, 220)])
def test_crop_past_border_is_padded(box):
    image = np.ones((100, 80), dtype=np.float32)
    out = crop_padded(image, box, fill=-1.0)
    assert out.shape == (box[3] - box[1], box[2] - box[0])
    inside = np.zeros(out.shape, bool)
    ys, xs = np.mgrid[box[1] : box[3], box[0] : box[2]]
    inside = (ys >= 0) & (ys < 100) & (xs >= 0) & (xs < 80)
    assert np.all(out[inside] == 1.0) and np.all(out[~inside] == -1.0)


def test_seed750_at_the_corner_of_a_small_image():
    image = np.random.default_rng(0).random((400, 300)).astype(np.float32)
    out = crop_padded(image, lesion_box("seed750", (0, 0, 4, 4)), fill=0)
    assert out.shape == (750, 750)
    # the image's top-left pixel sits at the crop's centre
    assert out[375 - 2, 375 - 2] == image[0, 0]


def test_resize_and_letterbox():
    image = np.full((400, 200), 7.0, np.float32)
    assert resize(image, (64, 32)).shape == (64, 32)
    np.testing.assert_allclose(resize(image, (64, 32)), 7.0, rtol=1e-5)
    out, scale, (ox, oy) = letterbox(image, (100, 100))
    assert out.shape == (100, 100) and scale == pytest.approx(0.25)
    assert (ox, oy) == (25, 0)
    assert out[50, 10] == 0 and out[50, 50] == pytest.approx(7.0)


def test_negative_boxes_avoid_lesions():
    breast = np.zeros((200, 200), bool)
    breast[:, :120] = True
    lesions = np.zeros((200, 200), bool)
    lesions[90:110, 50:70] = True
    boxes = negative_boxes(breast, lesions, 5, 32, np.random.default_rng(1))
    assert len(boxes) == 5
    for box in boxes:
        assert not crop_padded(lesions, box, fill=0).any()
        cx, cy = box_centre(box)
        assert breast[int(cy), int(cx)]
    # no room at all: fewer boxes, no error
    assert negative_boxes(breast, np.ones((200, 200), bool), 3, 32, np.random.default_rng(1)) == []


def half_disc(h: int = 400, w: int = 240) -> np.ndarray:
    """A breast as a half-disc against the left edge (the chest wall), radius 190 px."""
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + xx**2 < 190**2


@pytest.mark.parametrize("side", [64, 96])  # block steps 2 and 3: the coarse path is conservative
def test_negative_centres_lie_in_the_breast_interior(side):
    breast = half_disc()
    depth = ndimage.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]  # the image edge is a boundary too
    boxes = negative_boxes(breast, np.zeros_like(breast), 40, side, np.random.default_rng(0))
    assert len(boxes) == 40
    for box in boxes:
        cx, cy = (int(v) for v in box_centre(box))
        assert depth[cy, cx] >= side / 4
    interior = breast_interior(breast, side / 4)
    assert interior.any() and (depth[interior] >= side / 4).all()
    # the coarse answer gives up little: most of the exact interior is kept
    assert interior.sum() > 0.8 * (depth >= side / 4).sum()


def test_thin_breast_falls_back_to_its_deepest_pixels():
    breast = np.zeros((100, 100), bool)
    breast[40:46, :] = True  # 6 px thick: nothing is 16 px deep
    interior = breast_interior(breast, 16)
    depth = ndimage.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]
    assert interior.any() and (depth[interior] == depth.max()).all()
    assert not breast_interior(np.zeros((50, 50), bool), 16).any()


@pytest.mark.parametrize(
    "image, expected",
    [
        (np.array([[0, 255], [17, 3]], np.float32), ValueMap(0.0, 257.0)),  # 8-bit: fixed x257
        (np.array([[0, 1], [1, 0]], np.float32), ValueMap(0.0, 257.0)),  # integer 0/1: still 8-bit
        (np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), ValueMap(0.0, 65535.0)),  # floats in [0, 1]
        (np.array([[0, 4095], [300, 12]], np.float32), ValueMap(0.0, 1.0)),  # 12/16-bit kept as is
        (np.array([[-100, 100], [0, 50]], np.float32), ValueMap(-100.0, 65535.0 / 200)),  # signed: own min..max
    ],
)
def test_source_value_map(image, expected):
    got = source_value_map(image)
    assert got.offset == pytest.approx(expected.offset) and got.scale == pytest.approx(expected.scale)
    stored = store_uint16(image, got)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, np.rint((image.astype(np.float64) - got.offset) * got.scale))


def test_crops_of_one_eight_bit_image_share_its_scale():
    # One 8-bit film, a dark region and a bright one: a per-crop stretch would bring both to 0..65535.
    rng = np.random.default_rng(0)
    image = np.zeros((200, 200), np.float32)
    image[:, :100] = rng.integers(10, 40, (200, 100))
    image[:, 100:] = rng.integers(150, 250, (200, 100))
    value_map = source_value_map(image)
    dark = store_uint16(crop_resized(image, (10, 10, 74, 74), 32), value_map)
    bright = store_uint16(crop_resized(image, (120, 10, 184, 74), 32), value_map)
    assert value_map == ValueMap(0.0, 257.0)
    assert bright.mean() > 4 * dark.mean()
    assert dark.max() <= 40 * 257 and bright.min() >= 150 * 257  # neither crop was stretched
    # to_uint16 with the source's map is the same; without it, a crop is its own source
    assert np.array_equal(to_uint16(crop_resized(image, (10, 10, 74, 74), 32), value_map)[0], dark)
    assert to_uint16(np.full((4, 4), 3000.0))[1] == 1.0
