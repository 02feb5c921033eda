"""The search side of the CLI: ``mammo-ray tune`` (and, later, ``ensemble`` and ``baseline``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def _search_text(result: dict[str, Any]) -> str:
    from mammo_ray.cli import mlflow_ui_command

    lines = [result["leaderboard_text"].rstrip(), "",
             f"search folder   {result['experiment_dir']}  (resume: mammo-ray tune --resume {result['experiment_dir']})",
             f"parent run      {result['parent_run_id']}",
             f"trials          {result['trials']} in {result['cells']} cells, {result['errored']} errored "
             f"(table: {result['trials_csv']})",
             f"leaderboard     {result['leaderboard']}"]
    best = result.get("best")
    if best:
        params = ", ".join(f"{k}={v:.3g}" for k, v in best["params"].items())
        lines.append(f"best            {best['cell']} trial {best['trial_id']} ({params}): "
                     + ", ".join(f"{k} {v:.4g}" for k, v in best["metrics"].items()))
        lines.append(f"best config     {best['config_path']}")
    lines.append(f"MLflow UI       {mlflow_ui_command(result['tracking_uri'])}")
    return "\n".join(lines)


def cmd_tune(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.config import load_config
    from mammo_ray.ray_session import init_ray
    from mammo_ray.search.search import run_search

    if args.resume and (args.config or args.overrides):
        raise ValueError("--resume continues a search with its saved config: drop --config and --set")
    config = None if args.resume else load_config(args.config, args.overrides)
    init_ray(args.address)
    result = run_search(config, workdir, resume=args.resume, progress=not args.json)
    text = _search_text(result)
    result = {k: v for k, v in result.items() if k != "leaderboard_text"}
    return result, text


def add_commands(add: Callable[..., argparse.ArgumentParser], configurable: argparse.ArgumentParser) -> None:
    p = add("tune", cmd_tune, "Search dropout, learning rate and L2 with Ray Tune (Optuna TPE per cell, ASHA) over "
            "every backbone x view mode x augmentation of the config; each trial is a Ray Train run, tracked as a "
            "child MLflow run; ends with a leaderboard on the test split.", configurable)
    p.add_argument("--resume", metavar="EXPERIMENT_DIR",
                   help="continue an interrupted search (Tuner.restore); finished trials are not run again")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
