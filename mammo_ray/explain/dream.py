"""Directed Dream (paper 000, section 2.3, Algorithm 1; see docs/papers.md): push an exam's images towards a class.

Algorithm 1, with x = {I_CC, I_MLO} in network input space (mean-variance normalised, about
-3..3) and S the softmax outputs:

    for i in 1..MaxIter:
        4  forward stochastic alteration of x      (random flip, rotation, zeroed boxes)
        5  feed x forward through the network
        6  dy/dx with [dy/dS(0), dy/dS(1)] = [-1, +1] towards malignant, [+1, -1] towards benign
        7  z-score dy/dx, clip it at [-0.05, 0.05]
        8  x := x + lr * dy/dx
        9  clip x at [-3, 3]
        10 reverse stochastic alteration of x

Line 10, as done here. Flips and quarter turns are permutations of the pixels, so reversing
them after line 9 is exact; what cannot be reversed on x itself is the zeroing (the values under
a box are gone) and an interpolated small-angle rotation (rotating x there and back blurs it,
and 50 steps would blur it 50 times). So the *update* made in the altered frame,
clip(x~ + lr g) - x~, is mapped back: it is set to 0 inside the boxes (reversing the zeroing
restores those pixels as they were, so they are not updated this step), rotated back, turned
back, flipped back, and added to x in the original frame, which is then clipped again. For
flips and quarter turns this is exactly lines 8-10; for a small angle it is the same up to
interpolation of the update, never of the image.

Views. One network and a (cc, mlo) pair (parallel mode): y is built on the exam's softmax, the
mean of the CC and MLO softmaxes (how parallel mode predicts, section 2.2), so each view is
pushed by its own gradient (scaled by 1/2, which the z-score removes): dreaming the pair
jointly and each view on its own are the same update. A multimodal model takes the pair together
and y is built on its joint softmax. One tensor: a single view (any batch, samples independent).
Each view draws its own alteration every step; the samples of a batch share it. The model runs
in eval mode throughout (no dropout, BatchNorm on running statistics) and only input gradients
are taken. Rendering of the frames is in ``dream_render.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mammo_ray.constants import View

TARGET_CLASSES = {"benign": 0, "malignant": 1}  # class 1 is malignant (Pathology.label)


@dataclass(frozen=True)
class DreamConfig:
    """Settings of one Directed Dream; the paper gives the two clips, the rest are ours."""

    target: Literal["malignant", "benign"]  # the class whose softmax score the dream raises
    steps: int = 50  # MaxIter (not given in the paper)
    lr: float = 1.0  # multiplies the clipped z-scored gradient: at most lr * clip_grad per pixel per step
    clip_grad: float = 0.05  # z-scored gradient clipped at [-clip_grad, clip_grad] (Algorithm 1, line 7)
    clip_x: float = 3.0  # x clipped at [-clip_x, clip_x] (line 9)
    flip: bool = True  # random left-right flip (with the quarter turns: all 8 flips/rotations)
    rotate: bool = True  # random quarter turn k * 90 degrees, then a small angle
    max_angle: float = 10.0  # the small angle is uniform in [-max_angle, max_angle] degrees; 0: none
    boxes: int = 3  # boxes zeroed per view per step ("boxes of a random size", section 2.3)
    box_frac: float = 0.25  # a box side is uniform in 1 .. box_frac * the image side (pixels)
    seed: int = 0  # seeds the numpy Generator that draws every alteration

    def __post_init__(self) -> None:
        checks = {
            "target": self.target in TARGET_CLASSES,
            "steps": self.steps >= 0,
            "lr": self.lr > 0,
            "clip_grad": self.clip_grad > 0,
            "clip_x": self.clip_x > 0,
            "max_angle": self.max_angle >= 0,
            "boxes": self.boxes >= 0,
            "box_frac": 0 < self.box_frac <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                allowed = f"one of {sorted(TARGET_CLASSES)}" if name == "target" else "out of range"
                raise ValueError(f"DreamConfig.{name}={getattr(self, name)!r}: {allowed}")

    @property
    def target_class(self) -> int:
        return TARGET_CLASSES[self.target]


def _rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate (B, C, H, W) about the image centre by bilinear resampling, zeros outside."""
    a = math.radians(degrees)
    h, w = x.shape[-2:]
    # Normalised grid coordinates scale x by W/2 and y by H/2: correct so pixels rotate rigidly.
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
        dtype=x.dtype,
        device=x.device,
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Alteration:
    """One stochastic alteration (Algorithm 1, line 4): flip, then turn, then rotate, then zero boxes."""

    flip: bool  # left-right
    quarter_turns: int  # torch.rot90 k, 0..3
    angle: float = 0.0  # degrees, bilinear
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # (top, left, height, width) in the altered frame

    def keep_mask(self, x: Tensor) -> Tensor:
        """(H, W) of the altered frame: 0 inside the boxes, 1 elsewhere."""
        keep = torch.ones(x.shape[-2:], dtype=x.dtype, device=x.device)
        for top, left, height, width in self.boxes:
            keep[top : top + height, left : left + width] = 0
        return keep

    def apply(self, x: Tensor) -> Tensor:
        """(B, C, H, W) original frame -> altered frame (H and W swap for an odd quarter turn)."""
        x = x.flip(-1) if self.flip else x
        x = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        x = _rotate(x, self.angle) if self.angle else x
        return x * self.keep_mask(x) if self.boxes else x

    def invert_update(self, delta: Tensor) -> Tensor:
        """An update made in the altered frame -> the original frame (nothing where a box was)."""
        delta = delta * self.keep_mask(delta) if self.boxes else delta
        delta = _rotate(delta, -self.angle) if self.angle else delta
        delta = torch.rot90(delta, -self.quarter_turns, dims=(-2, -1))
        return delta.flip(-1) if self.flip else delta


def draw_alteration(rng: np.random.Generator, height: int, width: int, config: DreamConfig) -> Alteration:
    """A random ``Alteration`` of an (height, width) image, drawn from ``rng`` as ``config`` allows."""
    flip = bool(config.flip and rng.random() < 0.5)
    turns = int(rng.integers(4)) if config.rotate else 0
    angle = float(rng.uniform(-config.max_angle, config.max_angle)) if config.rotate and config.max_angle else 0.0
    h, w = (width, height) if turns % 2 else (height, width)
    boxes = []
    for _ in range(config.boxes):
        bh = int(rng.integers(1, max(1, round(config.box_frac * h)) + 1))
        bw = int(rng.integers(1, max(1, round(config.box_frac * w)) + 1))
        boxes.append((int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw))
    return Alteration(flip, turns, angle, tuple(boxes))


def zscore(grad: Tensor) -> Tensor:
    """Each sample's gradient standardised over (C, H, W) (Algorithm 1, line 7); all-zero stays zero."""
    flat = grad.flatten(1)
    std = flat.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 0, (flat - flat.mean(dim=1, keepdim=True)) / std.clamp_min(1e-12), torch.zeros_like(flat))
    return z.view_as(grad)


@dataclass(frozen=True)
class DreamFrame:
    """The state after ``step`` updates (step 0: the input), each tuple one entry per view, on the CPU."""

    step: int
    images: tuple[Tensor, ...]  # x_t, (B, C, H, W)
    saliency: tuple[Tensor, ...]  # |dy/dx| of this step in the original frame, max over C, (B, H, W); 0 at step 0
    dream: tuple[Tensor, ...]  # accumulated dream x_t - x_0, (B, C, H, W)
    score: Tensor  # (B,) target-class probability of the unaltered x_t (exam-level for a pair)


@dataclass(frozen=True)
class DreamResult:
    """Every frame of one Directed Dream."""

    config: DreamConfig
    view_names: tuple[str, ...]  # ("CC", "MLO") for a pair, ("image",) for one view
    frames: tuple[DreamFrame, ...]  # steps + 1 frames

    @property
    def scores(self) -> Tensor:
        """(steps + 1, B) target-class probability per step; row 0 is the input's."""
        return torch.stack([frame.score for frame in self.frames])

    @property
    def final(self) -> tuple[Tensor, ...]:
        """The dreamed images, one (B, C, H, W) per view."""
        return self.frames[-1].images


class _ExamModel(Protocol):
    """A two-view model (``models.views.MultiViewClassifier``): softmax of a (cc, mlo) exam."""

    def predict_exam(self, cc: Tensor, mlo: Tensor) -> Tensor: ...


def _probabilities(model: nn.Module, views: list[Tensor]) -> Tensor:
    """Softmax outputs S (B, num_classes): of the image, or of the exam for a (cc, mlo) pair."""
    if len(views) == 2:  # parallel: mean of CC and MLO softmaxes; multimodal: the joint softmax
        return cast(_ExamModel, model).predict_exam(views[0], views[1])
    return F.softmax(model(views[0]), dim=1)


def _check_views(model: nn.Module, views: Tensor | tuple[Tensor, Tensor]) -> list[Tensor]:
    multimodal = getattr(model, "view_mode", "single") == "multimodal"
    listed = [views] if isinstance(views, Tensor) else list(views)
    if len(listed) not in (1, 2) or (multimodal and len(listed) != 2):
        want = "a (cc, mlo) pair" if multimodal else "a (B, C, H, W) tensor or a (cc, mlo) pair"
        raise ValueError(f"directed_dream: {type(model).__name__} takes {want}, got {len(listed)} tensors")
    for name, v in zip(("cc", "mlo") if len(listed) == 2 else ("x",), listed, strict=True):
        if not isinstance(v, Tensor) or v.dim() != 4:
            raise ValueError(
                f"directed_dream: {name} must be a (B, C, H, W) tensor, got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
    if len(listed) == 2 and listed[0].shape[0] != listed[1].shape[0]:
        raise ValueError(
            f"directed_dream: cc and mlo batch sizes differ ({listed[0].shape[0]} vs {listed[1].shape[0]})"
        )
    return [v.detach().float().clone() for v in listed]


def directed_dream(model: nn.Module, views: Tensor | tuple[Tensor, Tensor], config: DreamConfig) -> DreamResult:
    """Run Algorithm 1 of paper 000 (module docstring) and record every step.

    Args:
        model: a trained two-class ``Classifier`` (single or parallel) or ``MultiViewClassifier``;
            it is put in eval mode for the run and its mode restored afterwards.
        views: (B, C, H, W) in network input space (``model.expected_input_channels``), or a
            (cc, mlo) pair of such batches (required for a multimodal model).
        config: target class, steps, step size, clips, alterations and seed.

    Returns:
        ``DreamResult`` with ``config.steps + 1`` frames; the same seed gives the same frames.
    """
    x0 = _check_views(model, views)
    rng = np.random.default_rng(config.seed)
    target = config.target_class
    direction = torch.full((2,), -1.0, device=x0[0].device)
    direction[target] = 1.0  # [dy/dS(0), dy/dS(1)]: [-1, +1] towards malignant, [+1, -1] towards benign
    was_training = model.training
    model.eval()
    try:

        def record(step: int, x: list[Tensor], saliency: list[Tensor]) -> DreamFrame:
            with torch.no_grad():
                probs = _probabilities(model, x)
            if probs.dim() != 2 or probs.shape[1] != 2:
                raise ValueError(
                    f"directed_dream: needs a two-class (benign, malignant) model, got outputs of "
                    f"shape {tuple(probs.shape)}"
                )
            return DreamFrame(
                step,
                tuple(v.cpu().clone() for v in x),
                tuple(s.cpu() for s in saliency),
                tuple((v - v0).cpu() for v, v0 in zip(x, x0, strict=True)),
                probs[:, target].cpu(),
            )

        x = [v.clone() for v in x0]
        frames = [record(0, x, [torch.zeros(v.shape[0], *v.shape[-2:]) for v in x])]
        for step in range(1, config.steps + 1):
            alterations = [draw_alteration(rng, v.shape[-2], v.shape[-1], config) for v in x]
            altered = [a.apply(v).requires_grad_(True) for a, v in zip(alterations, x, strict=True)]  # line 4
            y = (_probabilities(model, altered) * direction).sum()  # lines 5-6 (samples independent in eval)
            grads = torch.autograd.grad(y, altered)
            new_x, saliency = [], []
            for a, v, v_alt, grad in zip(alterations, x, altered, grads, strict=True):
                v_alt = v_alt.detach()
                moved = v_alt + config.lr * zscore(grad).clamp(-config.clip_grad, config.clip_grad)  # lines 7-8
                moved = moved.clamp(-config.clip_x, config.clip_x)  # line 9
                delta = a.invert_update(moved - v_alt)  # line 10, on the update
                new_x.append((v + delta).clamp(-config.clip_x, config.clip_x))
                saliency.append(a.invert_update(grad.abs()).amax(dim=1))
            x = new_x
            frames.append(record(step, x, saliency))
    finally:
        model.train(was_training)
    names = (View.CC.value, View.MLO.value) if len(x0) == 2 else ("image",)
    return DreamResult(config, names, tuple(frames))


__all__ = [
    "Alteration",
    "DreamConfig",
    "DreamFrame",
    "DreamResult",
    "directed_dream",
    "draw_alteration",
    "zscore",
]
