"""The search side of the CLI: ``mammo-ray tune`` and ``mammo-ray ensemble``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _search_text(result: dict[str, Any]) -> str:
    from mammo_ray.cli import mlflow_ui_command

    lines = [
        result["leaderboard_text"].rstrip(),
        "",
        f"search folder   {result['experiment_dir']}  (resume: mammo-ray tune --resume {result['experiment_dir']})",
        f"parent run      {result['parent_run_id']}",
        f"trials          {result['trials']} in {result['cells']} cells, {result['errored']} errored "
        f"(table: {result['trials_csv']})",
        f"leaderboard     {result['leaderboard']}",
    ]
    best = result.get("best")
    if best:
        params = ", ".join(f"{k}={v:.3g}" for k, v in best["params"].items())
        lines.append(
            f"best            {best['cell']} trial {best['trial_id']} ({params}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in best["metrics"].items())
        )
        if best.get("selection"):
            lines.append(f"chosen by       {best['selection']}")
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
        help="continue an interrupted search (Tuner.restore); finished trials are not run again",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    add_ensemble_command(add, configurable)


def _ensemble_text(result: dict[str, Any]) -> str:
    from mammo_ray.cli import mlflow_ui_command

    def ci(pair: Any) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [
        f"ensemble of {result['members']} members ({len(result['members_failed'])} failed), {result['split']} split",
        f"  ensemble AUC     {result['ensemble_auc']:.3f} {ci(result['ensemble_auc_ci'])}",
        f"  mean member AUC  {result['mean_member_auc']:.3f} {ci(result['mean_member_auc_ci'])}",
        f"  gain             {result['diff']:+.3f} {ci(result['diff_ci'])} (paired bootstrap)",
        f"registered model   {result['model_uri']}",
        f"parent run         {result['parent_run_id']}",
        f"folder             {result['experiment_dir']}",
        f"plots              {', '.join(result['plots'])}",
        f"MLflow UI          {mlflow_ui_command(result['tracking_uri'])}",
    ]
    return "\n".join(lines)


def cmd_ensemble(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.config import load_config
    from mammo_ray.ray_session import init_ray
    from mammo_ray.search.members import run_ensemble

    if args.resume and (args.config or args.overrides or args.from_search):
        raise ValueError("--resume continues an ensemble with its saved config: drop --config, --set, --from-search")
    config = None if args.resume else load_config(args.config, args.overrides)
    init_ray(args.address)
    result = run_ensemble(config, workdir, from_search=args.from_search, resume=args.resume, progress=not args.json)
    return result, _ensemble_text(result)


def add_ensemble_command(add: Callable[..., argparse.ArgumentParser], configurable: argparse.ArgumentParser) -> None:
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
        help="continue an interrupted ensemble; finished members are not trained again",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def demo_search_and_ensemble(args: argparse.Namespace, config: Any, workdir: Path) -> tuple[dict[str, Any], str]:
    """``mammo-ray demo``'s Ray part: the search of ``config``, then an ensemble of its best config."""
    from mammo_ray.config import with_values
    from mammo_ray.ray_session import init_ray
    from mammo_ray.search.members import run_ensemble
    from mammo_ray.search.search import run_search

    if args.members < 1:
        raise ValueError(f"--members {args.members}: need at least one member")
    init_ray(args.address)
    searched = run_search(config, workdir, progress=not args.json)
    ensemble_config = with_values(
        config,
        {
            "ensemble.members": args.members,
            "ensemble.max_concurrent_trials": config.tune.max_concurrent_trials,
            "ensemble.registered_model": "mammo-ray-demo-ensemble",
        },
        "demo ensemble",
    )
    ensembled = run_ensemble(ensemble_config, workdir, from_search=searched["parent_run_id"], progress=not args.json)
    text = "\n".join(
        [
            "",
            "search (mammo-ray tune):",
            _search_text(searched),
            "",
            "ensemble of the best config (mammo-ray ensemble --from-search):",
            _ensemble_text(ensembled),
        ]
    )
    searched = {k: v for k, v in searched.items() if k != "leaderboard_text"}
    result = {"search": searched, "ensemble": ensembled}
    if not args.no_serve:
        served, serve_text = demo_serve(ensembled, workdir, progress=not args.json)
        result["serve"] = served
        text += "\n\n" + serve_text
    return result, text


def demo_serve(ensembled: dict[str, Any], workdir: Path, *, progress: bool) -> tuple[dict[str, Any], str]:
    """Serve the registered ensemble, send one synthetic test DICOM with curl, print the reply, stop."""
    import json
    import shlex
    import socket
    import subprocess
    import sys

    from ray import serve

    from mammo_ray.cli_serve import APP_NAME, start_app
    from mammo_ray.data.crops import mask_bbox
    from mammo_ray.data.dicom import read_dicom
    from mammo_ray.data.manifest import read_manifest
    from mammo_ray.search.trial import read_plan
    from mammo_ray.serving.runtime import ServeSettings

    plan = read_plan(ensembled["experiment_dir"])
    prepared = plan.cells["member"]["prepared"]
    manifest = read_manifest(prepared["manifest"])
    from mammo_ray.data.splits import Splits

    split = Splits.load(prepared["splits"]).assign(manifest)
    # a mask at its image's size gives the box as is
    usable = (manifest["roi_mask_path"] != "") & ~manifest["mask_resampled"] & ~manifest["mask_dropped"]
    row = manifest[(split == "test") & usable].iloc[0]
    box = ",".join(map(str, mask_bbox(read_dicom(row["roi_mask_path"], flip=False)[0] > 0)))
    with socket.socket() as sock:  # a free loopback port: 8000 may be taken on a shared machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServeSettings(
        model=ensembled["model_uri"],
        tracking_uri=ensembled["tracking_uri"],
        workdir=str(workdir),
        num_cpus=1,
        max_batch_size=4,
    )
    if progress:
        print(f"starting the Serve app on {ensembled['model_uri']} ...", file=sys.stderr, flush=True)
    url = start_app(settings.model_dump(mode="json"), "127.0.0.1", port)
    command = ["curl", "-s", "-F", f"file=@{row['image_path']}", "-F", f"box={box}", f"{url}/v1/predict"]
    # The whole film to /v1/localize: the method follows the model (CAM for a crop classifier).
    located = ["curl", "-s", "-F", f"file=@{row['image_path']}", "-F", "heatmap=none", f"{url}/v1/localize"]
    try:
        reply = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
        where = subprocess.run(located, capture_output=True, text=True, timeout=300, check=True).stdout
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    answer, localized = json.loads(reply), json.loads(where)
    shown, shown_localize = (" ".join(shlex.quote(c) for c in cmd) for cmd in (command, located))
    boxes = localized.get("boxes", [])
    text = "\n".join(
        [
            f"served {ensembled['model_uri']} at {url} (mammo-ray serve), asked with curl:",
            f"  {shown}",
            f"  -> {json.dumps(answer)}",
            f"  {shown_localize}",
            f"  -> method {localized.get('method')}, image score {localized.get('image_score')}, "
            f"{len(boxes)} box(es){': top ' + json.dumps(boxes[0]) if boxes else ''}"
            + (f" ({localized['detail']})" if "detail" in localized else ""),
            "service stopped",
        ]
    )
    return {
        "url": url,
        "curl": shown,
        "reply": answer,
        "lesion": row["lesion_id"],
        "curl_localize": shown_localize,
        "localize_reply": {k: v for k, v in localized.items() if k != "heatmap"},
    }, text
