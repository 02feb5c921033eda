"""The training commands: ``train`` (one run, or K folds) and ``evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mammo_ray.cli.output import AddCommand, CommandResult, decisions_lines, mlflow_ui_command

if TYPE_CHECKING:
    from mammo_ray.train.run import FoldsOutcome, TrainOutcome


def train_text(outcome: TrainOutcome) -> str:
    """The summary of one training run: its MLflow run, checkpoint and validation metrics."""
    m = outcome.metrics
    nan = float("nan")
    lines = [
        f"MLflow run      {outcome.run_id} ({outcome.run_name})",
        f"tracking URI    {outcome.tracking_uri}",
        f"checkpoint      {outcome.checkpoint} (epoch {outcome.best_epoch}: "
        f"{outcome.selection or 'best by train.monitor'})",
        f"outputs         {outcome.output_dir}",
        f"validation      AUC {m['val_auc']:.3f} [{m.get('val_auc_ci_low', nan):.3f}, "
        f"{m.get('val_auc_ci_high', nan):.3f}]  accuracy {m['val_acc']:.3f}  "
        f"log loss {m['val_loss']:.3f}  recall {m['val_recall']:.3f}  "
        f"specificity {m['val_specificity']:.3f}",
        f"MLflow UI       {mlflow_ui_command(outcome.tracking_uri)}",
    ]
    return "\n".join(lines)


def folds_text(outcome: FoldsOutcome) -> str:
    """The summary of a cross-validation: mean and std of the main metrics over the folds."""
    lines = [
        f"MLflow run      {outcome.run_id} ({outcome.run_name})",
        f"tracking URI    {outcome.tracking_uri}",
        f"{outcome.folds}-fold cross-validation (mean ± std over folds):",
    ]
    if outcome.selection:
        lines.append(f"  checkpoint      {outcome.selection}")
    for key in ("val_auc", "val_acc", "val_loss", "val_recall", "val_specificity"):
        if key in outcome.summary:
            spread = outcome.summary[key]
            lines.append(f"  {key:<16}{spread.mean:.3f} ± {spread.std:.3f}")
    lines.append(f"MLflow UI       {mlflow_ui_command(outcome.tracking_uri)}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.cli.console import log_path, start_ray
    from mammo_ray.config import load_config
    from mammo_ray.train.run import run_folds, run_training

    config = load_config(args.config, args.overrides)
    start_ray(args.address, log_path(workdir, "folds" if args.folds else "train"))
    if args.folds:
        folds = run_folds(config, workdir, args.folds, progress=not args.json)
        return folds.to_dict(), folds_text(folds)
    outcome = run_training(config, workdir, progress=not args.json)
    return outcome.to_dict(), train_text(outcome)


def cmd_evaluate(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.ensemble.source import resolve_model_source
    from mammo_ray.train.evaluation import evaluate_checkpoint, evaluate_members

    spec = args.model or args.checkpoint or args.run
    source = resolve_model_source(spec, workdir, tracking_uri=args.tracking_uri)
    checkpoint, tag = str(source.checkpoints[0]), source.run_id
    name = (source.model_uri or "").removeprefix("models:/").replace("/", "-v") or tag or Path(checkpoint).parent.name
    out = Path(args.out) if args.out else workdir / "evaluations" / f"{name}-{args.split}"
    if len(source.checkpoints) == 1:
        evaluation = evaluate_checkpoint(
            checkpoint, args.split, workdir, out, n_boot=args.bootstrap, progress=not args.json
        )
    else:  # a registered ensemble: the members' mean probability (paper 000)
        evaluation = evaluate_members(
            source.checkpoints,
            args.split,
            workdir,
            out,
            n_boot=args.bootstrap,
            progress=not args.json,
            decisions=source.registered_decisions,
        )
        checkpoint = f"{source.model_uri} ({len(source.checkpoints)} members)"
    result = {
        "checkpoint": str(source.checkpoints[0]),
        "model": source.to_dict(),
        "run_id": tag,
        **evaluation.to_dict(),
    }
    m, image, exam = result["metrics"], result["image"], result["exam"]  # the printed numbers are the JSON's
    text = (
        f"{args.split} split, {evaluation.view_mode} view mode, checkpoint {checkpoint}\n"
        f"  per image (n={image['n']}): AUC {image['auc']:.3f}  accuracy {image['accuracy']:.3f}  "
        f"recall {image['recall']:.3f}  specificity {image['specificity']:.3f}\n"
        f"  per exam  (n={exam['n']}): AUC {exam['auc']:.3f}  accuracy {exam['accuracy']:.3f}  "
        f"recall {exam['recall']:.3f}  specificity {exam['specificity']:.3f}\n"
        + "".join(line + "\n" for line in decisions_lines(result))
        + f"  plots and predictions in {out}\n"
        + json.dumps(m, indent=2)
    )
    return result, text


def add_train_commands(add: AddCommand, configurable: argparse.ArgumentParser) -> None:
    p = add("train", cmd_train, "Train one model with Ray Train and track it in MLflow.", configurable)
    p.add_argument(
        "--folds",
        type=int,
        help="K-fold cross-validation by patient (paper 004: 5); folds run in "
        "parallel as Ray tasks under one parent MLflow run",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    p = add(
        "evaluate",
        cmd_evaluate,
        "Evaluate a trained model on a split: metrics (JSON) and plots. A registered ensemble is "
        "evaluated on its members' mean probability.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="a checkpoint (file or folder), an MLflow run id (runs:/<id>), or a registered ensemble "
        "(models:/<name>/<version> or models:/<name>@<alias>)",
    )
    source.add_argument("--run", help="MLflow run id of a `mammo-ray train` run (the same as --model RUN_ID)")
    source.add_argument("--checkpoint", help="a checkpoint.pt file or its folder (the same as --model PATH)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", help="folder for predictions, metrics and plots (default: under the workdir)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CI")
    p.add_argument("--tracking-uri", help="MLflow store of --model / --run (default: as `train` uses)")
