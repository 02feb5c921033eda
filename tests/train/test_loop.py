"""The plain PyTorch loop (no Ray): sampling, optimisation policies, view modes, early stopping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.train.loop import (
    EarlyStopping,
    EpochSampler,
    build_optimizer,
    build_scheduler,
    build_training,
    evaluate,
    fit,
    summarize_predictions,
)


def test_epoch_sampler_shards_are_disjoint_and_cover_the_set():
    labels = np.array([0] * 7 + [1] * 4)
    shards = [list(EpochSampler(labels, rank=r, world=3, seed=1)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # ceil(11 / 3), padded by wrapping
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(11))
    assert len(set(shards[0]) & set(shards[1])) == 0


def test_epoch_sampler_is_seeded_per_epoch():
    labels = np.zeros(20, dtype=int)
    sampler = EpochSampler(labels, seed=4)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochSampler(labels, seed=4)) == first


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    drawn = []
    for epoch in range(30):
        sampler = EpochSampler(labels, seed=0, balanced=True)
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share = labels[drawn].mean()
    assert 0.45 < share < 0.55  # 0.10 without balancing


@pytest.mark.slow
def test_adam_exponential_decay_paper000(tiny_config):
    from mammo_ray.models import create_model

    config = tiny_config("optim.name=adam", "optim.lr=0.001", "optim.gamma=0.99", "optim.schedule=exponential")
    model = create_model("levynet")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    assert isinstance(optimizer, torch.optim.Adam)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 0.99**3)


@pytest.mark.slow
def test_sgd_poly_decay_paper001(tiny_config):
    from mammo_ray.models import create_model

    config = tiny_config(
        "optim.name=sgd", "optim.lr=0.01", "optim.schedule=poly", "optim.poly_power=0.5", "train.epochs=4"
    )
    optimizer = build_optimizer(create_model("levynet"), config)
    scheduler = build_scheduler(optimizer, config)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 1 / 4) ** 0.5)


def test_finetune_multipliers_and_frozen_trunk(tiny_config):
    from mammo_ray.models import build_view_model

    config = tiny_config(
        "model.name=googlenet",
        "model.train_last=2",
        "model.early_lr_mult=0.1",
        "model.head_lr_mult=10",
        "model.head_bias_lr_mult=20",
        "optim.lr=0.01",
        "data.input_px=32",
    )
    optimizer = build_optimizer(build_view_model(config.model), config)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["head.weight"] == pytest.approx(0.1) and lrs["head.bias"] == pytest.approx(0.2)
    assert sorted(v for k, v in lrs.items() if not k.startswith("head"))[-1] == pytest.approx(0.01)
    assert min(lrs.values()) == pytest.approx(0.001)

    frozen = tiny_config("model.name=resnet18", "model.train_last=1", "model.early_lr_mult=0")
    model = build_view_model(frozen.model)
    optimizer = build_optimizer(model, frozen)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("features.layer4", "fc")) for name in trainable)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_early_stopping():
    stopper = EarlyStopping("val_loss", patience=2)
    assert not stopper.update({"val_loss": 1.0})
    assert not stopper.update({"val_loss": 0.9})
    assert not stopper.update({"val_loss": 0.95})
    assert stopper.update({"val_loss": 0.91})
    auc = EarlyStopping("val_auc", patience=None)
    assert not any(auc.update({"val_auc": v}) for v in (0.5, 0.4, 0.3, 0.2))


@pytest.mark.slow
@pytest.mark.parametrize("view_mode", ["single", "parallel", "multimodal"])
def test_fit_every_view_mode(tiny_workdir, tiny_config, view_mode):
    config = tiny_config(f"model.view_mode={view_mode}", "train.epochs=2")
    prepared = ensure_prepared(config, tiny_workdir, progress=False)
    training = build_training(config, prepared.cache_dir)
    seen = []
    history = fit(training, on_epoch=lambda epoch, metrics, last: seen.append((epoch, last)))
    assert seen == [(0, False), (1, True)]
    assert all(math.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1 for h in history)
    frame = evaluate(training.model, training.val_loader, device=training.device)
    assert frame["prob"].between(0, 1).all() and set(frame["label"]) <= {0, 1}
    # every row names its patient (the bootstrap's cluster), and the exam-level loss exists in every mode
    assert frame["patient_id"].str.startswith("P_").all()
    assert all(math.isfinite(h["val_exam_loss"]) for h in history)
    if view_mode == "multimodal":  # one row per CC+MLO pair
        assert frame["exam_key"].is_unique
        assert (frame["patient_id"] == frame["exam_key"].str.extract(r"^(P_\d+)")[0]).all()
    else:  # one row per crop; parallel's primary metrics are the exam averages
        assert set(frame["view"]) == {"CC", "MLO"}
        metrics = summarize_predictions(frame, view_mode)
        level = "val_image_auc" if view_mode == "single" else "val_exam_auc"
        assert metrics["val_auc"] == pytest.approx(metrics[level], nan_ok=True)


@pytest.mark.slow
def test_stop_at_train_accuracy_paper004(tiny_workdir, tiny_config):
    config = tiny_config("train.epochs=5", "train.stop_train_acc=0.01", "train.stop_train_window=3")
    prepared = ensure_prepared(config, tiny_workdir, progress=False)
    history = fit(build_training(config, prepared.cache_dir))
    assert len(history) == 1  # any accuracy beats 1%: stops after the first epoch


def test_dog_input_needs_one_channel(tiny_config):
    with pytest.raises(ValueError, match="data.channels"):
        tiny_config("model.in_chans=9")
    config = tiny_config("model.in_chans=9", "data.channels=1")
    assert config.model.in_chans == 9


@pytest.mark.slow
def test_channels_last_changes_only_the_layout_on_cpu(tiny_workdir, tiny_config):
    """The GPU option channels_last changes the memory layout only: the same initial model gives the
    same outputs in both layouts, and an epoch trains (AMP is CUDA-only: amp_dtype stays None on CPU)."""
    outputs = []
    for layout in ("false", "true"):
        config = tiny_config("train.epochs=1", f"train.channels_last={layout}", "train.amp=bf16")
        training = build_training(config, ensure_prepared(config, tiny_workdir, progress=False).cache_dir)
        assert training.amp_dtype is None and training.scaler is None
        outputs.append(evaluate(training.model, training.val_loader, device=training.device)["prob"].to_numpy())
        if layout == "true":
            assert training.model.features[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
            history = fit(training)
            assert math.isfinite(history[-1]["train_loss"])
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
