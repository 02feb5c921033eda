"""Crop modes: output size, centring, and boxes past the border (padded, never crashing)."""

import numpy as np
import pytest

from mammo_ray.data.crops import (box_centre, crop_padded, lesion_box, letterbox, mask_bbox, negative_boxes,
                                  resize, squarify)

BBOX = (100, 200, 140, 260)  # 40 wide, 60 tall, centre (120, 230)


def test_mask_bbox():
    mask = np.zeros((300, 200), bool)
    mask[200:260, 100:140] = True
    assert mask_bbox(mask) == BBOX
    assert mask_bbox(np.zeros((5, 5))) is None


@pytest.mark.parametrize("mode, size", [
    ("seed750", (750, 750)),
    ("patch", (256, 256)),
    ("fixed", (160, 160)),          # 60 + 2*50 tall, squared
    ("proportional", (120, 120)),   # 2 * 60 tall, squared
])
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
    ys, xs = np.mgrid[box[1]:box[3], box[0]:box[2]]
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
