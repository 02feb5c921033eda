"""Config overrides the tests share. A module of its own, not conftest: tests/explain has a conftest
too, and ``from conftest import ...`` would find whichever of the two was imported first."""

TINY_TRAIN = [  # a tiny training setup: levynet on 40-px crops, seconds per epoch on one core
    "data.synth_patients=40",
    "data.synth_size=[384, 240]",
    "data.seed=3",
    "data.cache_px=40",
    "data.input_px=32",
    "data.num_workers=0",
    "data.split_fractions=[0.6, 0.2, 0.2]",
    "model.name=levynet",
    "model.dropout=0.1",
    "train.batch_size=8",
    "train.epochs=2",
    "train.eval_bootstrap=50",
]

PATCH_TRAIN = [
    *TINY_TRAIN,
    "data.abnormality=all",
    "data.crop=patch",
    "data.task=mass_presence",
    "data.patch_px=64",
    "data.cache_px=32",
    "data.input_px=32",
    "data.normalization=global",
    "data.negatives_per_image=8",
    "train.epochs=6",
    "train.monitor=val_auc",
]
