"""``mammo-ray demo``: the main job end to end: the data, a search, an ensemble of its best config, a served request."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_ray.cli.console import log_path, start_ray
from mammo_ray.cli.output import AddCommand, CommandResult, mlflow_ui_command
from mammo_ray.cli.search import ensemble_text, search_text
from mammo_ray.cli.serve import APP_NAME, start_app
from mammo_ray.workdir import default_workdir

if TYPE_CHECKING:
    from mammo_ray.config import Config


def cmd_demo(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.config import load_config, save_config
    from mammo_ray.data.pipeline import ensure_prepared

    config = load_config(args.config, args.overrides)
    prepared = ensure_prepared(config, workdir, progress=not args.json).to_dict()
    save_config(config, workdir / "demo")
    result = {"workdir": str(workdir), "config": str(workdir / "demo" / "config.yaml"), **prepared}
    lines = [
        "mammo-ray demo",
        f"  {config.data.source + ' dataset':<18} {prepared['dataset_dir']}",
        f"  manifest           {prepared['manifest']} ({prepared['resolved']}/{prepared['rows']} rows resolved)",
        f"  index report       {prepared['index_report']}",
        f"  splits             {prepared['splits']}",
        f"  crop cache         {prepared['cache_dir']} ({prepared['entries']} crops)",
        f"  resolved config    {result['config']}",
    ]
    if not args.data_only:
        searched, text = demo_search_and_ensemble(args, config, workdir)
        result.update(searched)
        lines.append(text)
    return result, "\n".join(lines)


def demo_search_and_ensemble(args: argparse.Namespace, config: Config, workdir: Path) -> CommandResult:
    """``mammo-ray demo``'s Ray part: the search of ``config``, then an ensemble of its best config."""
    from mammo_ray.config import with_values
    from mammo_ray.search.members import run_ensemble
    from mammo_ray.search.search import run_search

    if args.members < 1:
        raise ValueError(f"--members {args.members}: need at least one member")
    logs = log_path(workdir, "demo")
    start_ray(args.address, logs)
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
    ensembled = run_ensemble(ensemble_config, workdir, from_search=searched.parent_run_id, progress=not args.json)
    text = "\n".join(
        [
            "",
            "search (mammo-ray tune):",
            search_text(searched),
            "",
            "ensemble of the best config (mammo-ray ensemble --from-search):",
            ensemble_text(ensembled),
        ]
    )
    example = demo_example(ensembled, workdir)
    result: dict[str, Any] = {"search": searched.to_dict(), "ensemble": ensembled, "example": example}
    if not args.no_serve:
        served, serve_text = demo_serve(ensembled, example, workdir, logs, progress=not args.json)
        result["serve"] = served
        text += "\n\n" + serve_text
    result["next_steps"] = next_steps(ensembled, example, workdir)
    text += "\n\nnext steps (the venv's commands: `source .venv/bin/activate` first, or the make targets):\n"
    text += "\n".join(f"  {what:<12} {command}" for what, command in result["next_steps"].items())
    return result, text


def demo_example(ensembled: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """A test-split lesion to ask the ensemble about, copied to ``<workdir>/demo/example.dcm`` with its
    ROI box (stored pixels) in ``example-box.txt``, so the printed and documented commands name stable files."""
    from mammo_ray.data.crops import mask_bbox
    from mammo_ray.data.dicom import read_dicom
    from mammo_ray.data.manifest import read_manifest
    from mammo_ray.data.splits import Splits
    from mammo_ray.search.trial import read_plan

    prepared = read_plan(ensembled["experiment_dir"]).cells["member"].prepared
    manifest = read_manifest(prepared.manifest)
    split = Splits.load(prepared.splits).assign(manifest)
    # a mask at its image's size gives the box as is
    usable = (manifest["roi_mask_path"] != "") & ~manifest["mask_resampled"] & ~manifest["mask_dropped"]
    row = manifest[(split == "test") & usable].iloc[0]
    box = mask_bbox(read_dicom(row["roi_mask_path"], flip=False)[0] > 0)
    if box is None:
        raise ValueError(f"{row['roi_mask_path']}: the ROI mask of test lesion {row['lesion_id']} is empty")
    folder = workdir / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "example.dcm"
    shutil.copyfile(row["image_path"], image)
    boxed = ",".join(map(str, box))
    (folder / "example-box.txt").write_text(boxed + "\n")
    return {"image": str(image), "box": boxed, "lesion": row["lesion_id"], "source": row["image_path"]}


def _shown(path: str | Path) -> str:
    """A path as a user types it: relative to the current directory when it lies under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_steps(ensembled: dict[str, Any], example: dict[str, Any], workdir: Path) -> dict[str, str]:
    """The exact commands to serve what the demo registered, ask it (or open its page), open the MLflow UI and
    load it in Python."""
    model = ensembled.get("alias_uri") or ensembled["model_uri"]
    default = default_workdir() == workdir
    with_workdir = "" if default else f" --workdir {shlex.quote(_shown(workdir))}"
    image = _shown(example["image"])
    box = "(" + ", ".join(example["box"].split(",")) + ")"
    load_args = repr(model) + ("" if default else f", workdir={_shown(workdir)!r}")
    python = f"import mammo_ray; m = mammo_ray.load({load_args}); print(m.predict({image!r}, box={box}))"
    return {
        "serve": f"mammo-ray serve --model {model}{with_workdir}" + ("   (or: make serve)" if default else ""),
        "ask": f"curl -F file=@{shlex.quote(image)} -F box={example['box']} http://127.0.0.1:8000/v1/predict",
        "page": "http://127.0.0.1:8000/   (while it serves: drop a CC and an MLO, see the heatmaps and members)",
        "MLflow UI": mlflow_ui_command(ensembled["tracking_uri"]) + ("   (or: make ui)" if default else ""),
        "Python": f'python -c "{python}"' if not set(python) & set('"$`\\!') else f"python -c {shlex.quote(python)}",
    }


def demo_serve(
    ensembled: dict[str, Any], example: dict[str, Any], workdir: Path, logs: Path, *, progress: bool
) -> CommandResult:
    """Serve the registered ensemble, send the example DICOM with curl, print the reply, stop."""
    from ray import serve

    from mammo_ray.ray_session import reserved_port
    from mammo_ray.serving.runtime import ServeSettings

    settings = ServeSettings(
        model=ensembled["model_uri"],
        tracking_uri=ensembled["tracking_uri"],
        workdir=str(workdir),
        num_cpus=1,
        max_batch_size=4,
    )
    if progress:
        print(f"starting the Serve app on {ensembled['model_uri']} ...", file=sys.stderr, flush=True)
    with reserved_port() as port:  # a free loopback port, held until Serve listens: 8000 may be taken here
        url = start_app(settings.model_dump(mode="json"), "127.0.0.1", port, logs=logs)
    command = ["curl", "-s", "-F", f"file=@{example['image']}", "-F", f"box={example['box']}", f"{url}/v1/predict"]
    # The whole film to /v1/localize: the method follows the model (CAM for a crop classifier).
    located = ["curl", "-s", "-F", f"file=@{example['image']}", "-F", "heatmap=none", f"{url}/v1/localize"]
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
        "lesion": example["lesion"],
        "curl_localize": shown_localize,
        "localize_reply": {k: v for k, v in localized.items() if k != "heatmap"},
    }, text


def add_demo_command(add: AddCommand, configurable: argparse.ArgumentParser) -> None:
    p = add(
        "demo",
        cmd_demo,
        "The main job: synthesize, index, split and prepare a dataset, then run a small "
        "search (Ray Tune + Optuna + ASHA, each trial a Ray Train run) and an ensemble of the best config, "
        "tracked in MLflow. Use a search config such as tune_configs/search_smoke.yaml.",
        configurable,
    )
    p.add_argument("--data-only", action="store_true", help="stop after preparing the data")
    p.add_argument("--members", type=int, default=4, help="ensemble members trained from the best config (default 4)")
    p.add_argument("--no-serve", action="store_true", help="skip serving the ensemble and the curl request at the end")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
