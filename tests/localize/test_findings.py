"""Boxes from probability maps and paper 003's FROC evaluation: hand-made maps, known values."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mammo_ray.data.crops import mask_bbox
from mammo_ray.localize.findings import Finding, find_boxes, mask_to_grid, roi_to_grid
from mammo_ray.localize.froc import FROCResult, evaluate_image, froc, plot_froc


def two_blob_map() -> np.ndarray:
    """A (20, 30) map: blob A (rows 2:5, cols 3:7, peak 0.7), blob B (rows 10:12, cols 20:25, 0.9)."""
    prob = np.zeros((20, 30))
    prob[2:5, 3:7] = 0.5
    prob[3, 4] = 0.7
    prob[10:12, 20:25] = 0.9
    return prob


def square(shape=(20, 20), rows=slice(5, 10), cols=slice(5, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


# ---- find_boxes / mask_to_grid -------------------------------------------------------------


def test_find_boxes_two_blobs_full_resolution():
    boxes = find_boxes(two_blob_map(), 0.4)
    assert boxes == [Finding(20, 10, 25, 12, 0.9, 10.0), Finding(3, 2, 7, 5, 0.7, 12.0)]
    assert boxes[0].box == mask_bbox(two_blob_map() == 0.9)  # the crops.Box convention
    assert boxes[1].to_dict() == {"x0": 3, "y0": 2, "x1": 7, "y1": 5, "score": 0.7, "area": 12.0}


def test_find_boxes_scale_offset_and_filters():
    boxes = find_boxes(two_blob_map(), 0.4, scale=8, offset=(4, -2))
    # original = map_px * 8 + offset; x1/y1 exclusive; area in original pixels.
    assert [b.box for b in boxes] == [(164, 78, 204, 94), (28, 14, 60, 38)]
    assert [b.area for b in boxes] == [640.0, 768.0]
    assert [b.score for b in find_boxes(two_blob_map(), 0.4, max_boxes=1)] == [0.9]
    assert [b.score for b in find_boxes(two_blob_map(), 0.4, min_area=11)] == [0.7]  # map pixels
    assert [b.score for b in find_boxes(two_blob_map(), 0.8)] == [0.9]
    assert find_boxes(two_blob_map(), 0.95) == []
    # Fractional geometry widens outwards to whole pixels.
    assert find_boxes(two_blob_map(), 0.8, scale=2.5, offset=(0.5, 0))[0].box == (50, 25, 63, 30)


def test_find_boxes_is_eight_connected():
    prob = np.zeros((4, 4))
    prob[0, 0] = prob[1, 1] = prob[2, 2] = 1.0
    assert [b.box for b in find_boxes(prob, 0.5)] == [(0, 0, 3, 3)]


def test_find_boxes_rejects_bad_input():
    with pytest.raises(ValueError, match=r"prob_map.*shape \(3,\)"):
        find_boxes(np.zeros(3), 0.5)
    with pytest.raises(ValueError, match="1 of 4 values are NaN"):
        find_boxes(np.array([[0.0, np.nan], [0.0, 0.0]]), 0.5)
    with pytest.raises(ValueError, match="scale"):
        find_boxes(np.zeros((2, 2)), 0.5, scale=0)


def test_mask_to_grid_any_and_fraction():
    mask = np.zeros((16, 16), dtype=bool)
    mask[9, 3] = True
    assert mask_to_grid(mask, (2, 2), 8).tolist() == [[False, False], [True, False]]
    # Offset (-4, -4): cell (i, j) covers rows/cols [8i - 4, 8i + 4).
    grid = mask_to_grid(mask, (3, 3), 8, (-4, -4))
    assert np.argwhere(grid).tolist() == [[1, 0]]
    half = np.zeros((16, 16), dtype=bool)
    half[0:8, 0:4] = True  # half of cell (0, 0)
    assert mask_to_grid(half, (2, 2), 8, min_fraction=0.5).tolist() == [[True, False], [False, False]]
    assert not mask_to_grid(half, (2, 2), 8, min_fraction=0.6).any()
    # Cells past the image edge: fraction of the in-image pixels; wholly outside -> False.
    assert mask_to_grid(np.ones((4, 4)), (2, 2), 4, (0, 0), min_fraction=1.0).tolist() == [
        [True, False],
        [False, False],
    ]
    assert mask_to_grid(half, (16, 16)).tolist() == half.tolist()  # scale 1: identity


def test_roi_to_grid_keeps_every_roi_apart_and_on_the_grid():
    # A dense map's geometry: 8-px cells, the first one 4 px in from the border (half a window less
    # half a stride), 11 x 7 cells over a 96 x 64 image: pixels 0-3 and 60-63 belong to no cell.
    shape, grid, scale, offset = (96, 64), (11, 7), 8.0, (4.0, 4.0)
    left, right = square(shape, slice(20, 30), slice(20, 30)), square(shape, slice(20, 30), slice(30, 40))
    border = square(shape, slice(40, 43), slice(0, 3))  # 3 x 3 px, in the margin no cell reaches
    union = mask_to_grid(left | right | border, grid, scale, offset)
    assert ndimage.label(union, np.ones((3, 3)))[1] == 1  # the old union: 3 lesions became 1 ROI
    layers = [roi_to_grid(m, grid, scale, offset) for m in (left, right, border)]
    assert [int(g.sum()) for g in layers] == [4, 4, 1]
    assert np.argwhere(layers[0]).tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]  # cells 2-3 touch px 20-29
    assert np.argwhere(layers[1]).tolist() == [[2, 3], [2, 4], [3, 3], [3, 4]]  # shares column 3 with left
    assert np.argwhere(layers[2]).tolist() == [[4, 0]]  # the cell nearest its centre (1.5, 41.5)
    # inside the grid, it is exactly mask_to_grid's any-pooling, computed on the ROI's box only
    assert (layers[0] == mask_to_grid(left, grid, scale, offset)).all()
    assert not roi_to_grid(np.zeros(shape), grid, scale, offset).any()  # nothing to place
    corner = square(shape, slice(94, 96), slice(62, 64))
    assert np.argwhere(roi_to_grid(corner, grid, scale, offset)).tolist() == [[10, 6]]


def test_a_stack_of_rois_counts_each_lesion_and_an_empty_one_as_missed():
    left, right = square((20, 20), slice(5, 10), slice(2, 6)), square((20, 20), slice(5, 10), slice(6, 10))
    prob = np.where(left, 0.9, 0.0)
    prob[15:17, 15:17] = 0.6  # a false positive away from both
    union = froc([prob], [left | right], [0.5])
    assert (union.n_rois, union.sensitivity.tolist()) == (1, [1.0])  # the old input merges them
    stack = np.stack([left, right, np.zeros((20, 20), bool)])  # the third lesion could not be placed
    result = froc([prob], [stack], [0.5])
    assert result.n_rois == 3 and result.sensitivity.tolist() == [pytest.approx(1 / 3)]
    assert result.fp_per_image.tolist() == [1.0] and result.image_labels.tolist() == [1]
    assert result.roi_scores[:2].tolist() == [0.9, 0.0] and math.isnan(result.roi_scores[2])
    assert json.loads(json.dumps(result.to_dict()))["roi_scores"] == [0.9, 0.0, None]
    # overlapping layers: one peak inside both localizes both under the peak rule
    both = np.stack([square((20, 20), slice(5, 10), slice(5, 10)), square((20, 20), slice(8, 12), slice(8, 12))])
    peak = np.zeros((20, 20))
    peak[9, 9] = 0.8
    record = evaluate_image(peak, both, [0.5], hit="peak")
    assert record.detected.tolist() == [[True], [True]] and record.false_positives.tolist() == [0]
    with pytest.raises(ValueError, match=r"gt_mask shape \(2, 8, 8\)"):
        froc([np.zeros((8, 9))], [np.zeros((2, 8, 8))])


# ---- froc ----------------------------------------------------------------------------------


def test_perfect_map():
    mask = square()
    prob = 0.9 * mask
    result = froc([prob, np.zeros((20, 20))], [mask, np.zeros((20, 20))], [0.1, 0.5, 0.95])
    assert (result.n_images, result.n_rois) == (2, 1)
    assert result.sensitivity.tolist() == [1.0, 1.0, 0.0]
    assert result.fp_per_image.tolist() == [0.0, 0.0, 0.0]
    assert result.image_accuracy.tolist() == [1.0, 1.0, 0.5]
    assert result.image_auc == 1.0
    assert result.sensitivity_at(0.0) == 1.0
    assert result.operating_point(0.5) == {
        "threshold": 0.5,
        "sensitivity": 1.0,
        "fp_per_image": 0.0,
        "image_accuracy": 1.0,
    }


def test_extra_blob_is_one_false_positive_per_two_images():
    mask = square()
    prob = 0.65 * mask
    prob[15:17, 15:17] = 0.6  # a blob away from the ROI
    prob[10, 10] = 0.6  # touches the ROI's corner (8-connected): not a false positive
    empty = np.zeros((20, 20))
    result = froc([prob, empty], [mask, empty], [0.3, 0.5, 0.6, 0.7])
    assert result.fp_per_image.tolist() == [0.5, 0.5, 0.5, 0.0]  # 1 FP on image 0 while t <= 0.6
    assert result.sensitivity.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert result.sensitivity_at(0.5) == 1.0
    assert result.sensitivity_at(0.4) == 0.0  # only t = 0.7 stays within budget
    assert evaluate_image(prob, mask, [0.3, 0.7]).false_positives.tolist() == [1, 0]


def test_mean_and_max_reduce_differ():
    mask = square(rows=slice(2, 6), cols=slice(2, 6))  # 16 pixels
    prob = np.where(mask, 0.1, 0.0)
    prob[3, 3] = 0.9  # max 0.9, mean (0.9 + 15 * 0.1) / 16 = 0.15
    by_max = froc([prob], [mask], [0.1, 0.5], reduce="max")
    by_mean = froc([prob], [mask], [0.1, 0.5], reduce="mean")
    assert by_max.roi_scores.tolist() == [0.9]
    assert by_mean.roi_scores.tolist() == pytest.approx([0.15])
    assert by_max.sensitivity.tolist() == [1.0, 1.0]
    assert by_mean.sensitivity.tolist() == [1.0, 0.0]
    assert by_mean.fp_per_image.tolist() == by_max.fp_per_image.tolist() == [0.0, 0.0]


def test_image_accuracy_and_auc_by_hand():
    # Image scores (map max) 0.9, 0.3 on mass images and 0.6, 0.2 on mass-free ones.
    masks, maps = [], []
    for score, has_mass in [(0.9, True), (0.3, True), (0.6, False), (0.2, False)]:
        mask = square((16, 16), slice(4, 8), slice(4, 8)) if has_mass else np.zeros((16, 16), bool)
        prob = np.zeros((16, 16))
        prob[4:8, 4:8] = score if has_mass else 0.0
        if not has_mass:
            prob[12, 12] = score
        masks.append(mask)
        maps.append(prob)
    result = froc(maps, masks, [0.25, 0.5])
    assert result.image_labels.tolist() == [1, 1, 0, 0]
    assert result.image_accuracy.tolist() == [0.75, 0.5]  # calls [1,1,1,0] and [1,0,1,0]
    assert result.image_auc == 0.75  # 3 of 4 (pos, neg) pairs ordered
    assert result.fp_per_image.tolist() == [0.25, 0.25]  # the 0.6 blob on image 2
    assert result.sensitivity.tolist() == [1.0, 0.5]


def test_no_roi_at_all_is_undefined_not_a_crash():
    result = froc([np.zeros((8, 8)), np.full((8, 8), 0.7)], [np.zeros((8, 8))] * 2, [0.5])
    assert result.n_rois == 0 and math.isnan(result.sensitivity[0])
    assert math.isnan(result.sensitivity_at(1.0)) and math.isnan(result.image_auc)
    assert result.fp_per_image.tolist() == [0.5]
    d = json.loads(json.dumps(result.to_dict()))
    assert d["sensitivity"] == [None] and d["image_auc"] is None and d["sensitivity_at_1fp"] is None
    assert "no ground-truth ROI" in d["sensitivity_note"]
    with pytest.raises(ValueError, match="no ground-truth ROI"):
        plot_froc(result, "unused.png")


def test_sensitivity_at_is_a_step_function():
    result = FROCResult(
        thresholds=np.array([0.2, 0.4, 0.6]),
        sensitivity=np.array([0.9, 0.8, 0.5]),
        fp_per_image=np.array([2.0, 0.9, 0.3]),
        image_accuracy=np.zeros(3),
        image_auc=0.5,
        n_images=10,
        n_rois=10,
        reduce="max",
        hit="overlap",
        roi_scores=np.zeros(10),
        image_scores=np.zeros(10),
        image_labels=np.zeros(10),
    )
    assert [result.sensitivity_at(fp) for fp in (0.1, 0.3, 0.89, 0.9, 1.0, 5.0)] == [0.0, 0.5, 0.5, 0.8, 0.8, 0.9]
    assert result.to_dict()["operating_point_at_1fp"]["threshold"] == 0.4
    with pytest.raises(ValueError, match="0.45 was not evaluated"):
        result.operating_point(0.45)


def synthetic_set(seed: int = 0, n: int = 10, size: int = 64):
    """Masks with one disc on 7 of 10 images; an informative map and a random one per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks, informative, random = [], [], []
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        if i < 7:
            cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(5, 9))]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks.append(mask)
        blurred = ndimage.gaussian_filter(mask * 1.0, 2)
        informative.append(np.clip(0.6 * blurred + rng.normal(0, 0.15, mask.shape), 0, 1))
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), 3)  # blobs, sd ~ 0.094
        random.append(np.clip(0.5 + 1.5 * noise, 0, 1))
    return masks, informative, random


def test_informative_map_beats_random_heatmap(tmp_path):
    masks, informative, random = synthetic_set()
    good, bad = froc(informative, masks, hit="peak"), froc(random, masks, hit="peak")
    assert good.n_rois == bad.n_rois == 7 and good.n_images == 10
    assert good.sensitivity_at(1.0) >= 0.85
    assert bad.sensitivity_at(1.0) <= 0.3
    assert good.image_auc == 1.0 and bad.image_auc < 0.75
    path = plot_froc(
        good, tmp_path / "figs" / "froc.png", label="blurred mask + noise", compare={"random heatmap": bad}
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    json.dumps(good.to_dict())  # JSON-safe


def test_overlap_rule_cannot_tell_random_from_informative():
    """The documented caveat of hit="overlap": big blobs touching an ROI are never penalised."""
    masks, informative, random = synthetic_set()
    good, bad = froc(informative, masks), froc(random, masks)
    assert good.sensitivity_at(1.0) == bad.sensitivity_at(1.0) == 1.0
    assert bad.to_dict()["operating_point_at_1fp"]["fp_per_image"] == 0.3  # 3 mass-free images, 1 blob each


def test_peak_rule_on_a_map_high_everywhere():
    mask = square()
    flat = np.full((20, 20), 0.8)  # one blob; its first maximum pixel (0, 0) is outside the ROI
    by_overlap = froc([flat], [mask], [0.5])
    by_peak = froc([flat], [mask], [0.5], hit="peak")
    assert (by_overlap.sensitivity.tolist(), by_overlap.fp_per_image.tolist()) == ([1.0], [0.0])
    assert (by_peak.sensitivity.tolist(), by_peak.fp_per_image.tolist()) == ([0.0], [1.0])
    peaked = flat.copy()
    peaked[7, 7] = 0.9  # now the blob's peak is inside the ROI: a hit, no FP
    assert evaluate_image(peaked, mask, [0.5], hit="peak").detected.tolist() == [[True]]
    assert evaluate_image(peaked, mask, [0.5], hit="peak").false_positives.tolist() == [0]


# ---- errors --------------------------------------------------------------------------------


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no images"):
        froc([], [])
    with pytest.raises(ValueError, match=r"image 1: prob_map shape \(8, 8\) != gt_mask shape \(8, 9\)"):
        froc([np.zeros((8, 8))] * 2, [np.zeros((8, 8)), np.zeros((8, 9))])
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        froc([np.zeros((8, 8))] * 2, [np.zeros((8, 8))])
    with pytest.raises(ValueError, match="reduce must be one of"):
        froc([np.zeros((8, 8))], [np.zeros((8, 8))], reduce="median")
    with pytest.raises(ValueError, match="hit must be one of"):
        froc([np.zeros((8, 8))], [np.zeros((8, 8))], hit="centre")
    with pytest.raises(ValueError, match="thresholds"):
        evaluate_image(np.zeros((8, 8)), np.zeros((8, 8)), [])
