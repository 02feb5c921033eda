"""`mammo-ray`: one CLI, thin: parse, call the library, print a summary (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mammo_ray.constants import DISCLAIMER

EPILOG = DISCLAIMER


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 832x512") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"--size {text!r}: each side must be at least 64 px")
    return h, w


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3 or abs(sum(values) - 1) > 1e-6 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: need three non-negative numbers summing to 1")
    return values  # type: ignore[return-value]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workdir",
        help="work directory for outputs, caches and the MLflow store (default: $MAMMO_RAY_WORKDIR or ./work)",
    )
    common.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return common


def _configurable() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", help="YAML config (see tune_configs/); default: built-in defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set data.crop=fixed",
    )
    return parser


# ---------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.data.synthetic import csv_source, synthesize

    out = Path(args.out) if args.out else workdir / "datasets" / f"synthetic-p{args.patients}-s{args.seed}"
    summary = synthesize(
        out,
        patients=args.patients,
        seed=args.seed,
        size=args.size,
        layout=args.layout,
        from_csv=csv_source(args.from_csv) if args.from_csv else None,
        progress=not args.json,
    ).to_dict()
    (Path(summary["out_dir"]) / "synth.json").write_text(json.dumps(summary, indent=2))
    text = (
        f"synthetic CBIS-DDSM-shaped dataset ({summary['layout']} layout) in {summary['out_dir']}\n"
        f"  {summary['patients']} patients, {summary['images']} full-field images, "
        f"({summary['films']} films), {summary['abnormalities']} abnormality rows {summary['by_type']} "
        f"{summary['by_pathology']}\n"
        f"  case-description CSVs in {summary['csv_dir']}"
    )
    return summary, text


def cmd_index(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.data.cbis_ddsm import index_dataset
    from mammo_ray.data.manifest import write_manifest

    out = Path(args.out) if args.out else workdir / "index" / "manifest.parquet"
    csv_dir = args.csv or (None if args.generic else args.root)
    frame, report = index_dataset(
        root=args.root, csv_dir=csv_dir, generic_csv=args.generic, with_boxes=not args.no_boxes, progress=not args.json
    )
    write_manifest(frame, out)
    report_path = out.with_name(out.stem + ".report.json")
    report = {"manifest": str(out.resolve()), "report": str(report_path.resolve()), **report}
    report_path.write_text(json.dumps(report, indent=2, default=str))
    text = (
        f"manifest {report['manifest']}: {report['rows']} rows, {report['resolved']} resolved, "
        f"{len(report['unresolved'])} unresolved, {len(report['unreadable'])} unreadable files\n"
        f"  quirks handled: " + ", ".join(f"{k} {v}" for k, v in report["quirks"].items()) + "\n"
        f"  full report: {report['report']}"
    )
    for item in report["unresolved"][:5]:
        text += f"\n  unresolved {item.get('source_file', '')} row {item.get('source_row', '')}: {item['reason']}"
    return report, text


def cmd_split(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.data.manifest import read_manifest
    from mammo_ray.data.splits import make_splits, summarize

    manifest = read_manifest(args.manifest)
    splits = make_splits(
        manifest,
        fractions=args.fractions,
        seed=args.seed,
        balance_eval=args.balance_eval,
        mode=args.mode,
        folds=args.folds,
    )
    out = Path(args.out) if args.out else workdir / "splits" / "splits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    splits.save(out)
    counts = summarize(splits, manifest)
    result = {
        "splits": str(out.resolve()),
        "seed": args.seed,
        "mode": splits.mode,
        "overlap_patients_in_test": splits.overlap_patients_in_test,
        "counts": counts,
    }
    text = (
        f"patient-level splits ({splits.mode}) in {result['splits']} (seed {args.seed})\n"
        + (
            f"{splits.overlap_patients_in_test} patients in both official sets went to test\n"
            if splits.mode == "official"
            else ""
        )
        + json.dumps(counts, indent=2)
    )
    return result, text


def cmd_prepare(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.config import load_config, save_config
    from mammo_ray.data.cache import prepare_cache
    from mammo_ray.data.manifest import read_manifest
    from mammo_ray.data.splits import Splits

    overrides = list(args.overrides) + ([f"data.crop={args.crop}"] if args.crop else [])
    config = load_config(args.config, overrides)
    manifest = read_manifest(args.manifest)
    out = Path(args.out) if args.out else workdir / "cache" / config.data.crop
    summary = prepare_cache(
        manifest, Splits.load(args.splits).assign(manifest), config.data, out, progress=not args.json
    ).to_dict()
    save_config(config, out)
    text = (
        f"crop cache ({summary['crop']}) in {summary['cache_dir']}: {summary['entries']} crops from "
        f"{summary['images_decoded']} decoded images in {summary['seconds']:.1f}s "
        f"({summary['images_per_second']:.1f} images/s; {summary['shards_reused']} of "
        f"{summary['shards_total']} shards reused)\n  per split (malignant label: count): {summary['by_split']}\n"
        f"  skipped: {len(summary['skipped'])}; ROI masks resampled to their image: {summary['resampled_masks']}; "
        f"orientation from image content (no laterality header): {summary['orientation_from_content']}, "
        f"header and content disagree: {summary['orientation_disagreements']}"
    )
    return summary, text


def cmd_demo(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.config import load_config, save_config
    from mammo_ray.data.pipeline import ensure_prepared

    config = load_config(args.config, args.overrides)
    prepared = ensure_prepared(config, workdir, progress=not args.json).to_dict()
    save_config(config, workdir / "demo")
    result = {"workdir": str(workdir), "config": str(workdir / "demo" / "config.yaml"), **prepared}
    lines = [
        "mammo-ray demo",
        f"  synthetic dataset  {prepared['dataset_dir']}",
        f"  manifest           {prepared['manifest']} ({prepared['resolved']}/{prepared['rows']} rows resolved)",
        f"  index report       {prepared['index_report']}",
        f"  splits             {prepared['splits']}",
        f"  crop cache         {prepared['cache_dir']} ({prepared['entries']} crops)",
        f"  resolved config    {result['config']}",
    ]
    if not args.data_only:
        from mammo_ray.cli_search import demo_search_and_ensemble

        searched, text = demo_search_and_ensemble(args, config, workdir)
        result.update(searched)
        lines.append(text)
    return result, "\n".join(lines)


def _train_text(result: dict[str, Any]) -> str:
    m = result["metrics"]
    lines = [f"MLflow run      {result['run_id']} ({result['run_name']})", f"tracking URI    {result['tracking_uri']}"]
    if "checkpoint" in result:
        lines += [
            f"checkpoint      {result['checkpoint']} (epoch {result['best_epoch']}: "
            f"{result.get('selection') or 'best by train.monitor'})",
            f"outputs         {result['output_dir']}",
            f"validation      AUC {m['val_auc']:.3f} [{m.get('val_auc_ci_low', float('nan')):.3f}, "
            f"{m.get('val_auc_ci_high', float('nan')):.3f}]  accuracy {m['val_acc']:.3f}  "
            f"log loss {m['val_loss']:.3f}  recall {m['val_recall']:.3f}  "
            f"specificity {m['val_specificity']:.3f}",
        ]
    else:
        lines.append(f"{result['folds']}-fold cross-validation (mean ± std over folds):")
        if result.get("selection"):
            lines.append(f"  checkpoint      {result['selection']}")
        for key in ("val_auc", "val_acc", "val_loss", "val_recall", "val_specificity"):
            if key in result["summary"]:
                lines.append(f"  {key:<16}{result['summary'][key]['mean']:.3f} ± {result['summary'][key]['std']:.3f}")
    lines.append(f"MLflow UI       {mlflow_ui_command(result['tracking_uri'])}")
    return "\n".join(lines)


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"


def cmd_train(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.config import load_config
    from mammo_ray.ray_session import init_ray
    from mammo_ray.train.run import run_folds, run_training

    config = load_config(args.config, args.overrides)
    init_ray(args.address)
    if args.folds:
        result = run_folds(config, workdir, args.folds, progress=not args.json)
    else:
        result = run_training(config, workdir, progress=not args.json).to_dict()
    return result, _train_text(result)


def cmd_evaluate(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from mammo_ray.train.evaluation import evaluate_checkpoint

    checkpoint, tag = args.checkpoint, None
    if args.run:
        from mlflow import MlflowClient

        from mammo_ray.config import Config
        from mammo_ray.train.tracking import tracking_uri

        uri = args.tracking_uri or tracking_uri(Config(), workdir)
        try:
            run = MlflowClient(uri).get_run(args.run)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
            raise ValueError(f"--run {args.run}: no such run in {uri} ({exc})") from None
        checkpoint = run.data.tags.get("mammo_ray.checkpoint")
        if not checkpoint:
            raise ValueError(f"--run {args.run}: the run has no checkpoint (did it finish?)")
        tag = args.run
    out = (
        Path(args.out) if args.out else workdir / "evaluations" / f"{tag or Path(checkpoint).parent.name}-{args.split}"
    )
    result = evaluate_checkpoint(checkpoint, args.split, workdir, out, n_boot=args.bootstrap, progress=not args.json)
    result = {"checkpoint": str(checkpoint), "run_id": tag, **result}
    m, image, exam = result["metrics"], result["image"], result["exam"]
    text = (
        f"{args.split} split, {result['view_mode']} view mode, checkpoint {checkpoint}\n"
        f"  per image (n={image['n']}): AUC {image['auc']:.3f}  accuracy {image['accuracy']:.3f}  "
        f"recall {image['recall']:.3f}  specificity {image['specificity']:.3f}\n"
        f"  per exam  (n={exam['n']}): AUC {exam['auc']:.3f}  accuracy {exam['accuracy']:.3f}  "
        f"recall {exam['recall']:.3f}  specificity {exam['specificity']:.3f}\n"
        f"  plots and predictions in {out}\n" + json.dumps(m, indent=2)
    )
    return result, text


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammo-ray",
        description="Train, search, ensemble, track and serve mammogram lesion CNNs on Ray. " + DISCLAIMER,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, configurable = _common(), _configurable()

    def add(name: str, func: Callable, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=f"{help_text} {DISCLAIMER}", epilog=EPILOG, parents=[common, *parents]
        )
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "Write a synthetic CBIS-DDSM-shaped dataset (DICOMs + the four CSVs).")
    p.add_argument("--out", help="output folder (default: under the workdir)")
    p.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument(
        "--size",
        type=_parse_size,
        default=(832, 512),
        help="full-field image size HxW (default 832x512; full size is about 5000x3000)",
    )
    p.add_argument(
        "--layout",
        choices=["csv", "tcia"],
        default="csv",
        help="csv: files at the CSVs' own paths; tcia: the TCIA download layout",
    )
    p.add_argument(
        "--from-csv",
        help="draw images for the rows of real CBIS-DDSM CSVs in this folder; "
        "'cbis-ddsm' takes the real CSVs shipped with mammo-ray (all 3568 rows with "
        "--patients 1566): a replica with every structural quirk of the real data",
    )

    p = add("index", cmd_index, "Index CBIS-DDSM (or a generic manifest CSV) into one manifest.")
    p.add_argument("--root", help="folder holding the DICOM tree (either layout)")
    p.add_argument("--csv", help="folder holding the CBIS-DDSM case-description CSVs (default: --root)")
    p.add_argument("--generic", help="a generic manifest CSV (patient_id, image_path, side, view, label, ...)")
    p.add_argument("--out", help="manifest Parquet file (default: WORKDIR/index/manifest.parquet)")
    p.add_argument("--no-boxes", action="store_true", help="skip reading masks for ROI boxes (faster)")

    p = add("split", cmd_split, "Split a manifest by patient into train/val/test (and k folds).")
    p.add_argument("--manifest", required=True, help="manifest written by `mammo-ray index`")
    p.add_argument("--out", help="splits JSON file (default: WORKDIR/splits/splits.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=_parse_fractions, default=(0.8, 0.1, 0.1), help="train,val,test")
    p.add_argument("--balance-eval", action="store_true", help="class-balanced val and test (paper 001)")
    p.add_argument("--folds", type=int, help="also make K patient-level folds (paper 004)")
    p.add_argument(
        "--mode",
        choices=["patient", "official"],
        default="patient",
        help="patient: random by patient (default); official: the dataset's own test set "
        "(CBIS-DDSM's test CSVs; patients in both official sets go to test), val from its train",
    )

    p = add("prepare", cmd_prepare, "Decode once and cache lesion crops for training.", configurable)
    p.add_argument("--manifest", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument(
        "--crop",
        choices=["seed750", "fixed", "proportional", "patch", "whole"],
        help="crop mode (default: the config's data.crop)",
    )
    p.add_argument("--out", help="cache folder (default: WORKDIR/cache/<crop>)")

    p = add("train", cmd_train, "Train one model with Ray Train and track it in MLflow.", configurable)
    p.add_argument(
        "--folds",
        type=int,
        help="K-fold cross-validation by patient (paper 004: 5); folds run in "
        "parallel as Ray tasks under one parent MLflow run",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    p = add("evaluate", cmd_evaluate, "Evaluate a trained model on a split: metrics (JSON) and plots.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id of a `mammo-ray train` run")
    source.add_argument("--checkpoint", help="a checkpoint.pt file (or its folder)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", help="folder for predictions, metrics and plots (default: under the workdir)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CI")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --run (default: as `train` uses)")

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

    from mammo_ray.cli_search import add_commands

    add_commands(add, configurable)
    from mammo_ray.cli_localize import add_localize_commands

    add_localize_commands(add)
    from mammo_ray.cli_serve import add_serve_command

    add_serve_command(add)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from mammo_ray.config import ConfigError
    from mammo_ray.data.cache import CacheError
    from mammo_ray.data.dicom import DicomReadError
    from mammo_ray.data.manifest import ManifestError
    from mammo_ray.data.splits import SplitLeakError
    from mammo_ray.models import PretrainedWeightsError
    from mammo_ray.train.checkpoint import CheckpointError

    return (
        ConfigError,
        CacheError,
        DicomReadError,
        ManifestError,
        SplitLeakError,
        PretrainedWeightsError,
        CheckpointError,
        FileNotFoundError,
        ValueError,
    )


def _reserve_stdout() -> int:
    """Point fd 1 at stderr while a command runs and return a handle on the real stdout.

    With ``--json`` stdout must carry exactly one JSON object, but Ray (raylet warnings, worker
    logs) and native libraries write to fd 1 directly; they land on stderr instead.
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    return real


class _JsonOutput:
    """While a ``--json`` command runs, everything printed goes to stderr, at the Python and fd level."""

    def __enter__(self) -> _JsonOutput:
        self.stdout = sys.stdout
        self.fd = _reserve_stdout()
        sys.stdout = sys.stderr
        return self

    def emit(self, obj: dict[str, Any]) -> None:
        sys.stderr.flush()
        os.dup2(self.fd, 1)
        sys.stdout = self.stdout
        print(json.dumps(obj, default=str), flush=True)

    def __exit__(self, *exc: object) -> None:
        if sys.stdout is not self.stdout:  # not emitted (an unexpected exception): restore anyway
            os.dup2(self.fd, 1)
            sys.stdout = self.stdout
        os.close(self.fd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mammo_ray.workdir import resolve_workdir

    if not args.json:
        try:
            _, text = args.func(args, resolve_workdir(args.workdir))
        except _known_errors() as exc:
            print(f"mammo-ray {args.command}: error: {exc}", file=sys.stderr)
            return 2
        print(text)
        print(DISCLAIMER)
        return 0
    with _JsonOutput() as output:
        try:
            result, _ = args.func(args, resolve_workdir(args.workdir))
        except _known_errors() as exc:
            print(f"mammo-ray {args.command}: error: {exc}", file=sys.stderr)
            output.emit({"error": str(exc), "command": args.command})
            return 2
        output.emit({**result, "disclaimer": DISCLAIMER})
    return 0


if __name__ == "__main__":
    sys.exit(main())
