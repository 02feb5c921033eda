"""Evaluate a checkpoint on a split: predictions, metrics per image and per exam, plots.

The model and its preprocessing come from the checkpoint alone (``restore_model``); the
data come from the checkpoint's own config, prepared in the workdir when absent. AUC CIs are
cluster bootstraps over patients (``metrics``): a patient's cases are resampled together, because
they are correlated and are not independent evidence.

Results are typed: ``CheckpointPredictions`` (the prediction table and what made it) and
``EvaluationResult`` (metrics per level, files written); ``EvaluationResult.to_dict`` is the JSON
written as ``metrics_<split>.json`` and printed by ``mammo-ray evaluate --json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from mammo_ray.config import Config
from mammo_ray.constants import CLASS_NAMES, Task
from mammo_ray.data.datasets import CropCache, PairedViewDataset, SingleViewDataset
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.decisions.policy import DecisionPolicy
from mammo_ray.decisions.referral import member_uncertainty
from mammo_ray.decisions.report import decision_report, fit_policy
from mammo_ray.ensemble.combine import member_matrix
from mammo_ray.train.checkpoint import load_checkpoint, restore_model
from mammo_ray.train.loop import evaluate, relabel_fold
from mammo_ray.train.metrics import (
    CLUSTER,
    PRIMARY_LEVEL,
    BinaryMetrics,
    evaluate_predictions,
    exam_level,
    summarize_levels,
)
from mammo_ray.train.plots import plot_confusion, plot_rocs, plot_training_curves

NO_POLICY = "none: the val split lacks one of the classes, so no calibration, thresholds or referral were fitted"


@dataclass
class CheckpointPredictions:
    """A checkpoint's prediction table on one split, and what produced it."""

    frame: pd.DataFrame  # one row per case, columns as ``loop.evaluate`` makes them (label, prob, ...)
    config: Config  # the checkpoint's own config
    history: list[dict[str, Any]]  # its training history (per-epoch metrics)
    unpaired: int  # multimodal: cases left out for lacking their other view; 0 otherwise
    decisions: dict[str, Any] | None = None  # the decision policy stored in the checkpoint (fitted on val)


@dataclass
class EvaluationResult:
    """Metrics of one prediction table per image and per exam, and the files written for it."""

    split: str
    view_mode: str
    n: int  # cases predicted (images, or exams for a multimodal model)
    unpaired: int
    bootstrap_unit: str  # "patient" (cluster bootstrap) or "case"
    metrics: dict[str, float]  # flat ``<split>_auc``, ... at the view mode's primary level (and both levels)
    image: BinaryMetrics  # every metric per image
    exam: BinaryMetrics  # ... and per exam (CC and MLO averaged)
    predictions: str  # predictions_<split>.csv
    plots: list[str]  # ROC, confusion matrix (and training curves), reliability, PR and referral PNGs
    decisions: dict[str, Any] | None = None  # decisions.report.decision_report: calibration, thresholds, referral
    policy: DecisionPolicy | None = None  # the policy those figures applied (fitted on val)

    def level(self, name: str) -> BinaryMetrics:
        """``"image"`` or ``"exam"``."""
        if name not in ("image", "exam"):
            raise ValueError(f"unknown level {name!r}: expected 'image' or 'exam'")
        return self.image if name == "image" else self.exam

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``metrics_<split>.json``: each level flat (``BinaryMetrics.to_dict``) with its confusion."""
        return {
            "split": self.split,
            "view_mode": self.view_mode,
            "n": self.n,
            "unpaired": self.unpaired,
            "bootstrap_unit": self.bootstrap_unit,
            "metrics": self.metrics,
            **{
                name: {**m.to_dict(), "confusion": m.confusion}
                for name, m in (("image", self.image), ("exam", self.exam))
            },
            "predictions": self.predictions,
            "plots": self.plots,
            **(_decision_fields(self.decisions) if self.decisions else {}),
        }


def _decision_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The decision report's keys in ``--json``: brier, ece, ece_calibrated, operating_points, referral, ..."""
    if "skipped" in report:  # no policy could be fitted: say why instead of leaving the fields out silently
        return {"decisions": report}
    keys = ("brier", "ece", "ece_calibrated", "operating_points", "referral", "calibration", "policy")
    return {
        **{k: report[k] for k in keys},
        "decisions": {k: report[k] for k in ("policy_source", "in_sample", "json", "plots")},
    }


def predict_checkpoint(
    checkpoint: str | Path,
    split: str,
    workdir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    fold: int | None = None,
    splits_path: str | Path | None = None,
    progress: bool = False,
    payload: dict[str, Any] | None = None,
) -> CheckpointPredictions:
    """The prediction table of ``checkpoint`` on ``split`` (columns as ``loop.evaluate`` makes them);
    ``payload``: the checkpoint's content when the caller has already read it."""
    payload = load_checkpoint(checkpoint) if payload is None else payload
    model, spec, config = restore_model(payload, "cuda" if torch.cuda.is_available() else "cpu")
    if cache_dir is None:
        prepared = ensure_prepared(config, workdir, progress=progress)
        cache_dir, splits_path = prepared.cache_dir, splits_path or prepared.splits
    cache = CropCache(cache_dir)
    if fold is not None:
        if splits_path is None:
            raise ValueError(f"predict_checkpoint: fold {fold} needs splits_path (the splits JSON with the folds)")
        cache.index = relabel_fold(cache.index, splits_path, fold)
    transform = build_eval_transform(spec)  # exactly the preprocessing stored with the model
    dataset: PairedViewDataset | SingleViewDataset
    if config.model.view_mode == "multimodal":
        dataset = PairedViewDataset(cache, split, config.data.task, transform=transform)
    else:
        dataset = SingleViewDataset(cache, split, config.data.task, transform=transform)
    loader = DataLoader(dataset, batch_size=config.train.batch_size, shuffle=False)
    device = next(model.parameters()).device
    return CheckpointPredictions(
        frame=evaluate(model, loader, device=device),
        config=config,
        history=payload["history"],
        unpaired=int(getattr(dataset, "unpaired", 0)),
        decisions=payload.get("decisions"),
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str,
    workdir: str | Path,
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    cache_dir: str | Path | None = None,
    fold: int | None = None,
    splits_path: str | Path | None = None,
    progress: bool = False,
    plots: bool = True,
    payload: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate ``checkpoint`` on ``split`` and write predictions, metrics and plots (unless ``plots`` is False)
    to ``out_dir`` (``payload``: the checkpoint's content when the caller has already read it).

    The flat ``metrics`` of the result use the view mode's primary level (see
    ``loop.summarize_predictions``); ``image`` and ``exam`` hold every ``BinaryMetrics`` value.
    The decision policy (calibration, operating thresholds, referral cut-off) is the one stored in
    the checkpoint; a checkpoint without one gets it fitted on its val split here (the split being
    evaluated when that is val), never on another split.
    """
    predicted = predict_checkpoint(
        checkpoint,
        split,
        workdir,
        cache_dir=cache_dir,
        fold=fold,
        splits_path=splits_path,
        progress=progress,
        payload=payload,
    )
    config = predicted.config
    policy: DecisionPolicy | None
    if predicted.decisions is not None:
        policy, source = DecisionPolicy.from_dict(predicted.decisions), "checkpoint"
    else:
        val = (
            predicted
            if split == "val"
            else predict_checkpoint(
                checkpoint, "val", workdir, cache_dir=cache_dir, fold=fold, splits_path=splits_path, payload=payload
            )
        )
        policy, source = _fit_on_val(val.frame, None, config), NO_POLICY
        source = "fitted on val now" if policy is not None else source
    return report_predictions(
        predicted.frame,
        config.model.view_mode,
        split,
        out_dir,
        n_boot=n_boot,
        task=config.data.task,
        history=predicted.history,
        unpaired=predicted.unpaired,
        policy=policy,
        policy_source=source,
        seed=config.train.seed,
        plots=plots,
    )


def _fit_on_val(frame: pd.DataFrame, member_probs: Any, config: Config) -> DecisionPolicy | None:
    """The decision policy fitted on a val prediction table (None when val lacks a class: nothing to fit)."""
    labels = frame["label"].to_numpy()
    if not 0 < labels.sum() < labels.size:
        return None
    return fit_policy(labels, frame["prob"].to_numpy() if member_probs is None else member_probs, config.decisions)


def evaluate_members(
    checkpoints: Sequence[str | Path],
    split: str,
    workdir: str | Path,
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    progress: bool = False,
    decisions: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate an ensemble on ``split``: the members' mean probability per case (paper 000), reported
    as ``evaluate_checkpoint`` reports one model. The members must share their data (they differ only
    in their seed), which ``average_members`` checks row by row. ``decisions`` is the ensemble's
    stored policy (a registered ensemble's); without it the policy is fitted on the members' val
    predictions here."""
    if not checkpoints:
        raise ValueError("evaluate_members: no member checkpoints given")
    first = predict_checkpoint(checkpoints[0], split, workdir, progress=progress)
    prepared = ensure_prepared(first.config, workdir, progress=False)

    def frames_on(part: str, first_frame: pd.DataFrame | None) -> list[pd.DataFrame]:
        rest = checkpoints[1:] if first_frame is not None else checkpoints
        frames = [
            predict_checkpoint(c, part, workdir, cache_dir=prepared.cache_dir, splits_path=prepared.splits).frame
            for c in rest
        ]
        return [first_frame, *frames] if first_frame is not None else frames

    config = first.config
    keys, member_probs = member_matrix(frames_on(split, first.frame))
    policy: DecisionPolicy | None
    if decisions is not None:
        policy, source = DecisionPolicy.from_dict(decisions), "registered model"
    else:
        val_keys, val_probs = (keys, member_probs) if split == "val" else member_matrix(frames_on("val", None))
        policy, source = _fit_on_val(val_keys, val_probs, config), NO_POLICY
        source = "fitted on val now" if policy is not None else source
    return report_predictions(
        keys.assign(prob=member_probs.mean(axis=1), prob_std=member_probs.std(axis=1), n_members=len(checkpoints)),
        config.model.view_mode,
        split,
        out_dir,
        n_boot=n_boot,
        task=config.data.task,
        history=None,
        unpaired=first.unpaired,
        member_probs=member_probs,
        policy=policy,
        policy_source=source,
        seed=config.train.seed,
    )


def report_predictions(
    frame: pd.DataFrame,
    view_mode: str,
    split: str,
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    task: str = "pathology",
    history: list[dict] | None = None,
    unpaired: int = 0,
    member_probs: Any = None,
    policy: DecisionPolicy | None = None,
    policy_source: str = "checkpoint",
    seed: int = 0,
    plots: bool = True,
) -> EvaluationResult:
    """Metrics and PNG plots of one prediction table (see ``evaluate_checkpoint``; ``plots`` False: no PNGs).

    The CIs resample patients when the frame has ``patient_id`` (``bootstrap_unit`` says which).
    With a ``policy``, the decision report (``decisions.report``) is added: ``member_probs`` are the
    (cases, members) probabilities of an ensemble, None for one network (its ``prob``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = evaluate_predictions(frame, n_boot=n_boot)
    flat = summarize_levels(levels, view_mode, prefix=f"{split}_", with_ci=n_boot > 0)
    primary = levels[PRIMARY_LEVEL[view_mode]]
    predictions = out_dir / f"predictions_{split}.csv"
    frame.to_csv(predictions, index=False)
    drawn: list[Path] = []
    if plots:
        drawn += [
            plot_rocs(
                {
                    f"per image (n={levels['image'].n})": (frame["label"], frame["prob"], levels["image"].auc_ci),
                    f"per exam (n={levels['exam'].n})": _exam_curve(frame, levels["exam"].auc_ci),
                },
                out_dir / f"roc_{split}.png",
                title=f"ROC, {split} split ({view_mode})",
            ),
            plot_confusion(
                primary,
                out_dir / f"confusion_{split}.png",
                CLASS_NAMES[Task.parse(task)],
                title=f"Confusion matrix, {split} split",
            ),
        ]
    if plots and history:
        drawn.append(
            plot_training_curves(
                history,
                out_dir / "training_curves.png",
                metrics=("train_loss", "val_loss", "val_auc", "val_acc", "train_acc"),
            )
        )
    decisions: dict[str, Any] | None = (
        {"skipped": policy_source} if policy is None and policy_source == NO_POLICY else None
    )
    if policy is not None:
        decisions = decision_report(
            frame,
            frame["prob"].to_numpy() if member_probs is None else member_probs,
            policy,
            out_dir,
            split=split,
            n_boot=n_boot,
            seed=seed,
            policy_source=policy_source,
            plots=plots,
        )
        flat.update(decisions["metrics"])
        drawn.extend(Path(p) for p in decisions["plots"])
        frame.assign(**_case_decisions(frame, member_probs, policy)).to_csv(predictions, index=False)
    result = EvaluationResult(
        split=split,
        view_mode=view_mode,
        n=int(len(frame)),
        unpaired=int(unpaired),
        bootstrap_unit="patient" if CLUSTER in frame.columns else "case",
        metrics=flat,
        image=levels["image"],
        exam=levels["exam"],
        predictions=str(predictions),
        plots=[str(p) for p in drawn],
        decisions=decisions,
        policy=policy,
    )
    (out_dir / f"metrics_{split}.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _case_decisions(frame: pd.DataFrame, member_probs: Any, policy: DecisionPolicy) -> dict[str, Any]:
    """Per case, what the served reply says: the calibrated probability, the uncertainty, the referral."""
    uncertainty = member_uncertainty(frame["prob"].to_numpy()[:, None] if member_probs is None else member_probs)
    refer = uncertainty.measure(policy.referral_measure) > policy.referral_cutoff
    return {
        "calibrated_prob": policy.calibration(uncertainty.mean),
        "uncertainty_entropy": uncertainty.entropy,
        "uncertainty_mutual_information": uncertainty.mutual_information,
        "refer": refer,
    }


def _exam_curve(frame: pd.DataFrame, ci: tuple[float, float]) -> tuple[Any, Any, tuple[float, float]]:
    exams = exam_level(frame)
    return exams["label"], exams["prob"], ci
