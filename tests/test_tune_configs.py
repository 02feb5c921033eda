"""Every shipped config validates, and its model/data/optimiser setup trains one step when shrunk."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mammo_ray.config import load_config
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.search.cells import make_cells
from mammo_ray.train.loop import build_training, train_one_epoch

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
SHRINK = [
    "data.synth_patients=24",
    "data.synth_size=[384, 240]",
    "data.cache_px=80",
    "data.input_px=76",
    "data.num_workers=0",
    "data.offline_aug=false",
    "model.pretrained=null",
    "train.use_gpu=false",
    "train.batch_size=4",
    # A config on real data (tune_configs/cbis_*.yaml) trains on a synthetic stand-in: the same code path.
    "data.source=synthetic",
    "data.root=null",
    "data.csv_dir=null",
]


def test_the_paper_configs_are_there():
    names = {path.stem for path in CONFIGS}
    assert {
        "smoke",
        "paper000_googlenet_parallel_dog",
        "paper001_googlenet_deeper",
        "paper001_alexnet_context",
        "paper001_levynet",
        "paper004_resnet50_calc_vs_mass",
    } <= names


def _setup(path: Path) -> tuple:
    """What the training smoke test exercises: model, view mode, input channels, crop and task."""
    c = load_config(path)
    return (c.model.name, c.model.view_mode, c.model.in_chans, c.data.crop, c.data.task)


# One config per distinct setup: the others would train the same code path again.
DISTINCT = list({_setup(path): path for path in reversed(CONFIGS)}.values())[::-1]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_and_its_search_cells_validate(path):
    config = load_config(path)
    assert config.model.name and config.train.epochs >= 1
    assert make_cells(config)  # every search cell of the config validates too


def test_the_training_smoke_covers_every_setup():
    assert {_setup(p) for p in DISTINCT} == {_setup(p) for p in CONFIGS}
    assert len(DISTINCT) < len(CONFIGS)  # some configs share a setup (the search and ensemble configs)


@pytest.mark.slow
@pytest.mark.parametrize("path", DISTINCT, ids=[p.stem for p in DISTINCT])
def test_config_trains_one_epoch_when_shrunk(path, tmp_path_factory):
    config = load_config(path)
    extra = ["data.split_fractions=[0.7, 0.15, 0.15]"] if config.data.split_fractions[1] == 0 else []
    small = load_config(path, [*SHRINK, *extra])
    workdir = tmp_path_factory.getbasetemp() / "tune-configs-work"  # shared: same data, one synthesis
    prepared = ensure_prepared(small, workdir, progress=False)
    training = build_training(small, prepared.cache_dir)
    metrics = train_one_epoch(training.model, training.train_loader, training.optimizer, device=training.device)
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["train_acc"] <= 1
