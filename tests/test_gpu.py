"""The CUDA paths: training with mixed precision, channels-last, and evaluation that agrees with the CPU.

Marked `gpu`: skipped, with the reason, where no CUDA device is present (tests/conftest.py), and
run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.train.loop import build_training, evaluate, fit

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize(("amp", "channels_last"), [("bf16", False), ("fp16", True), ("none", True)])
def test_cuda_training_and_evaluation_agree_with_the_cpu(tiny_workdir, tiny_config, amp, channels_last):
    config = tiny_config("train.epochs=2", f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}")
    prepared = ensure_prepared(config, tiny_workdir, progress=False)
    training = build_training(config, prepared.cache_dir, device="cuda")
    assert next(training.model.parameters()).is_cuda
    expected_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    assert training.amp_dtype == expected_dtype
    assert (training.scaler is not None) == (amp == "fp16")  # the loss scaler only for fp16
    history = fit(training)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)

    on_gpu = evaluate(training.model, training.val_loader, device=training.device, channels_last=channels_last)
    cpu_model = copy.deepcopy(training.model).cpu().float()
    on_cpu = evaluate(cpu_model, training.val_loader, device=torch.device("cpu"))
    assert len(on_gpu) == len(on_cpu) > 0
    # fp32 on both devices: the same network gives the same probabilities up to cuDNN's rounding.
    np.testing.assert_allclose(on_gpu["prob"].to_numpy(), on_cpu["prob"].to_numpy(), atol=2e-3)
