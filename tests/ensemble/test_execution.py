"""Stacked (vmap) and looped execution of an ensemble: same outputs, chosen by measurement."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mammo_ray.data.transforms import TransformSpec
from mammo_ray.ensemble.execution import (
    LoopEnsemble,
    StackedEnsemble,
    StackedExecutionError,
    choose_execution,
)
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.models import create_view_model

PX = 32


def random_member(name: str, view_mode: str, seed: int, **kwargs) -> nn.Module:
    """A member with its seed's weights and random BatchNorm statistics (so per-member buffers matter)."""
    torch.manual_seed(seed)
    model = create_view_model(name, view_mode, **kwargs).eval()
    g = torch.Generator().manual_seed(100 + seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return model


def make_ensemble(tiny_config, name: str, view_mode: str, members: list[nn.Module] | None = None) -> Ensemble:
    members = members or [random_member(name, view_mode, seed) for seed in range(3)]
    config = tiny_config(f"model.name={name}", f"model.view_mode={view_mode}")
    return Ensemble(members, TransformSpec(input_px=PX), config).eval()


def example(view_mode: str, n: int = 4, seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if view_mode == "multimodal":
        return torch.randn(n, 3, PX, PX, generator=g), torch.randn(n, 3, PX, PX, generator=g)
    return torch.randn(n, 3, PX, PX, generator=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads waiting on each other make this file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CELLS = [("levynet", "single"), ("resnet18", "single"), ("levynet", "multimodal"), ("resnet18", "multimodal")]


@pytest.fixture(scope="module")
def ensembles(tiny_config):
    return {cell: make_ensemble(tiny_config, *cell) for cell in CELLS}


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(c))
def test_stacked_matches_loop(ensembles, cell):
    ensemble = ensembles[cell]
    x = example(cell[1])
    expected = ensemble(x)
    stacked = StackedEnsemble.from_ensemble(ensemble)
    assert stacked.num_members == 3 and stacked.view_mode == cell[1] and stacked.spec is ensemble.spec
    probs = stacked(x)
    assert probs.shape == (4, 3) and not probs.requires_grad
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(probs[:, 0], probs[:, 1], atol=1e-4)  # different members, different columns
    torch.testing.assert_close(LoopEnsemble(ensemble)(x), expected, atol=0, rtol=0)
    if cell[1] == "multimodal":  # the pyfunc layout (N, 2, C, H, W) too, and the loop's input errors
        torch.testing.assert_close(stacked(torch.stack(x, dim=1)), expected, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="multimodal ensemble takes"):
            stacked(x[0])
    else:
        with pytest.raises(ValueError, match="single ensemble takes one"):
            stacked(x[None])


@pytest.mark.parametrize("cell", [("resnet18", "single"), ("levynet", "multimodal")], ids=lambda c: "-".join(c))
def test_member_chunks_give_the_same_outputs(ensembles, cell):
    ensemble, x = ensembles[cell], example(cell[1], n=3)
    whole = StackedEnsemble.from_ensemble(ensemble)(x)
    for chunk in (1, 2, 5):
        chunked = StackedEnsemble.from_ensemble(ensemble, member_chunk=chunk)
        # Same weights, same member order: only vmap's width changes (float rounding at most).
        torch.testing.assert_close(chunked(x), whole, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="member_chunk"):
        StackedEnsemble.from_ensemble(ensemble, member_chunk=0)


def test_mismatched_members_are_named():
    a, b = random_member("levynet", "single", 0), random_member("levynet", "single", 1)
    wider = random_member("levynet", "single", 2, pool_size=4)
    with pytest.raises(
        ValueError,
        match=r"member_002 differs from member_000 in 'pre_logits.fc1.weight' "
        r"\(parameter \[128, 1024\] float32 vs parameter \[128, 3136\] float32\)",
    ):
        StackedEnsemble([a, b, wider])
    with pytest.raises(
        ValueError,
        match=r"member_001 differs from member_000 in "
        r"'features.block1.conv.weight' \(missing vs parameter",
    ):
        StackedEnsemble([a, random_member("resnet18", "single", 1)])
    strided = random_member("levynet", "single", 3)
    strided.features.block2.pool.stride = 1  # same weights, other hyperparameters
    with pytest.raises(ValueError, match=r"member_002 differs from member_000 in module 'features.block2.pool'"):
        StackedEnsemble([a, b, strided])
    with pytest.raises(ValueError, match="member_001 is a MultiViewClassifier"):
        StackedEnsemble([a, random_member("levynet", "multimodal", 1)])
    fewer_drop = random_member("levynet", "single", 4, dropout=0.2)  # dropout is inactive in eval: stackable
    assert StackedEnsemble([a, fewer_drop]).num_members == 2


@pytest.mark.parametrize("cell", [("levynet", "single"), ("resnet18", "multimodal")], ids=lambda c: "-".join(c))
def test_choose_auto_measures_both(ensembles, cell):
    ensemble, x = ensembles[cell], example(cell[1])
    module, report = choose_execution(ensemble, x, repeats=2)
    assert report["chosen"] in {"loop", "stacked"} and module.mode == report["chosen"]
    assert isinstance(module, StackedEnsemble if report["chosen"] == "stacked" else LoopEnsemble)
    assert report["loop_s"] > 0 and report["stacked_s"] > 0 and report["stacked_error"] is None
    faster = "stacked" if report["stacked_s"] < report["loop_s"] else "loop"
    assert report["chosen"] == faster and report["reason"].startswith("faster on cpu")
    assert report["max_abs_diff"] < 1e-5 and report["members"] == 3 and report["device"] == "cpu"
    assert len(report["loop_times_s"]) == len(report["stacked_times_s"]) == 2
    assert report["ratio_loop_to_stacked"] == pytest.approx(report["loop_s"] / report["stacked_s"])
    assert json.loads(json.dumps(report)) == report  # served as JSON by /v1/model
    torch.testing.assert_close(module(x), ensemble(x), atol=1e-5, rtol=0)
    assert module.spec is ensemble.spec and module.view_mode == cell[1]


def test_forced_modes_are_honoured(ensembles):
    ensemble, x = ensembles[("levynet", "single")], example("single")
    for mode, cls in (("loop", LoopEnsemble), ("stacked", StackedEnsemble)):
        module, report = choose_execution(ensemble, x, mode=mode, repeats=1, warmup=0)
        assert isinstance(module, cls) and report["chosen"] == mode and report["mode"] == mode
        assert report["loop_s"] > 0 and report["stacked_s"] > 0  # still measured, for the report
        torch.testing.assert_close(module(x), ensemble(x), atol=1e-5, rtol=0)
    module, report = choose_execution(ensemble, x, mode="stacked", measure=False)
    assert isinstance(module, StackedEnsemble) and report["loop_s"] is None and report["stacked_s"] is None
    with pytest.raises(ValueError, match="unknown execution mode 'fast'"):
        choose_execution(ensemble, x, mode="fast")
    with pytest.raises(ValueError, match="measure=False needs"):
        choose_execution(ensemble, x, measure=False)


class ItemNet(nn.Module):
    """A member vmap cannot batch: ``.item()`` reads a value (data-dependent control flow)."""

    view_mode = "single"

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        return y if y.sum().item() > -1e9 else -y


def test_vmap_failure_falls_back_to_the_loop(tiny_config):
    ensemble = make_ensemble(tiny_config, "levynet", "single", members=[ItemNet(0), ItemNet(1)])
    x = example("single")
    with pytest.raises(
        StackedExecutionError,
        match=r"ItemNet \(single\): torch.vmap over 2 stacked members failed: RuntimeError: .*item\(\)",
    ):
        StackedEnsemble.from_ensemble(ensemble)(x)
    module, report = choose_execution(ensemble, x, repeats=1)
    assert isinstance(module, LoopEnsemble) and report["chosen"] == "loop"
    assert report["stacked_s"] is None and report["max_abs_diff"] is None and report["loop_s"] > 0
    assert "ItemNet" in report["stacked_error"] and report["reason"].startswith("stacked cannot run")
    json.dumps(report)
    with pytest.raises(StackedExecutionError, match="mode='stacked' was asked for, but ItemNet"):
        choose_execution(ensemble, x, mode="stacked", repeats=1)
    # Members of different architectures cannot be stacked at all: the loop runs them.
    mixed = make_ensemble(
        tiny_config,
        "levynet",
        "single",
        members=[random_member("levynet", "single", 0), random_member("resnet18", "single", 1)],
    )
    module, report = choose_execution(mixed, x, repeats=1)
    assert report["chosen"] == "loop" and report["stacked_error"].startswith("cannot stack: member_001 differs")
