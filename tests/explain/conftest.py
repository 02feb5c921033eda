"""Tiny models that know one thing: a bright blob means class 1 (malignant).

LevyNet at 64 px, trained for a few dozen Adam steps on synthetic noise images, class 1 with a
Gaussian blob: enough for the Directed Dream tests to see the class score move (seconds on 2 cores).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

SIDE = 64


@contextmanager
def _one_torch_thread():
    """One intra-op thread for these tiny models: on a shared 2-core machine, spinning OpenMP
    threads made this suite ~10x slower. Restored afterwards, so other test modules keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    with _one_torch_thread():
        yield


def blob_images(labels: torch.Tensor, generator: torch.Generator, side: int = SIDE) -> torch.Tensor:
    """(N, 1, side, side) noise images in about [-3, 3]; label 1 adds a bright blob at a random place."""
    x = 0.5 * torch.randn(len(labels), 1, side, side, generator=generator)
    yy, xx = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    for i in torch.nonzero(labels).flatten().tolist():
        cy, cx = torch.randint(12, side - 12, (2,), generator=generator).tolist()
        x[i, 0] += 2.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    return x.clamp(-3, 3)


def _train(model, batches, steps: int = 30, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    with _one_torch_thread():  # session fixtures are set up before the module-scoped one
        for _ in range(steps):
            inputs, labels = batches(g)
            loss = F.cross_entropy(model(inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad()  # grads None: the tests check explanations accumulate none
    return model.eval()


@pytest.fixture(scope="session")
def blob_exam():
    """``blob_exam(seed)`` -> (blob view, plain view), each (1, 1, 64, 64): malignant- and benign-looking."""

    def make(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
        x = blob_images(torch.tensor([1, 0]), torch.Generator().manual_seed(seed))
        return x[:1], x[1:]

    return make


@pytest.fixture(scope="session")
def blob_levynet():
    """A single-view LevyNet (1 channel) that scores blob images as malignant."""
    from mammo_ray.models import create_view_model

    torch.manual_seed(0)
    model = create_view_model("levynet", "single", in_chans=1, dropout=0.1)

    def batches(g):
        labels = torch.randint(0, 2, (16,), generator=g)
        return blob_images(labels, g), labels

    return _train(model, batches)


@pytest.fixture(scope="session")
def blob_multimodal():
    """A multimodal LevyNet: an exam is malignant when both its views show a blob."""
    from mammo_ray.models import create_view_model

    torch.manual_seed(1)
    model = create_view_model("levynet", "multimodal", in_chans=1, dropout=0.1)

    def batches(g):
        labels = torch.randint(0, 2, (12,), generator=g)
        return (blob_images(labels, g), blob_images(labels, g)), labels

    return _train(model, batches)
