"""Directed Dream (paper 000, Algorithm 1): alterations undone, scores moved, frames rendered."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mammo_ray.explain import DreamConfig, directed_dream, save_dream_frame, save_dream_gif
from mammo_ray.explain.dream import Alteration, draw_alteration, zscore
from mammo_ray.explain.dream_render import MARGIN_PX, PANEL_PX
from mammo_ray.models import create_view_model

STEPS = 8


def _logit(p):
    p = p.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_and_turns_are_undone_exactly(flip, turns):
    x = torch.randn(2, 3, 5, 7)
    alteration = Alteration(flip, turns)
    altered = alteration.apply(x)
    assert altered.shape == ((2, 3, 7, 5) if turns % 2 else x.shape)
    assert torch.equal(alteration.invert_update(altered), x)


def test_zeroed_boxes_get_no_update_and_small_angles_invert():
    x = torch.randn(1, 1, 6, 8) + 5
    alteration = Alteration(True, 1, boxes=((0, 0, 2, 3),))  # in the altered (8, 6) frame
    altered = alteration.apply(x)
    assert (altered[0, 0, :2, :3] == 0).all() and (altered != 0).sum() == 48 - 6
    back = alteration.invert_update(torch.ones_like(altered))
    assert back.sum() == 48 - 6 and torch.equal(back * x, alteration.invert_update(altered))
    smooth = torch.linspace(-1, 1, 32).expand(1, 1, 32, 32) + torch.linspace(-1, 1, 32)[:, None]
    turned = Alteration(False, 0, angle=7.0)
    roundtrip = turned.invert_update(turned.apply(smooth))
    assert (roundtrip[..., 8:24, 8:24] - smooth[..., 8:24, 8:24]).abs().max() < 0.02
    assert (turned.apply(smooth) - smooth).abs().max() > 0.05


def test_draw_alteration_follows_the_config_and_the_generator():
    config = DreamConfig("malignant", boxes=4, box_frac=0.25)
    a = draw_alteration(np.random.default_rng(3), 40, 20, config)
    assert a == draw_alteration(np.random.default_rng(3), 40, 20, config)
    h, w = (20, 40) if a.quarter_turns % 2 else (40, 20)  # boxes live in the turned frame
    assert len(a.boxes) == 4 and abs(a.angle) <= 10
    for top, left, bh, bw in a.boxes:
        assert 1 <= bh <= h // 4 and 1 <= bw <= w // 4 and 0 <= top <= h - bh and 0 <= left <= w - bw
    turned = [draw_alteration(np.random.default_rng(s), 40, 20, config).quarter_turns for s in range(40)]
    assert set(turned) == {0, 1, 2, 3}
    plain = draw_alteration(np.random.default_rng(3), 40, 20, DreamConfig("benign", flip=False, rotate=False, boxes=0))
    assert plain == Alteration(False, 0, 0.0, ())


def test_zscore_and_config_checks():
    g = torch.randn(3, 2, 4, 4) * 5 + 2
    z = zscore(g)
    torch.testing.assert_close(z.flatten(1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.flatten(1).std(1, unbiased=False), torch.ones(3))
    assert torch.equal(zscore(torch.zeros(1, 1, 3, 3)), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="target"):
        DreamConfig("cancer")
    with pytest.raises(ValueError, match="box_frac"):
        DreamConfig("benign", box_frac=0)


def _check_frames(result, x0):
    assert len(result.frames) == STEPS + 1 and result.scores.shape[0] == STEPS + 1
    for view, start in enumerate(x0):
        assert torch.equal(result.frames[0].images[view], start)
        for frame in result.frames:
            assert frame.images[view].abs().max() <= 3.0
            torch.testing.assert_close(frame.dream[view], frame.images[view] - start)
            assert frame.saliency[view].shape == (start.shape[0], *start.shape[-2:])
            assert (frame.saliency[view] >= 0).all()
        assert (result.frames[-1].saliency[view] > 0).any() and (result.final[view] != start).any()


@pytest.mark.slow
def test_single_view_dream_moves_the_score_both_ways(blob_levynet, blob_exam):
    blob, plain = blob_exam()
    x = torch.cat([plain, blob])  # a batch: samples dreamed independently
    start = torch.softmax(blob_levynet(x), 1)[:, 1].detach()
    assert start[0] < 0.1 < 0.9 < start[1]
    up = directed_dream(blob_levynet, x, DreamConfig("malignant", steps=STEPS))
    _check_frames(up, (x,))
    torch.testing.assert_close(up.scores[0], start)
    assert (up.scores[-1] > up.scores[0]).all() and up.scores[-1, 0] > 0.5  # the plain image turns malignant
    down = directed_dream(blob_levynet, x, DreamConfig("benign", steps=STEPS))
    _check_frames(down, (x,))
    assert (down.scores[-1] > down.scores[0]).all()  # S(0) up: S(1) down
    assert (_logit(down.scores[-1]) - _logit(down.scores[0]) > 2).all()
    assert not blob_levynet.training and all(p.grad is None for p in blob_levynet.parameters())


@pytest.mark.slow
def test_parallel_exam_dream_and_reproducibility(blob_levynet, blob_exam):
    blob, plain = blob_exam()
    blob_levynet.view_mode = "parallel"
    try:
        exam_start = blob_levynet.predict_exam(blob, plain)[:, 1].detach()
        assert 0.2 < exam_start < 0.8  # one view with a blob, one without
        up = directed_dream(blob_levynet, (blob, plain), DreamConfig("malignant", steps=STEPS, seed=1))
        down = directed_dream(blob_levynet, (blob, plain), DreamConfig("benign", steps=STEPS, seed=1))
        again = directed_dream(blob_levynet, (blob, plain), DreamConfig("malignant", steps=STEPS, seed=1))
        other = directed_dream(blob_levynet, (blob, plain), DreamConfig("malignant", steps=2, seed=2))
    finally:
        blob_levynet.view_mode = "single"
    assert up.view_names == ("CC", "MLO")
    _check_frames(up, (blob, plain))
    torch.testing.assert_close(up.scores[0], exam_start)
    assert up.scores[-1] > 0.9
    assert 1 - down.scores[-1] < exam_start - 0.02  # the exam's S(1) falls; erasing a blob is slower than adding one
    for start, dreamed in zip((blob, plain), down.final, strict=True):  # each view's own malignancy logit falls clearly
        before, after = (torch.softmax(blob_levynet(v), 1)[0, 1].detach() for v in (start, dreamed))
        assert _logit(before) - _logit(after) > 2
    assert all(
        torch.equal(a, b)
        for fa, fb in zip(up.frames, again.frames, strict=True)
        for a, b in zip((*fa.images, *fa.saliency, fa.score), (*fb.images, *fb.saliency, fb.score), strict=True)
    )
    assert not torch.equal(other.frames[1].images[0], up.frames[1].images[0])


@pytest.mark.slow
def test_multimodal_dream_moves_the_joint_score(blob_multimodal, blob_exam):
    blob, plain = blob_exam(seed=11)
    start = blob_multimodal.predict_exam(blob, plain)[:, 1].detach()
    up = directed_dream(blob_multimodal, (blob, plain), DreamConfig("malignant", steps=STEPS))
    down = directed_dream(blob_multimodal, (blob, plain), DreamConfig("benign", steps=STEPS))
    _check_frames(up, (blob, plain))
    _check_frames(down, (blob, plain))
    torch.testing.assert_close(up.scores[0], start)
    assert _logit(up.scores[-1]) - _logit(up.scores[0]) > 2
    assert _logit(down.scores[-1]) - _logit(down.scores[0]) > 2
    with pytest.raises(ValueError, match="pair"):
        directed_dream(blob_multimodal, blob, DreamConfig("benign", steps=1))


def test_nine_channel_resnet_and_two_class_check():
    torch.manual_seed(0)
    model = create_view_model("resnet18", in_chans=9)
    x = torch.randn(1, 1, 32, 32).clamp(-3, 3)
    result = directed_dream(model, x, DreamConfig("malignant", steps=2, max_angle=0))
    assert [f.images[0].shape for f in result.frames] == [(1, 1, 32, 32)] * 3
    assert result.final[0].abs().max() <= 3 and (result.final[0] != x).any()
    with pytest.raises(ValueError, match="two-class"):
        directed_dream(create_view_model("levynet", in_chans=1, num_classes=3), x, DreamConfig("benign", steps=1))


@pytest.mark.slow
def test_gif_and_png_have_every_frame_and_three_panels(blob_levynet, blob_exam, tmp_path):
    blob, plain = blob_exam()
    blob_levynet.view_mode = "parallel"
    try:
        result = directed_dream(blob_levynet, (blob, plain), DreamConfig("malignant", steps=3))
    finally:
        blob_levynet.view_mode = "single"
    gif = save_dream_gif(result, tmp_path / "dream.gif", fps=4)
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 4
        assert image.size == (3 * PANEL_PX, 2 * PANEL_PX + MARGIN_PX)  # 3 panels per row, CC and MLO rows
        assert image.info["duration"] == 250
        image.seek(3)
        last = np.asarray(image.convert("RGB"))
    dream_panel = last[MARGIN_PX : MARGIN_PX + PANEL_PX, 2 * PANEL_PX :]
    assert (dream_panel[..., 0].astype(int) - dream_panel[..., 2]).max() > 100  # red where the dream added
    one = save_dream_gif(result, tmp_path / "mlo.gif", view="MLO")
    with Image.open(one) as image:
        assert image.n_frames == 4 and image.size == (3 * PANEL_PX, PANEL_PX + MARGIN_PX)
    png = save_dream_frame(result, tmp_path / "last.png", view=0)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (3 * PANEL_PX, PANEL_PX + MARGIN_PX)
    with pytest.raises(ValueError, match="view"):
        save_dream_frame(result, tmp_path / "x.png", view=2)
    assert math.isclose(float(result.scores[-1]), float(result.frames[-1].score))
