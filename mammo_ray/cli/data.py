"""The data commands: ``synth``, ``index``, ``split`` and ``prepare``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mammo_ray.cli.output import AddCommand, CommandResult

CROP_MODES = ["seed750", "fixed", "proportional", "patch", "whole"]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 832x512") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"--size {text!r}: each side must be at least 64 px")
    return h, w


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3 or abs(sum(values) - 1) > 1e-6 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: need three non-negative numbers summing to 1")
    return values[0], values[1], values[2]


def cmd_synth(args: argparse.Namespace, workdir: Path) -> CommandResult:
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
        workers=args.workers,
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


def cmd_index(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.data.index import index_dataset
    from mammo_ray.data.manifest import write_manifest

    out = Path(args.out) if args.out else workdir / "index" / "manifest.parquet"
    csv_dir = args.csv or (None if args.generic else args.root)
    pseudo = None
    if args.anonymize:  # checked before indexing: a key inside the workdir is refused at once
        from mammo_ray.data.anonymize import default_private_dir, open_private_dir

        private = Path(args.anonymize_dir) if args.anonymize_dir else default_private_dir()
        pseudo = open_private_dir(private, workdir, out.parent)
    frame, indexed = index_dataset(
        root=args.root,
        csv_dir=csv_dir,
        generic_csv=args.generic,
        with_boxes=not args.no_boxes,
        progress=not args.json,
        workers=args.workers,
    )
    report_path = out.with_name(out.stem + ".report.json")
    report = {"manifest": str(out.resolve()), "report": str(report_path.resolve()), **indexed.to_dict()}
    if pseudo is not None:
        from mammo_ray.data.anonymize import anonymize_manifest

        frame, report = anonymize_manifest(frame, pseudo, report)
    write_manifest(frame, out)
    report_path.write_text(json.dumps(report, indent=2, default=str))
    text = (
        f"manifest {report['manifest']}: {indexed.rows} rows, {indexed.resolved} resolved, "
        f"{len(indexed.unresolved)} unresolved, {len(indexed.unreadable)} unreadable files\n"
        f"  quirks handled: " + ", ".join(f"{k} {v}" for k, v in indexed.quirks.items()) + "\n"
        f"  full report: {report['report']}"
    )
    if pseudo is not None:
        text += (
            f"\n  anonymised: {report['anonymized']['patients']} patient IDs replaced by keyed pseudonyms, "
            f"image paths by links in {report['anonymized']['links']} (keep that folder private)"
        )
    for item in report["unresolved"][:5]:
        text += f"\n  unresolved {item.get('source_file', '')} row {item.get('source_row', '')}: {item['reason']}"
    return report, text


def cmd_split(args: argparse.Namespace, workdir: Path) -> CommandResult:
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


def cmd_prepare(args: argparse.Namespace, workdir: Path) -> CommandResult:
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


def add_data_commands(add: AddCommand, configurable: argparse.ArgumentParser) -> None:
    p = add("synth", cmd_synth, "Write a synthetic CBIS-DDSM-shaped dataset (DICOMs + the four CSVs).")
    p.add_argument("--out", help="output folder (default: under the workdir)")
    p.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument(
        "--size",
        type=parse_size,
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
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes drawing patients at once (default: one per CPU); the files do not depend on it",
    )

    p = add("index", cmd_index, "Index CBIS-DDSM (or a generic manifest CSV) into one manifest.")
    p.add_argument("--root", help="folder holding the DICOM tree (either layout)")
    p.add_argument("--csv", help="folder holding the CBIS-DDSM case-description CSVs (default: --root)")
    p.add_argument("--generic", help="a generic manifest CSV (patient_id, image_path, side, view, label, ...)")
    p.add_argument("--out", help="manifest Parquet file (default: WORKDIR/index/manifest.parquet)")
    p.add_argument("--no-boxes", action="store_true", help="skip reading masks for ROI boxes (faster)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes reading DICOM headers and masks (default: one per CPU); the manifest does not depend on it",
    )
    p.add_argument(
        "--anonymize",
        action="store_true",
        help="replace patient IDs by keyed pseudonyms (HMAC-SHA256) and image paths by links named by a keyed "
        "hash, so that the manifest, crop caches and MLflow runs carry no patient identifier",
    )
    p.add_argument(
        "--anonymize-dir",
        help="private folder outside the workdir for the key and the links (made on first use; "
        "default: $MAMMO_RAY_PRIVATE_DIR, else ~/.mammo-ray/private)",
    )

    p = add("split", cmd_split, "Split a manifest by patient into train/val/test (and k folds).")
    p.add_argument("--manifest", required=True, help="manifest written by `mammo-ray index`")
    p.add_argument("--out", help="splits JSON file (default: WORKDIR/splits/splits.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=parse_fractions, default=(0.8, 0.1, 0.1), help="train,val,test")
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
    p.add_argument("--crop", choices=CROP_MODES, help="crop mode (default: the config's data.crop)")
    p.add_argument("--out", help="cache folder (default: WORKDIR/cache/<crop>)")
