"""benchmarks/gpu_check.sh --dry-run: every part runs on the CPU at tiny size and one JSON comes out.

The script runs once, as an operator runs it (the shell wrapper in a subprocess, with a Ray of its own:
``own_ray_environment`` from test_first_commands), and each test reads one part of its JSON. Values are
asserted, never speed: performance is measured by the script, not tested.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
from subprocesses import own_ray_environment, wait_for_exit_of_all
from torch import nn

from mammo_ray.models import create_model, list_models

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "ensemble", "ray_train", "serve")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """The JSON of one ``gpu_check.sh --dry-run``, with the run's exit status and wall time added."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "x.json"
    args = ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--workdir", str(tmp / "work")]
    with own_ray_environment() as (env, marker):
        start = time.perf_counter()
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=1000)
        wall = time.perf_counter() - start
        wait_for_exit_of_all(marker)
    assert out.exists(), done.stderr[-4000:]
    result = json.loads(out.read_text())
    result["_returncode"], result["_stdout"], result["_wall_s"] = done.returncode, done.stdout, wall
    return result


def independent_macs(name: str, in_chans: int, px: int) -> int:
    """Multiply-accumulates of one image's forward pass from forward hooks on every Conv2d and Linear:
    output elements x (input channels per group x kernel area) or x input features."""
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans).eval()
    total = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total[0] += output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, model.expected_input_channels, px, px))
    return total[0]


def test_every_part_ran_and_the_run_is_described(dry_run):
    assert dry_run["_returncode"] == 0, dry_run["_stdout"][-4000:]
    assert dry_run["dry_run"] is True
    assert set(dry_run["parts"]) == set(PARTS)
    for name, part in dry_run["parts"].items():
        assert "error" not in part, f"{name}: {part['error']}"
        assert part["wall_s"] > 0
    machine = dry_run["machine"]
    assert machine["device_type"] == "cpu" and machine["device_name"]
    assert machine["torch"] == torch.__version__ and "cuda" in machine
    assert dry_run["date"][:4].isdigit() and "T" in dry_run["date"]
    assert len(dry_run["load_average_start"]) == len(dry_run["load_average_end"]) == 3
    assert dry_run["peak_bf16_flops"] is None  # no peak for a CPU, so no MFU
    print(f"dry run: {dry_run['_wall_s']:.1f} s (the script's own count: {dry_run['wall_s']} s)")


def test_training_rate_and_macs_of_every_backbone(dry_run):
    part = dry_run["parts"]["train"]
    assert set(part["backbones"]) == set(list_models())
    for name, row in part["backbones"].items():
        assert row["images_per_s"] > 0, name
        assert row["macs_per_image"] > 0, name
        assert row["train_flops_per_image"] == 6 * row["macs_per_image"]
        assert row["mfu"] is None
    for name in ("levynet", "resnet18"):
        row = part["backbones"][name]
        assert row["macs_per_image"] == independent_macs(name, row["in_chans"], row["input_px"]), name


def test_stacked_and_looped_ensembles_agree(dry_run):
    part = dry_run["parts"]["ensemble"]
    cells = {cell["members"]: cell for cell in part["cells"]}
    assert set(cells) == {2, 4}
    for n, cell in cells.items():
        assert cell["loop_images_per_s"] > 0 and cell["stacked_images_per_s"] > 0, n
        assert math.isclose(
            cell["ratio_stacked_to_loop_images_per_s"], cell["stacked_images_per_s"] / cell["loop_images_per_s"]
        )
        assert cell["max_abs_diff"] < 1e-4, n


def test_two_ray_train_workers_give_a_rate_or_say_why_not(dry_run):
    part = dry_run["parts"]["ray_train"]
    assert part["settings"]["workers"] == 2
    gloo = part["attempts"]["gloo"]
    assert gloo.get("images_per_s", 0) > 0 or isinstance(gloo.get("error"), str)
    assert "skipped" in part["attempts"]["nccl"]  # no GPU in a dry run
    if part["backend"] is not None:
        assert part["images_per_s"] == part["attempts"][part["backend"]]["images_per_s"] > 0
        assert len(part["attempts"][part["backend"]]["epoch_images_per_s"]) == 2


def test_serve_overhead_has_both_p50s(dry_run):
    part = dry_run["parts"]["serve"]
    assert part["in_process"]["p50_ms"] > 0 and part["http_sequential"]["p50_ms"] > 0
    assert part["in_process"]["n"] == part["http_sequential"]["n"] == part["settings"]["requests"]
    assert part["overhead_p50_ms"] == pytest.approx(part["http_sequential"]["p50_ms"] - part["in_process"]["p50_ms"])
    assert part["http_concurrent"]["statuses"] == {"200": part["settings"]["requests"]}
