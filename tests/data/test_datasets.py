"""Datasets over the cache: single views, CC+MLO pairs, task labels, offline 25x augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mammo_ray.config import DataConfig
from mammo_ray.data.cache import prepare_cache
from mammo_ray.data.datasets import CropCache, PairedViewDataset, SingleViewDataset, task_frame
from mammo_ray.data.transforms import build_eval_transform, build_train_transform


@pytest.fixture(scope="module")
def patch_cache(tmp_path_factory, small_index):
    manifest, split_of = small_index
    cfg = DataConfig(
        crop="patch",
        abnormality="all",
        cache_px=64,
        input_px=48,
        patch_px=64,
        num_workers=1,
        negatives_per_image=1,
        normalization="mean_image",
    )
    out = tmp_path_factory.mktemp("cache") / "patch"
    prepare_cache(manifest, split_of, cfg, out, progress=False)
    return CropCache(out), cfg, manifest, split_of


def test_task_labels(patch_cache):
    cache, _, manifest, split_of = patch_cache
    index = cache.index
    pathology = task_frame(index, "pathology")
    assert (pathology["kind"] == "lesion").all()
    assert pathology["label"].tolist() == pathology["malignant"].tolist()
    abnormality = task_frame(index, "abnormality")
    calc = abnormality["abnormality_type"].str.upper().str.startswith("CALC")
    assert (abnormality["label"] == calc.astype(int)).all()
    presence = task_frame(index, "mass_presence")
    assert set(presence["label"]) == {0, 1}
    assert (presence.loc[presence["label"] == 0, "kind"] == "negative").all()
    # labels agree with the manifest for every lesion crop
    truth = dict(zip(manifest["lesion_id"], manifest["label"], strict=True))
    assert all(truth[lid] == lab for lid, lab in zip(pathology["lesion_id"], pathology["label"], strict=True))


def test_single_view_dataset_and_loader(patch_cache):
    cache, cfg, _, _ = patch_cache
    spec = cache.transform_spec(cfg)
    assert spec.mean_image is not None and spec.mean_image.shape == (64, 64)
    ds = SingleViewDataset(cache, "train", "mass_presence", build_train_transform(spec))
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and y in (0, 1)
    assert len(ds) == len(ds.labels)
    batch, labels = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))  # memmaps reopen in workers
    assert batch.shape == (4, 3, 48, 48) and torch.isfinite(batch).all()
    eval_ds = SingleViewDataset(cache, "val", "mass_presence", build_eval_transform(spec))
    torch.testing.assert_close(eval_ds[0][0], eval_ds[0][0])
    with pytest.raises(ValueError, match="no mass_presence entries in split 'nope'"):
        SingleViewDataset(cache, "nope", "mass_presence")


def test_offline_augmentation_is_25x_and_fixed(patch_cache):
    cache, cfg, _, _ = patch_cache
    spec = cache.transform_spec(cfg.model_copy(update={"hflip": False}))
    ds = SingleViewDataset(cache, "train", "pathology", offline=(spec, 0))
    base = SingleViewDataset(cache, "train", "pathology")
    assert len(ds) == 25 * len(base)
    assert ds.labels.tolist() == np.repeat(base.labels, 25).tolist()
    first = [ds[i][0] for i in range(25)]
    assert all(f.shape == (3, 48, 48) for f in first)
    torch.testing.assert_close(ds[3][0], first[3])  # the same variant every time
    assert not torch.equal(first[0], first[5])  # different rotations differ


def test_paired_views(patch_cache):
    cache, cfg, manifest, _ = patch_cache
    spec = cache.transform_spec(cfg)
    ds = PairedViewDataset(cache, "train", "pathology", build_eval_transform(spec))
    (cc, mlo), label = ds[0]
    assert cc.shape == mlo.shape == (3, 48, 48) and label in (0, 1)
    pairs = ds.pairs.merge(cache.index[["entry", "view", "exam_key"]], left_on="cc_entry", right_on="entry")
    assert (pairs["view"] == "CC").all() and (pairs["exam_key_x"] == pairs["exam_key_y"]).all()
    lesions = task_frame(cache.index, "pathology")
    train_keys = lesions.loc[lesions["split"] == "train", "exam_key"].nunique()
    assert len(ds) + ds.unpaired == train_keys  # every lesion is paired or counted
    # Each sample is exactly its exam's CC and MLO crops, through the transform, with the manifest's label.
    transform, truth = build_eval_transform(spec), dict(zip(manifest["lesion_id"], manifest["label"], strict=True))
    by_view = lesions[lesions["split"] == "train"].set_index(["exam_key", "view"])
    for i, key in enumerate(ds.pairs["exam_key"]):
        (cc, mlo), label = ds[i]
        cc_row, mlo_row = by_view.loc[(key, "CC")], by_view.loc[(key, "MLO")]
        torch.testing.assert_close(cc, transform(cache.image(int(cc_row["entry"]))), rtol=0, atol=0)
        torch.testing.assert_close(mlo, transform(cache.image(int(mlo_row["entry"]))), rtol=0, atol=0)
        assert not torch.equal(cc, mlo)
        assert label == truth[cc_row["lesion_id"]] == truth[mlo_row["lesion_id"]]


def test_unpaired_lesions_are_counted(patch_cache):
    cache = CropCache(patch_cache[0].cache_dir)  # a private copy: this test edits the index
    lesions = cache.index[(cache.index["kind"] == "lesion") & (cache.index["split"] == "train")]
    drop = lesions[lesions["view"] == "MLO"].iloc[0]
    cache.index = cache.index.drop(index=drop.name)
    ds = PairedViewDataset(cache, "train", "pathology")
    assert drop["exam_key"] in ds.unpaired_keys and ds.unpaired >= 1
