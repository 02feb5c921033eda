"""The search commands: ``tune`` and ``ensemble``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_ray.cli.console import log_path, start_ray
from mammo_ray.cli.output import AddCommand, CommandResult, decisions_lines, mlflow_ui_command

if TYPE_CHECKING:
    from mammo_ray.search.search import SearchSummary


def search_text(summary: SearchSummary) -> str:
    """The leaderboard, where everything went, and the best configuration of a search."""
    lines = [
        summary.leaderboard_text.rstrip(),
        "",
        f"search folder   {summary.experiment_dir}  (resume: mammo-ray tune --resume {summary.experiment_dir})",
        f"parent run      {summary.parent_run_id}",
        f"trials          {summary.trials} in {summary.cells} cells, {summary.errored} errored "
        f"(table: {summary.trials_csv})",
        f"leaderboard     {summary.leaderboard}",
    ]
    best = summary.best
    if best:
        params = ", ".join(f"{k}={v:.3g}" for k, v in best.params.items())
        lines.append(
            f"best            {best.cell} trial {best.trial_id} ({params}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in best.metrics.items())
        )
        if best.selection:
            lines.append(f"chosen by       {best.selection}")
        lines.append(f"best config     {best.config_path}")
    lines.append(f"MLflow UI       {mlflow_ui_command(summary.tracking_uri)}")
    return "\n".join(lines)


def ensemble_text(result: dict[str, Any]) -> str:
    """The ensemble against its members, and where it was registered."""

    def ci(pair: Any) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    alias = result.get("alias_uri") or result["model_uri"]
    alias = f" (now also {alias})" if alias != result["model_uri"] else ""
    lines = [
        f"ensemble of {result['members']} members ({len(result['members_failed'])} failed), {result['split']} split",
        f"  ensemble AUC     {result['ensemble_auc']:.3f} {ci(result['ensemble_auc_ci'])}",
        f"  mean member AUC  {result['mean_member_auc']:.3f} {ci(result['mean_member_auc_ci'])}",
        f"  gain             {result['diff']:+.3f} {ci(result['diff_ci'])} (paired bootstrap)",
        *decisions_lines(result),
        f"registered model   {result['model_uri']}{alias}",
        f"parent run         {result['parent_run_id']}",
        f"folder             {result['experiment_dir']}",
        f"plots              {', '.join(result['plots'])}",
        f"MLflow UI          {mlflow_ui_command(result['tracking_uri'])}",
    ]
    return "\n".join(lines)


def cmd_tune(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.config import load_config
    from mammo_ray.search.search import run_search

    if args.resume and (args.config or args.overrides):
        raise ValueError("--resume continues a search with its saved config: drop --config and --set")
    config = None if args.resume else load_config(args.config, args.overrides)
    start_ray(args.address, log_path(workdir, args.command))
    summary = run_search(config, workdir, resume=args.resume, progress=not args.json)
    return summary.to_dict(), search_text(summary)


def cmd_ensemble(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.config import load_config
    from mammo_ray.search.members import run_ensemble

    if args.resume and (args.config or args.overrides or args.from_search):
        raise ValueError("--resume continues an ensemble with its saved config: drop --config, --set, --from-search")
    config = None if args.resume else load_config(args.config, args.overrides)
    start_ray(args.address, log_path(workdir, args.command))
    result = run_ensemble(config, workdir, from_search=args.from_search, resume=args.resume, progress=not args.json)
    return result, ensemble_text(result)


def add_search_commands(add: AddCommand, configurable: argparse.ArgumentParser) -> None:
    p = add(
        "tune",
        cmd_tune,
        "Search dropout, learning rate and L2 with Ray Tune (Optuna TPE per cell, ASHA) over "
        "every backbone x view mode x augmentation of the config; each trial is a Ray Train run, tracked as a "
        "child MLflow run; ends with a leaderboard on the test split.",
        configurable,
    )
    p.add_argument(
        "--resume",
        metavar="EXPERIMENT_DIR",
        help="continue an interrupted search (Tuner.restore); finished trials are not run again. A folder or, "
        "with train.storage_path on object storage, its URI (s3://bucket/prefix/<search>)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    p = add(
        "ensemble",
        cmd_ensemble,
        "Train N members that differ only in seed as parallel Ray Tune trials, average "
        "their probabilities (and CC with MLO per exam), compare the ensemble with its members on the test split "
        "and register it in the MLflow model registry (paper 000).",
        configurable,
    )
    p.add_argument(
        "--from-search",
        metavar="PARENT_RUN_ID",
        help="take the members' config from this `mammo-ray tune` run's best configuration (the cell "
        "winner with the lowest exam-level validation loss, val_exam_loss); "
        "--config then supplies the ensemble section and the resources",
    )
    p.add_argument(
        "--resume",
        metavar="EXPERIMENT_DIR",
        help="continue an interrupted ensemble; finished members are not trained again (a folder, or its "
        "s3:// / gs:// URI)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
