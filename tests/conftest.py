"""Shared fixtures: one small synthetic dataset per session, indexed and split once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from setups import PATCH_TRAIN, TINY_TRAIN

from mammo_ray.data.synthetic import REAL_CBIS_CSVS

# The four real CBIS-DDSM case-description CSVs (CC BY 3.0, attribution in their README).
REAL_CSV_DIR = REAL_CBIS_CSVS


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A 12-patient synthetic CBIS-DDSM tree (CSV layout) at 384x240."""
    from mammo_ray.data.synthetic.cbis import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, patients=12, seed=5, size=(384, 240), progress=False)
    return out


@pytest.fixture(scope="session")
def small_index(small_dataset):
    """(manifest, split name per row) for ``small_dataset``."""
    from mammo_ray.data.cbis_ddsm import index_dataset
    from mammo_ray.data.splits import make_splits

    manifest, report = index_dataset(root=small_dataset, csv_dir=small_dataset, progress=False)
    assert report["resolved"] == report["rows"] > 0
    splits = make_splits(manifest, fractions=(0.6, 0.2, 0.2), seed=0)
    return manifest, splits.assign(manifest)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir whose synthetic data for ``TINY_TRAIN`` is already prepared."""
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared

    workdir = tmp_path_factory.mktemp("work")
    ensure_prepared(load_config(None, TINY_TRAIN), workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def tiny_config():
    """``load_config(None, TINY_TRAIN + overrides)``."""
    from mammo_ray.config import load_config

    return lambda *overrides: load_config(None, [*TINY_TRAIN, *overrides])


def _trained_checkpoint(overrides, workdir, out_dir):
    """Train ``load_config(None, overrides)`` without Ray and save its checkpoint: (path, prepared)."""
    import torch

    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared
    from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint
    from mammo_ray.train.loop import build_training, fit

    torch.manual_seed(0)
    config = load_config(None, overrides)
    prepared = ensure_prepared(config, workdir, progress=False)
    training = build_training(config, prepared.cache_dir)
    fit(training)
    payload = checkpoint_payload(
        model=training.model, config=config, spec=training.spec, epoch=config.train.epochs - 1, history=training.history
    )
    return save_checkpoint(payload, out_dir), prepared


@pytest.fixture(scope="session")
def patch_model(tiny_workdir, tmp_path_factory):
    """(checkpoint, prepared data) of a levynet mass / no-mass patch classifier (paper 003), trained
    for a few epochs on the tiny synthetic data with global normalisation (dense maps are exact)."""
    return _trained_checkpoint(PATCH_TRAIN, tiny_workdir, tmp_path_factory.mktemp("patch-model"))


@pytest.fixture(scope="session")
def lesion_model(tiny_workdir, tmp_path_factory):
    """(checkpoint, prepared data) of a levynet benign / malignant classifier on proportional crops."""
    return _trained_checkpoint([*TINY_TRAIN, "train.epochs=3"], tiny_workdir, tmp_path_factory.mktemp("lesion-model"))
