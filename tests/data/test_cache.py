"""Crop cache: every crop mode, decode-once shards, skipped inputs reported, resume after a kill."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_ray.config import DataConfig
from mammo_ray.data import cache as cache_module
from mammo_ray.data.cache import CacheError, prepare_cache
from mammo_ray.data.datasets import CropCache


def cfg(**kw) -> DataConfig:
    base = dict(
        cache_px=64,
        input_px=48,
        num_workers=1,
        shard_images=4,
        seed_crop_px=120,
        patch_px=64,
        whole_size=(192, 120),
        negatives_per_image=2,
        abnormality="all",
    )
    return DataConfig(**{**base, **kw})


def arrays(cache_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted((cache_dir / "shards").glob("*.npy"))}


@pytest.mark.parametrize("crop", ["seed750", "fixed", "proportional", "patch", "whole"])
def test_every_mode(tmp_path, small_index, crop):
    manifest, split_of = small_index
    summary = prepare_cache(manifest, split_of, cfg(crop=crop), tmp_path / crop, progress=False)
    cache = CropCache(tmp_path / crop)
    index = cache.index
    images_in_splits = manifest.loc[split_of != "", "image_id"].nunique()
    assert summary.images_decoded == images_in_splits  # each film decoded exactly once
    assert summary.skipped == []
    # synthetic films carry ImageLaterality and lay right breasts out as standard display does
    assert (summary.orientation_from_content, summary.orientation_disagreements) == (0, 0)
    assert set(index["split"]) <= {"train", "val", "test"}
    shape = (192, 120) if crop == "whole" else (64, 64)
    assert cache.image(0).shape == shape and cache.image(0).dtype == np.uint16
    lesions = index[index["kind"] == "lesion"]
    if crop == "whole":
        assert len(index) == images_in_splits
        assert (index["kind"] == "whole").all()
        assert all(cache.mask(i).any() for i in range(len(index)))  # each image shows its lesions
        return
    assert len(lesions) == int((split_of != "").sum())  # one crop per abnormality row
    # the ROI sits at the centre of every lesion crop (seed750, fixed, proportional and patch are centred)
    centre_hits = [cache.mask(int(i))[28:36, 28:36].any() for i in lesions["entry"]]
    assert np.mean(centre_hits) > 0.9
    widths = lesions["box_x1"] - lesions["box_x0"]
    heights = lesions["box_y1"] - lesions["box_y0"]
    assert (widths == heights).all()  # square boxes
    if crop == "seed750":
        assert (widths == 120).all()
    if crop == "patch":
        negatives = index[index["kind"] == "negative"]
        assert len(negatives) > 0 and (negatives["mass"] == 0).all() and (negatives["malignant"] == -1).all()
        assert not any(cache.mask(int(i)).any() for i in negatives["entry"])  # non-mass patches avoid ROIs
        assert (widths == 64).all()


def test_training_statistics_and_config_mismatch(tmp_path, small_index):
    manifest, split_of = small_index
    out = tmp_path / "c"
    prepare_cache(manifest, split_of, cfg(), out, progress=False)
    meta = json.loads((out / "cache.json").read_text())
    mean_image = np.load(out / "mean_image.npy")
    cache = CropCache(out)
    train = cache.index[cache.index["split"] == "train"]
    expected = np.mean([cache.image(int(i)).astype(np.float64) for i in train["entry"]], axis=0)
    np.testing.assert_allclose(mean_image, expected, rtol=1e-5)
    assert meta["train_mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert meta["train_std"] > 0
    with pytest.raises(CacheError, match=r"differs in \['cache_px'\]"):
        prepare_cache(manifest, split_of, cfg(cache_px=96), out, progress=False)


def test_unreadable_image_is_skipped_and_reported(tmp_path, small_index):
    manifest, split_of = small_index
    manifest = manifest.copy()
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom at all")
    victim = manifest.index[split_of != ""][0]
    manifest.loc[victim, "image_path"] = str(bad)
    summary = prepare_cache(manifest, split_of, cfg(), tmp_path / "c", progress=False)
    assert len(summary.skipped) == 1
    assert summary.skipped[0]["lesion_id"] == manifest.loc[victim, "lesion_id"]
    assert "broken.dcm" in summary.skipped[0]["path"] and "not a DICOM" in summary.skipped[0]["reason"]
    assert summary.entries == int((split_of != "").sum()) - 1


def test_resume_after_lost_shards_gives_the_same_cache(tmp_path, small_index):
    manifest, split_of = small_index
    out = tmp_path / "c"
    c = cfg(crop="patch")
    prepare_cache(manifest, split_of, c, out, progress=False)
    reference_index = pd.read_parquet(out / "index.parquet")
    reference = arrays(out)
    reference_mean = np.load(out / "mean_image.npy")
    reference_meta = json.loads((out / "cache.json").read_text())
    # lose a finished shard, and leave half-written temp files behind as a crash would
    (out / "shards" / "shard-00001.parquet").unlink()
    (out / "shards" / "shard-00001.images.tmp999.npy").write_bytes(b"partial")
    summary = prepare_cache(manifest, split_of, c, out, progress=False)
    assert summary.shards_reused == summary.shards_total - 1
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index.parquet"), reference_index)
    again = arrays(out)
    assert again.keys() >= reference.keys()
    for name, array in reference.items():
        np.testing.assert_array_equal(again[name], array)
    # the training statistics sum reused shards (read back) and the redone one (from its worker) alike
    np.testing.assert_array_equal(np.load(out / "mean_image.npy"), reference_mean)
    meta = json.loads((out / "cache.json").read_text())
    assert (meta["train_mean"], meta["train_std"]) == (reference_meta["train_mean"], reference_meta["train_std"])
    assert meta["summary"]["images_decoded"] < reference_meta["summary"]["images_decoded"]  # only the lost shard


# The child SIGKILLs its whole process group (itself and its shard workers) as soon as two shards
# are done: mid-prepare by construction, with no timing to win or lose.
KILL_SCRIPT = """
import os, signal, sys, pandas as pd
from mammo_ray.config import DataConfig
from mammo_ray.data import cache
from mammo_ray.data.cache import prepare_cache
real_as_completed = cache.as_completed
def as_completed_then_kill(futures):
    for done, future in enumerate(real_as_completed(futures), start=1):
        yield future
        if done == 2:
            future.result()
            os.killpg(0, signal.SIGKILL)
cache.as_completed = as_completed_then_kill
manifest = pd.read_parquet(sys.argv[1])
split_of = pd.read_parquet(sys.argv[2])["split"]
cfg = DataConfig.model_validate_json(open(sys.argv[3]).read())
prepare_cache(manifest, split_of, cfg, sys.argv[4], progress=False)
"""


@pytest.mark.slow
def test_sigkill_mid_prepare_resumes_to_the_same_cache(tmp_path, small_index):
    manifest, split_of = small_index
    c = cfg(crop="proportional", shard_images=1)
    reference = tmp_path / "ref"
    prepare_cache(manifest, split_of, c, reference, progress=False)
    manifest.to_parquet(tmp_path / "m.parquet")
    split_of.rename("split").to_frame().to_parquet(tmp_path / "s.parquet")
    (tmp_path / "c.json").write_text(c.model_dump_json())
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            str(tmp_path / "m.parquet"),
            str(tmp_path / "s.parquet"),
            str(tmp_path / "c.json"),
            str(out),
        ],
        start_new_session=True,
    )
    assert proc.wait(timeout=300) == -signal.SIGKILL  # killed itself after its second shard
    done_before = len(list((out / "shards").glob("*.parquet")))
    assert not (out / "index.parquet").exists()
    summary = prepare_cache(manifest, split_of, c, out, progress=False)
    assert summary.shards_reused >= done_before >= 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index.parquet"), pd.read_parquet(reference / "index.parquet"))
    ref_arrays, got = arrays(reference), arrays(out)
    for name, array in ref_arrays.items():
        np.testing.assert_array_equal(got[name], array)
    shutil.rmtree(out)


def test_forked_and_spawned_workers_write_the_same_cache(tmp_path, small_index, monkeypatch):
    """prepare forks its workers when no other thread runs (they start at once) and spawns them beside one."""
    manifest, split_of = small_index
    c = cfg(crop="patch", num_workers=2)
    stop = threading.Event()
    beside = threading.Thread(target=stop.wait, daemon=True)
    beside.start()
    try:
        assert cache_module.worker_context().get_start_method() == "spawn"
        prepare_cache(manifest, split_of, c, tmp_path / "spawned", progress=False)
    finally:
        stop.set()
        beside.join()
    monkeypatch.setattr(cache_module, "worker_context", lambda: mp.get_context("fork"))
    prepare_cache(manifest, split_of, c, tmp_path / "forked", progress=False)
    spawned, forked = (pd.read_parquet(tmp_path / name / "index.parquet") for name in ("spawned", "forked"))
    assert len(spawned) > 0
    pd.testing.assert_frame_equal(spawned, forked)
    a, b = arrays(tmp_path / "spawned"), arrays(tmp_path / "forked")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_shard_size_is_refused_by_name(tmp_path, small_index):
    """Shards are numbered by position: with another ``shard_images`` a resume would mix other films' shards."""
    manifest, split_of = small_index
    prepare_cache(manifest, split_of, cfg(crop="fixed", shard_images=4), tmp_path / "c", progress=False)
    with pytest.raises(CacheError, match="shard_images"):
        prepare_cache(manifest, split_of, cfg(crop="fixed", shard_images=2), tmp_path / "c", progress=False)
