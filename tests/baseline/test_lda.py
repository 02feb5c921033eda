"""The feature + LDA baseline end to end on synthetic data (paper 000 §2.4).

The synthetic generator draws malignant masses irregular or spiculated and benign ones
round or oval, so outline features alone should rank them well above chance. The 40-patient
``TINY_TRAIN`` data leave 10 test lesions, too few for a stable AUC; these tests prepare 120
patients (about 30 s on 2 cores) in the session workdir. Test AUCs with ``data.seed`` 0 to 4
were 0.89, 0.79, 0.92, 0.86 (seed 3, used here) and 0.69.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammo_ray.baseline.features import FEATURE_NAMES
from mammo_ray.baseline.lda import run_baseline, split_features
from mammo_ray.data.datasets import CropCache, task_frame
from mammo_ray.data.pipeline import ensure_prepared

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OVERRIDES = ("data.synth_patients=120",)  # on top of TINY_TRAIN, whose data.seed is 3


@pytest.fixture(scope="module")
def prepared(tiny_workdir, tiny_config):
    config = tiny_config(*OVERRIDES)
    return config, Path(ensure_prepared(config, tiny_workdir, progress=False).cache_dir)


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory):
    config, cache_dir = prepared
    out = tmp_path_factory.mktemp("baseline")
    return run_baseline(config, cache_dir, out, n_boot=200), out


def test_baseline_beats_chance_on_test(baseline):
    result, _ = baseline
    metrics = result["test"].metrics
    assert metrics["test_n"] >= 30
    assert metrics["test_auc"] > 0.65  # 0.86 measured; 0.69 to 0.92 over data seeds 0 to 4
    assert metrics["test_auc_ci_low"] > 0.5
    assert metrics["test_acc"] > 0.6  # 0.85 measured
    assert result["test"].image.auc == metrics["test_auc"]  # single view: per image is primary


def test_reports_and_files(baseline, prepared):
    result, out = baseline
    _, cache_dir = prepared
    cache = CropCache(cache_dir)
    frame = task_frame(cache.index, "pathology")
    assert result["features"] == FEATURE_NAMES
    assert result["skipped"] == {"train": 0, "val": 0, "test": 0}
    assert result["n_train"] == int((frame["split"] == "train").sum())
    for split in ("val", "test"):
        assert result[split].view_mode == "single" and result[split].n == int((frame["split"] == split).sum())
        for name in (f"metrics_{split}.json", f"roc_{split}.png", f"confusion_{split}.png", f"predictions_{split}.csv"):
            assert (out / name).is_file(), name
        assert json.loads((out / f"metrics_{split}.json").read_text())["metrics"] == result[split].metrics
        predictions = pd.read_csv(out / f"predictions_{split}.csv")
        assert list(predictions.columns) == ["exam_key", "view", "patient_id", "prob", "label"]
        assert predictions["prob"].between(0, 1).all() and set(predictions["label"]) == {0, 1}
    assert Image.open(out / "roc_test.png").size[0] > 100


def test_coefficients_reproduce_the_predictions(baseline, prepared):
    result, out = baseline
    _, cache_dir = prepared
    saved = json.loads(Path(result["coefficients"]).read_text())
    assert saved["features"] == FEATURE_NAMES and saved["classes"] == [0, 1]
    assert "research use only" in saved["disclaimer"].lower()
    cache = CropCache(cache_dir)
    x, rows, _ = split_features(cache, task_frame(cache.index, "pathology"), "test")
    score = ((x - saved["scaler_mean"]) / saved["scaler_scale"]) @ saved["coef"] + saved["intercept"]
    predictions = pd.read_csv(out / "predictions_test.csv")
    np.testing.assert_allclose(predictions["prob"], 1 / (1 + np.exp(-score)), rtol=1e-6)
    assert predictions["exam_key"].fillna("").tolist() == rows["exam_key"].fillna("").tolist()


def test_empty_masks_are_skipped_and_counted(prepared, tmp_path):
    config, cache_dir = prepared
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cache = CropCache(copy)
    frame = task_frame(cache.index, "pathology")
    entries = {split: int(frame.loc[frame["split"] == split, "entry"].iloc[0]) for split in ("train", "test")}
    for entry in entries.values():  # blank the mask of the first train and the first test lesion
        row = cache.index.iloc[entry]
        path = copy / "shards" / f"shard-{int(row['shard']):05d}.masks.npy"
        masks = np.load(path)
        masks[int(row["offset"])] = 0
        np.save(path, masks)
    result = run_baseline(config, copy, tmp_path / "out", n_boot=0)
    assert result["skipped"] == {"train": 1, "val": 0, "test": 1}
    assert result["skipped_entries"] == {"train": [entries["train"]], "val": [], "test": [entries["test"]]}
    assert result["n_train"] == int((frame["split"] == "train").sum()) - 1
    assert result["test"].n == int((frame["split"] == "test").sum()) - 1


def test_mass_presence_is_rejected(prepared, tiny_config, tmp_path):
    _, cache_dir = prepared
    with pytest.raises(ValueError, match="mass_presence.*no lesion mask"):
        run_baseline(tiny_config(*OVERRIDES, "data.task=mass_presence"), cache_dir, tmp_path)
    assert not any(tmp_path.iterdir())  # rejected before writing anything
