"""Difference-of-Gaussians input bank (paper 000, section 2.2 and its Eq. 1; see docs/papers.md).

Paper 000 puts "8 scales of Difference of Gaussian filters at
sigma = {sqrt2, 2, 2sqrt2, 4, 4sqrt2, 8, 8sqrt2, 16}" in front of the network as a constant
part of the graph, and concatenates the 8 responses with the grayscale image: 9 channels.

Definition. Eq. 1 did not survive the text extraction of the paper (only its legend: sigma
is the scale in pixels, x and y the offsets from the filter centre). We use

    DoG_i = G(sigma_i) - G(sigma_i * sqrt2),   i = 1..8,

which is the same as consecutive-scale differences G(sigma_i) - G(sigma_{i+1}) with
sigma_9 = 16 sqrt2, because the paper's scales are themselves sqrt2 apart: the bank blurs
the image at 9 scales and subtracts neighbours. Each Gaussian is a sampled 1-D kernel of
radius int(3 sigma + 0.5) (68 px for 16 sqrt2), normalised to sum 1, applied separably,
so every DoG kernel sums to exactly 0 (a flat image gives 0 in the 8 DoG channels).
Borders use reflect padding (``d c b | a b c d``: scipy's ``mode="mirror"``), repeated as
often as needed, so inputs smaller than the kernel radius work too.

The kernels are non-persistent buffers: moved by ``.to()``, never in ``parameters()`` (no
optimizer or weight decay touches them) and never in a checkpoint (they are rebuilt from
the sigmas).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)
DOG_SIGMAS = tuple(SQRT2**k for k in range(1, 9))  # sqrt2, 2, 2sqrt2, 4, 4sqrt2, 8, 8sqrt2, 16 (paper 000)


def gaussian_radius(sigma: float, truncate: float = 3.0) -> int:
    """Kernel radius in pixels; the same rounding as ``scipy.ndimage.gaussian_filter``."""
    return int(truncate * sigma + 0.5)


def gaussian_kernel1d(sigma: float, radius: int) -> Tensor:
    """Sampled 1-D Gaussian of length ``2 * radius + 1``, normalised to sum 1 (float64)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def mirror_indices(n: int, pad: int, device: torch.device | None = None) -> Tensor:
    """Source indices of a length-``n`` axis reflect-padded by ``pad`` on each side.

    Torch's ``F.pad(mode="reflect")`` needs ``pad < n``; this reflects as many times as needed
    (period ``2 (n - 1)``), which is what ``scipy.ndimage``'s ``mode="mirror"`` does.
    """
    index = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = torch.remainder(index, period)
    return torch.where(index < n, index, period - index)


class DoGBank(nn.Module):
    """Fixed filter bank: (B, 1, H, W) image -> (B, 9, H, W) = [image, DoG_1 .. DoG_8].

    Args:
        sigmas: the DoG scales; the bank also blurs at ``sigmas[-1] * sqrt2``.
        truncate: kernel radius in sigmas.
    """

    kernels: Tensor  # (len(sigmas) + 1, 2 * radius + 1) buffer: one 1-D Gaussian per blur scale

    def __init__(self, sigmas: tuple[float, ...] = DOG_SIGMAS, truncate: float = 3.0) -> None:
        super().__init__()
        self.sigmas = tuple(float(s) for s in sigmas)
        blur_sigmas = (*self.sigmas, self.sigmas[-1] * SQRT2)
        self.radius = gaussian_radius(blur_sigmas[-1], truncate)
        # All 9 kernels share the largest radius (zero taps outside their own radius), so one
        # padding and two convolutions blur at every scale.
        kernels = torch.zeros(len(blur_sigmas), 2 * self.radius + 1, dtype=torch.float64)
        for row, sigma in enumerate(blur_sigmas):
            r = gaussian_radius(sigma, truncate)
            kernels[row, self.radius - r : self.radius + r + 1] = gaussian_kernel1d(sigma, r)
        self.register_buffer("kernels", kernels.float(), persistent=False)

    @property
    def out_channels(self) -> int:
        return 1 + len(self.sigmas)

    def blur(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 9, H, W): the image blurred at each of the 9 scales."""
        r = self.radius
        rows = mirror_indices(x.shape[-2], r, x.device)
        cols = mirror_indices(x.shape[-1], r, x.device)
        padded = x.index_select(-2, rows).index_select(-1, cols)  # (B, 1, H + 2r, W + 2r)
        kernels = self.kernels.to(x.dtype)
        n = kernels.shape[0]
        horizontal = F.conv2d(padded, kernels.view(n, 1, 1, -1))  # (B, 9, H + 2r, W)
        return F.conv2d(horizontal, kernels.view(n, 1, -1, 1), groups=n)  # (B, 9, H, W)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"DoGBank expects a (B, 1, H, W) grayscale batch, got shape {tuple(x.shape)}")
        blurred = self.blur(x)
        return torch.cat([x, blurred[:, :-1] - blurred[:, 1:]], dim=1)

    def extra_repr(self) -> str:
        return f"sigmas=({', '.join(f'{s:.3g}' for s in self.sigmas)}), radius={self.radius}"
