"""The non-deep-learning baseline of paper 000 §2.4: lesion features + linear discriminant analysis.

Paper 000 (see docs/papers.md) recreates Sahiner's method (texture, morphological and run-length features,
linear discriminant analysis) for comparison with its CNNs. ``run_baseline`` does the same
on a prepared crop cache: ``features.lesion_features`` for every lesion crop, a standardising
LDA fitted on the train split, and the val and test predictions reported with the CNN's own
``report_predictions`` (per-image metrics primary, as ``view_mode="single"``), so the numbers
sit beside the CNN rows; their AUC CIs resample patients (the frame carries ``patient_id``), as
the CNN's do, because one patient's lesions are correlated. Sahiner's stepwise feature selection
is replaced by shrinkage LDA (Ledoit-Wolf), which stays stable with few training lesions. For
research use only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook

from mammo_ray.baseline.features import FEATURE_NAMES, lesion_features
from mammo_ray.config import Config
from mammo_ray.constants import DISCLAIMER, Task
from mammo_ray.data.datasets import CropCache, task_frame
from mammo_ray.train.evaluation import report_predictions

SPLITS = ("train", "val", "test")
FRAME_COLUMNS = ["exam_key", "view", "patient_id"]  # the id columns of loop.evaluate's frame


def split_features(
    cache: CropCache, frame: pd.DataFrame, split: str, *, levels: int = 32, progress: bool = False
) -> tuple[np.ndarray, pd.DataFrame, list[int]]:
    """Features of every entry of ``frame`` (a ``task_frame``) in ``split``.

    Each entry's stored mask is its own lesion's ROI (not its film's other lesions), so the
    features describe that lesion even when a neighbour shares the crop. Entries whose mask is
    empty have no lesion to describe: they are left out and their cache entry numbers returned,
    for the caller to report.

    Returns:
        ``(features (n, len(FEATURE_NAMES)), rows of the n entries used, skipped entries)``.
    """
    rows = frame[frame["split"] == split]
    vectors, kept, skipped = [], [], []
    for position, entry in enumerate(tqdm(rows["entry"], desc=f"features {split}", unit="crop", disable=not progress)):
        mask = cache.mask(int(entry))
        if not mask.any():
            skipped.append(int(entry))
            continue
        vectors.append(lesion_features(cache.image(int(entry)), mask, levels=levels))
        kept.append(position)
    features = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), len(FEATURE_NAMES))
    return features, rows.iloc[kept].reset_index(drop=True), skipped


def fit_lda(features: np.ndarray, labels: np.ndarray) -> Pipeline:
    """Standardise, then shrinkage LDA (lsqr solver, Ledoit-Wolf shrinkage); deterministic."""
    classes = np.unique(labels)
    if classes.size != 2:
        raise ValueError(
            f"LDA needs both classes in the train split; it has label(s) {classes.tolist()} in {labels.size} lesions"
        )
    model = make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"))
    return model.fit(features, labels)


def prediction_frame(rows: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """``exam_key, view, patient_id, prob, label``: the frame ``loop.evaluate`` builds for a CNN."""
    frame = rows[FRAME_COLUMNS].reset_index(drop=True).copy()
    frame["prob"] = np.asarray(probs, dtype=np.float64)
    frame["label"] = rows["label"].to_numpy().astype(np.int64)
    return frame


def write_coefficients(model: Pipeline, path: Path, *, task: Task, n_train: int) -> Path:
    """The fitted scaler and discriminant as JSON (no pickles): ``score = coef . (x - mean) / scale
    + intercept`` and ``P(class 1) = sigmoid(score)``."""
    scaler, lda = model.named_steps["standardscaler"], model.named_steps["lineardiscriminantanalysis"]
    payload = {
        "disclaimer": DISCLAIMER,
        "task": task.value.lower(),
        "n_train": n_train,
        "classes": [int(c) for c in lda.classes_],
        "shrinkage": "auto (Ledoit-Wolf)",
        "features": list(FEATURE_NAMES),
        "scaler_mean": scaler.mean_.tolist(),
        "scaler_scale": scaler.scale_.tolist(),
        "coef": lda.coef_[0].tolist(),
        "intercept": float(lda.intercept_[0]),
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def run_baseline(
    config: Config,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    levels: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the feature + LDA baseline on the train split and report it on val and test.

    Args:
        config: the run config; ``data.task`` picks the labels (pathology or abnormality).
        cache_dir: a crop cache prepared for ``config`` (``ensure_prepared(...).cache_dir``).
        out_dir: where predictions, metrics, plots and ``lda_coefficients.json`` go.
        n_boot: bootstrap resamples for the AUC confidence intervals.
        levels: gray levels of the texture features.
        progress: show a progress bar per split.

    Returns:
        ``{"features": FEATURE_NAMES, "n_train": int, "skipped": {split: count},
        "skipped_entries": {split: [cache entry, ...]}, "val": report, "test": report,
        "coefficients": path}``, each report being what ``report_predictions`` returns.

    Raises:
        ValueError: for the mass_presence task, an empty split, or a train split of one class.
    """
    task = Task.parse(config.data.task)
    if task is Task.MASS_PRESENCE:
        raise ValueError(
            "the LDA baseline cannot run task mass_presence: its non-mass patches have no "
            "lesion mask to take features from; use task pathology or abnormality"
        )
    cache = CropCache(cache_dir)
    frame = task_frame(cache.index, task)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data, skipped = {}, {}
    for split in SPLITS:
        features, rows, skipped[split] = split_features(cache, frame, split, levels=levels, progress=progress)
        if rows.empty:
            raise ValueError(
                f"{cache.cache_dir}: no {task.value.lower()} lesions with a mask in split {split!r} "
                f"({len(skipped[split])} skipped for an empty mask)"
            )
        data[split] = (features, rows)

    train_x, train_rows = data["train"]
    model = fit_lda(train_x, train_rows["label"].to_numpy())
    result: dict[str, Any] = {
        "features": list(FEATURE_NAMES),
        "n_train": len(train_rows),
        "skipped": {split: len(entries) for split, entries in skipped.items()},
        "skipped_entries": skipped,
    }
    for split in ("val", "test"):
        x, rows = data[split]
        probs = model.predict_proba(x)[:, list(model.classes_).index(1)]
        result[split] = report_predictions(
            prediction_frame(rows, probs), "single", split, out_dir, n_boot=n_boot, task=task.value.lower()
        )
    result["coefficients"] = str(
        write_coefficients(model, out_dir / "lda_coefficients.json", task=task, n_train=len(train_rows))
    )
    return result
