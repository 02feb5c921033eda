"""Train and eval transforms (torchvision.transforms.v2), and the spec that travels with a model.

The eval transform is fully described by a ``TransformSpec``; a checkpoint stores
``spec.to_state()`` so whoever loads the model (evaluate, Serve) preprocesses exactly as
evaluation did. Order, following papers 000 and 001 (see docs/papers.md):

    normalise (per-crop z-score, or train mean-image subtraction)
    -> resize to cache_px (256)
    -> train: random zoom with mean fill (``scale_aug``, paper 003), random integer rotation with
       mean fill, random input_px (224) crop, flips
       eval:  centre crop
    -> grayscale replicated to 3 channels for ImageNet backbones

Normalising first makes the crop's mean 0, so "fill with the mean" is fill 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mammo_ray.config import DataConfig

OFFLINE_ROTATIONS = 5  # paper 001: 5 random rotations ...
OFFLINE_CROPS = 5  # ... x 5 random crops = 25 variants per training image


@dataclass(frozen=True)
class TransformSpec:
    """Everything preprocessing needs; ``mean_image`` only for mean-image subtraction."""

    normalization: str = "meanvar"
    cache_px: int = 256
    input_px: int = 224
    channels: int = 3
    rotation_deg: int = 0
    hflip: bool = True
    vflip: bool = False
    scale_aug: tuple[float, float] | None = None
    train_mean: float = 0.0
    train_std: float = 1.0
    mean_image: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(
        cls, cfg: DataConfig, *, train_mean: float = 0.0, train_std: float = 1.0, mean_image: np.ndarray | None = None
    ) -> TransformSpec:
        if cfg.normalization == "mean_image" and mean_image is None:
            raise ValueError("data.normalization=mean_image needs the cache's mean_image.npy")
        return cls(
            normalization=cfg.normalization,
            cache_px=cfg.cache_px,
            input_px=cfg.input_px,
            channels=cfg.channels,
            rotation_deg=cfg.rotation_deg,
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            scale_aug=check_scale_aug(cfg.scale_aug),
            train_mean=train_mean,
            train_std=train_std,
            mean_image=mean_image,
        )

    def to_state(self) -> dict[str, Any]:
        """Plain data + one tensor: loadable with ``torch.load(weights_only=True)``."""
        state = asdict(self)
        state["mean_image"] = None if self.mean_image is None else torch.from_numpy(self.mean_image)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TransformSpec:
        state = dict(state)
        if state.get("scale_aug") is not None:  # a checkpoint may hand back a list
            state["scale_aug"] = tuple(float(v) for v in state["scale_aug"])
        if state.get("mean_image") is not None:
            state["mean_image"] = torch.as_tensor(state["mean_image"]).numpy()
        return cls(**state)


class Normalize(torch.nn.Module):
    """Per-crop mean-variance normalisation (paper 000), mean-image subtraction (paper 001), or the
    training set's global mean/std ("global": the same for every pixel, so a whole image can be
    normalised once and scanned densely with exactly the patches' preprocessing, paper 003)."""

    def __init__(self, spec: TransformSpec):
        super().__init__()
        self.spec = spec
        self.mean_image = None if spec.mean_image is None else torch.from_numpy(spec.mean_image)[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.normalization == "meanvar":
            return (x - x.mean()) / x.std().clamp_min(1e-6)
        if self.spec.normalization == "global":  # one affine map for every pixel: commutes with cropping
            return (x - self.spec.train_mean) / max(self.spec.train_std, 1e-6)
        mean = self.mean_image
        if mean is None:
            raise ValueError("normalization=mean_image needs TransformSpec.mean_image (the cache's mean_image.npy)")
        if mean.shape[-2:] != x.shape[-2:]:
            mean = F.resize(mean, list(x.shape[-2:]), antialias=True)
        return (x - mean) / max(self.spec.train_std, 1e-6)


def check_scale_aug(scale_aug: tuple[float, float] | None) -> tuple[float, float] | None:
    """``data.scale_aug`` as a (min, max) zoom range with 0 < min <= max; ValueError otherwise."""
    if scale_aug is None:
        return None
    lo, hi = (float(v) for v in scale_aug)
    if not 0.0 < lo <= hi:
        raise ValueError(f"data.scale_aug must be (min, max) with 0 < min <= max, got {tuple(scale_aug)}")
    return lo, hi


def random_zoom(scale_aug: tuple[float, float]) -> v2.RandomAffine:
    """Zoom about the centre by a factor drawn uniformly from ``scale_aug``, filling with 0 (the mean).

    Paper 003 augments its patches by scale as well as by crop, translation, rotation and flip;
    a lesion then appears at several sizes, as masses of one kind do in different breasts.
    """
    return v2.RandomAffine(degrees=0.0, scale=scale_aug, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)


class RandomIntegerRotation(torch.nn.Module):
    """Rotate by a uniformly drawn whole number of degrees in [-max_deg, max_deg]; fill 0."""

    def __init__(self, max_deg: int):
        super().__init__()
        self.max_deg = max_deg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = int(torch.randint(-self.max_deg, self.max_deg + 1, ()).item())
        return F.rotate(x, angle, fill=0.0) if angle else x


class ToChannels(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.channels, -1, -1).contiguous() if self.channels != x.shape[0] else x


def to_tensor(crop: np.ndarray) -> torch.Tensor:
    """A stored 2-D crop (uint16 or float) as a float32 (1, H, W) tensor."""
    return torch.from_numpy(np.asarray(crop, dtype=np.float32).copy())[None]


def _head(spec: TransformSpec) -> list[Callable]:
    # Normalise at the stored size first (the mean image has that size), then resize.
    return [Normalize(spec), v2.Resize((spec.cache_px, spec.cache_px), antialias=True)]


def build_eval_transform(spec: TransformSpec) -> Callable[[np.ndarray], torch.Tensor]:
    """Stored crop -> network input, deterministically."""
    ops = _head(spec) + [v2.CenterCrop(spec.input_px), ToChannels(spec.channels)]
    compose = v2.Compose(ops)
    return lambda crop: compose(to_tensor(crop))


def build_train_transform(spec: TransformSpec) -> Callable[[np.ndarray], torch.Tensor]:
    """Stored crop -> randomly augmented network input (uses torch's global RNG)."""
    ops = _head(spec)
    zoom = check_scale_aug(spec.scale_aug)
    if zoom is not None:
        ops.append(random_zoom(zoom))
    if spec.rotation_deg:
        ops.append(RandomIntegerRotation(spec.rotation_deg))
    ops.append(v2.RandomCrop(spec.input_px))
    if spec.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if spec.vflip:
        ops.append(v2.RandomVerticalFlip())
    ops.append(ToChannels(spec.channels))
    compose = v2.Compose(ops)
    return lambda crop: compose(to_tensor(crop))


def offline_variant_params(seed: int, sample: int, spec: TransformSpec) -> list[tuple[int, int, int]]:
    """The 25 fixed (angle, top, left) variants of one training sample (paper 001).

    Drawn from ``(seed, sample)`` alone, so the augmented set is the same in every epoch,
    on every worker and in every rerun, as if it had been written to disk.
    """
    rng = np.random.default_rng([seed, sample])
    span = spec.cache_px - spec.input_px
    angles = rng.integers(0, 360, OFFLINE_ROTATIONS)
    return [
        (int(a), int(top), int(left)) for a in angles for top, left in rng.integers(0, span + 1, (OFFLINE_CROPS, 2))
    ]


def build_offline_transform(spec: TransformSpec) -> Callable[[np.ndarray, tuple[int, int, int]], torch.Tensor]:
    """Stored crop + one (angle, top, left) variant -> network input; mirroring stays online."""
    head = v2.Compose(_head(spec))
    tail = v2.Compose(([v2.RandomHorizontalFlip()] if spec.hflip else []) + [ToChannels(spec.channels)])

    def apply(crop: np.ndarray, variant: tuple[int, int, int]) -> torch.Tensor:
        angle, top, left = variant
        x = F.rotate(head(to_tensor(crop)), angle, fill=0.0)
        return tail(F.crop(x, top, left, spec.input_px, spec.input_px))

    return apply
