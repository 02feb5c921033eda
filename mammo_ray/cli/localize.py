"""The localisation and explanation side of the CLI: ``localize``, ``froc``, ``explain``, ``dream``.

Each takes ``--model`` as a checkpoint, a run id, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
(``ensemble.source``); an ensemble's maps are averaged over its members. ``localize``, ``explain`` and
``dream`` load the model as ``mammo_ray.load`` does (``serving.predictor.Predictor``, the Serve
replica's ``ModelRuntime``), so an image is decoded, cropped and transformed, and a map computed,
by the same code as ``POST /v1/predict`` and ``/v1/localize``. When the model comes from an MLflow
run (or a registered version, whose run is the ensemble's), every file written is also logged to
that run under ``<command>/<name>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_ray.cli.output import AddCommand, CommandResult

if TYPE_CHECKING:
    from mammo_ray.ensemble.model import Ensemble
    from mammo_ray.ensemble.source import ModelSource
    from mammo_ray.serving.predictor import Predictor


def _members(args: argparse.Namespace, workdir: Path) -> tuple[ModelSource, Ensemble]:
    from mammo_ray.ensemble.model import Ensemble
    from mammo_ray.ensemble.source import resolve_model_source

    source = resolve_model_source(args.model, workdir, tracking_uri=args.tracking_uri)
    return source, Ensemble.from_checkpoints(source.checkpoints)


def _predictor(args: argparse.Namespace, workdir: Path, **settings: Any) -> Predictor:
    """``--model`` loaded as ``mammo_ray.load`` loads it (one request at a time: batches of one)."""
    from mammo_ray.serving.predictor import Predictor

    with _options():
        return Predictor.load(args.model, tracking_uri=args.tracking_uri, workdir=workdir, max_batch_size=1, **settings)


@contextlib.contextmanager
def _options(**names: str) -> Iterator[None]:
    """The predictor's argument errors in the CLI's words: ``UploadError`` fields ("image", "box",
    "method") become the options that carry them (``names`` maps a field to another option)."""
    from pydantic import ValidationError

    from mammo_ray.serving.uploads import UploadError

    try:
        yield
    except UploadError as exc:
        option = names.get(exc.field or "", f"--{(exc.field or 'image').replace('_', '-')}")
        raise ValueError(f"{option}: {exc.reason}") from None
    except ValidationError as exc:  # a setting out of range (--threshold 2, --tile -1)
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ValueError(f"{field}: {first['msg']} (got {first.get('input')!r})") from None


def _log_outputs(source: ModelSource, out: Path, artifact_path: str) -> str | None:
    """Log ``out`` to the model's MLflow run; returns the run id, or None for a bare checkpoint."""
    if not source.run_id:
        return None
    from mlflow import MlflowClient

    MlflowClient(source.tracking_uri).log_artifacts(source.run_id, str(out), artifact_path)
    return source.run_id


def _parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        x0, y0, x1, y1 = (int(float(v)) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box {text!r}: expected x0,y0,x1,y1 in image pixels") from None
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"--box {text!r}: x1 > x0 and y1 > y0 required")
    return x0, y0, x1, y1


def _check_dicom_input(image: str) -> None:
    """``--dicom-out`` references the source image's UIDs: a PNG, TIFF or JPEG has none to reference."""
    from mammo_ray.data.images import sniff

    try:
        with open(image, "rb") as f:
            kind = sniff(f.read(132))
    except OSError:
        return  # a missing or unreadable --image: the predictor names it
    if kind not in ("dicom", None):  # None: maybe a DICOM without preamble, read as such
        raise ValueError(
            f"--dicom-out: DICOM output needs a DICOM input; {image} is a {kind.upper()} image "
            "(drop --dicom-out, or localize the DICOM file it came from)"
        )


def cmd_localize(args: argparse.Namespace, workdir: Path) -> CommandResult:
    import numpy as np

    from mammo_ray.localize.methods import map_label
    from mammo_ray.localize.render import save_overlay

    if args.dicom_out:
        _check_dicom_input(args.image)
    model = _predictor(args, workdir, localize_tile=args.tile, localize_long_side=args.long_side)
    source, config, members = model.runtime.source, model.runtime.config, len(model.runtime.members)
    with _options():
        found, decoded = model.locate(args.image, args.method, threshold=args.threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    label = map_label(found.method, config)
    stored = np.fliplr(decoded.image) if decoded.flipped else decoded.image
    heat = found.heatmap()  # the map at the file's size, in its stored orientation
    overlay = save_overlay(
        stored,
        heat,
        found.boxes,
        out / f"{stem}_heatmap.png",
        label=label,
        title=f"{Path(args.image).name}: {label} ({found.method}, {members} member(s))",
    )
    np.save(out / f"{stem}_map.npy", found.dense.probs)
    spread = None
    if members > 1:  # the member-spread map: where the members disagree
        spread = save_overlay(
            stored,
            found.heatmap(spread=True),
            [],
            out / f"{stem}_member_spread.png",
            label=f"member std of the {label}",
            title=f"{Path(args.image).name}: member std of the {label}",
        )
    result = {
        "image": str(args.image),
        "model": source.to_dict(),
        "model_version": model.runtime.version,
        **found.to_dict(),
        "overlay": str(overlay),
        "spread_overlay": str(spread) if spread else None,
        "map": str(out / f"{stem}_map.npy"),
        "boxes_json": str(out / f"{stem}_boxes.json"),
    }
    Path(result["boxes_json"]).write_text(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "image",
                    "method",
                    "map_values",
                    "boxes",
                    "image_score",
                    "image_score_means",
                    "threshold",
                    "image_size",
                )
            },
            indent=2,
        )
    )
    result["dicom"] = None
    if args.dicom_out:  # the boxes (SR) and map (SEG) as DICOM, on the file's own pixel grid
        from mammo_ray.localize.dicom_out import write_dicom_outputs

        result["dicom"] = write_dicom_outputs(
            args.image,
            heat,
            found.boxes,
            Path(args.dicom_out),
            label=label,
            method=found.method,
            image_score=found.image_score,
        )
    result["mlflow_run"] = _log_outputs(source, out, f"localize/{stem}")
    lines = [
        f"{found.method}: {len(found.boxes)} box(es) at threshold {args.threshold} "
        f"(image score {found.image_score:.3f}: {result['image_score_means']}):"
    ]
    lines += [f"  ({b.x0}, {b.y0}, {b.x1}, {b.y1}) score {b.score:.3f}" for b in found.boxes]
    lines += [f"overlay {overlay}", f"boxes   {result['boxes_json']}"]
    if result["dicom"]:
        lines += [f"sr      {result['dicom']['sr']}", f"seg     {result['dicom']['seg']}"]
    return result, "\n".join(lines)


def cmd_froc(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.data.manifest import read_manifest
    from mammo_ray.data.splits import Splits
    from mammo_ray.localize.evaluate import evaluate_split, scan_split, split_images
    from mammo_ray.localize.whole_image import localize_image

    source, ensemble = _members(args, workdir)
    manifest = read_manifest(args.manifest)
    rows = split_images(manifest, Splits.load(args.splits).assign(manifest), args.split)

    def localizer(members: Ensemble) -> Callable[[Any, bool], Any]:
        return lambda image, flipped: localize_image(
            list(members.members),
            members.spec,
            members.config,
            image,
            threshold=args.box_threshold,
            tile=args.tile or None,
        )

    stage1 = None
    if args.classifier:
        from mammo_ray.ensemble.model import Ensemble
        from mammo_ray.ensemble.source import resolve_model_source

        stage1 = localizer(
            Ensemble.from_checkpoints(
                resolve_model_source(args.classifier, workdir, tracking_uri=args.tracking_uri).checkpoints
            )
        )
    scan = scan_split(rows, localizer(ensemble), stage1, progress=not args.json)
    out = Path(args.out)
    summary = evaluate_split(
        scan,
        out,
        reduce=args.reduce,
        image_threshold=args.image_threshold,
        box_threshold=args.box_threshold,
        seed=args.seed,
        label=f"{ensemble.config.model.name} x{len(ensemble.members)} ({source.kind})",
    )
    result = {"model": source.to_dict(), "split": args.split, **summary}
    result["mlflow_run"] = _log_outputs(source, out, f"froc/{args.split}")
    s, r, two = summary["sensitivity_at_1fp"], summary["random_sensitivity_at_1fp"], summary["two_stage"]
    text = "\n".join(
        [
            f"FROC on {summary['n_images']} {args.split} images ({summary['n_rois']} mass ROIs, one per lesion; "
            f"{len(scan.skipped)} image(s) unreadable; {summary['shared_films']} film(s) stored twice, scanned once)",
            f"  sensitivity at 1 FP/image: {s['overlap']:.3f} (random heatmap {r['overlap']:.3f}); peak rule "
            f"{s['peak']:.3f} (random {r['peak']:.3f})",
            f"  image mass/no-mass AUC from the map maximum: {summary['image_auc']}",
            f"  two-stage at image threshold {two['image_threshold']}, box threshold {two['box_threshold']}: "
            f"stage-1 accuracy {two['stage1_accuracy']:.3f}, sensitivity {two['sensitivity']}, "
            f"{two['fp_per_image']:.2f} FP/image",
            f"  curves {', '.join(summary['plots'])}",
            f"  json   {summary['json']}",
        ]
    )
    return result, text


def cmd_explain(args: argparse.Namespace, workdir: Path) -> CommandResult:
    import numpy as np
    import torch

    from mammo_ray.explain.filters import save_filter_grid
    from mammo_ray.explain.saliency import saliency_map, save_saliency_png

    model = _predictor(args, workdir)
    runtime = model.runtime
    if runtime.view_mode == "multimodal":
        raise ValueError("explain takes one view; use `mammo-ray dream --image CC --image2 MLO` for a multimodal model")
    box = _parse_box(args.box)
    with _options():
        x = model.tensor(args.image, box=box).to(runtime.device)
        predicted = model.predict(args.image, box=box)  # the served reply for the same input
    maps = torch.stack([saliency_map(m, x, target_class=args.target_class)[0].cpu() for m in runtime.members])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    mean = maps.mean(0)
    np.save(out / f"{stem}_saliency.npy", mean.numpy())
    written = [
        save_saliency_png(
            x[0, 0].cpu(),
            mean,
            out / f"{stem}_saliency.png",
            title=f"saliency of class {args.target_class}, {len(maps)} member(s)",
        )
    ]
    for i, member in enumerate(runtime.members[: args.max_filter_grids]):
        written.append(save_filter_grid(member, out / f"filters_member_{i:03d}.png"))
    result = {
        "image": str(args.image),
        "model": runtime.source.to_dict(),
        "model_version": runtime.version,
        "probability": predicted["probability"],
        "label": predicted["label"],
        "members": predicted["members"],
        "files": [str(p) for p in written],
        "saliency": str(out / f"{stem}_saliency.npy"),
    }
    result["mlflow_run"] = _log_outputs(runtime.source, out, f"explain/{stem}")
    positive = runtime.class_names[1]
    return result, f"P({positive}) {result['probability']:.3f}\n" + "\n".join(f"wrote {p}" for p in written)


def cmd_dream(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.explain.dream import DreamConfig, directed_dream
    from mammo_ray.explain.dream_render import save_dream_frame, save_dream_gif

    model = _predictor(args, workdir)
    runtime = model.runtime
    with _options():
        views = [model.tensor(args.image, box=_parse_box(args.box)).to(runtime.device)]
    if args.image2:
        with _options(image="--image2", box="--box2"):
            views.append(model.tensor(args.image2, box=_parse_box(args.box2)).to(runtime.device))
    if runtime.view_mode == "multimodal" and len(views) != 2:
        raise ValueError("a multimodal model dreams on a CC and MLO pair: give --image2")
    config = DreamConfig(target=args.target, steps=args.steps, lr=args.lr, seed=args.seed)
    member = runtime.members[0]  # one network: the dream follows its gradient
    result = directed_dream(member, views[0] if len(views) == 1 else (views[0], views[1]), config)
    gif = save_dream_gif(result, args.out)
    last = save_dream_frame(result, Path(args.out).with_suffix(".png"))
    scores = result.scores[:, 0].tolist()
    source = runtime.source
    summary = {
        "gif": str(gif),
        "last_frame": str(last),
        "target": args.target,
        "steps": args.steps,
        "views": list(result.view_names),
        "scores": scores,
        "model": source.to_dict(),
        "model_version": runtime.version,
        "member": 0,
    }
    summary["mlflow_run"] = None
    if source.run_id:
        from mlflow import MlflowClient

        client = MlflowClient(source.tracking_uri)
        for path in (gif, last):
            client.log_artifact(source.run_id, str(path), f"dream/{Path(args.image).stem}")
        summary["mlflow_run"] = source.run_id
    text = (
        f"Directed Dream towards {args.target}: P({args.target}) {scores[0]:.3f} -> {scores[-1]:.3f} "
        f"in {args.steps} steps\n  gif {gif}\n  last frame {last}"
    )
    return summary, text


def add_localize_commands(add: AddCommand) -> None:
    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="a checkpoint (file or folder), an MLflow run id "
            "(runs:/<id>), or a registered ensemble (models:/<name>/<version> or models:/<name>@<alias>)",
        )
        p.add_argument("--tracking-uri", help="MLflow store of --model (default: as `train` uses)")

    p = add(
        "localize",
        cmd_localize,
        "Map a whole mammogram, averaged over ensemble members, as a heatmap "
        "overlay PNG and boxes JSON in original pixel coordinates: a patch classifier made fully "
        "convolutional (dense, paper 003), or the class activation map of a crop classifier (cam / "
        "gradcam, paper 004).",
    )
    model_args(p)
    p.add_argument("--image", required=True, help="a whole mammogram: DICOM, or PNG/TIFF")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--method",
        choices=["dense", "cam", "gradcam"],
        help="dense: fully convolutional map of a patch classifier (data.crop=patch/seed750); cam: "
        "class activation map (GAP+FC backbones: ResNet, GoogLeNet, Inception-v3); gradcam: any "
        "backbone. Default: dense for patch classifiers, else cam where defined, else gradcam",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="map value a box must reach (default 0.5; for cam/gradcam a fraction of the image's own activation range)",
    )
    p.add_argument("--tile", type=int, default=1024, help="dense: tile side in px for bounded memory; 0: one pass")
    p.add_argument(
        "--long-side",
        type=int,
        help="cam/gradcam: the image's long side in network px (default: "
        "the training crops' scale where fixed, else 4 x data.input_px)",
    )
    p.add_argument(
        "--dicom-out",
        metavar="DIR",
        help="also write, for a DICOM --image, the boxes as a DICOM SR (TID 1500, one planar ROI per box "
        "with its score) and the heatmap as a FRACTIONAL DICOM Segmentation on the image's pixel grid, "
        "both referencing the image, into DIR (<stem>_sr.dcm, <stem>_seg.dcm)",
    )

    p = add(
        "froc",
        cmd_froc,
        "Paper 003's evaluation over a split: dense maps of every film (image_id: a film "
        "stored twice is scanned once), sensitivity per mass ROI (one per lesion, none merged or dropped) "
        "against false positives per image (FROC, next to a random heatmap), image-level mass/no-mass "
        "accuracy from the map maximum, and the two-stage pipeline's figures.",
    )
    model_args(p)
    p.add_argument("--manifest", required=True, help="manifest written by `mammo-ray index`")
    p.add_argument("--splits", required=True, help="splits JSON written by `mammo-ray split`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="output folder (froc_*.png, froc.json, per_image.csv)")
    p.add_argument("--reduce", choices=["max", "mean"], default="max", help="map statistic inside an ROI")
    p.add_argument(
        "--classifier", help="stage-1 image classifier (a patch model: its map maximum); default: --model itself"
    )
    p.add_argument("--image-threshold", type=float, default=0.5, help="stage 1: image called mass at this score")
    p.add_argument("--box-threshold", type=float, default=0.4, help="stage 2: box threshold (paper 003: 0.4)")
    p.add_argument("--tile", type=int, default=1024, help="tile side in px; 0: one pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-heatmap baseline")

    p = add(
        "explain",
        cmd_explain,
        "Input-gradient saliency maps (averaged over members) and first-layer filter grids (paper 001) for one image.",
    )
    model_args(p)
    p.add_argument("--image", required=True, help="a lesion crop (DICOM/PNG), or a whole image with --box")
    p.add_argument("--box", help="x0,y0,x1,y1 ROI in the image: crop around it as the model's data.crop does")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target-class", type=int, default=1, help="class whose score is explained (1: malignant)")
    p.add_argument("--max-filter-grids", type=int, default=1, help="filter grids of the first N members")

    p = add(
        "dream",
        cmd_dream,
        "Directed Dream (paper 000, Algorithm 1): alter the CC (and MLO) input step by "
        "step towards malignant or benign and save the frames (image, saliency, dream) as a GIF.",
    )
    model_args(p)
    p.add_argument("--image", required=True, help="the CC view (a lesion crop, or a whole image with --box)")
    p.add_argument("--image2", help="the MLO view of the same lesion (parallel/multimodal models)")
    p.add_argument("--box", help="x0,y0,x1,y1 ROI in --image")
    p.add_argument("--box2", help="x0,y0,x1,y1 ROI in --image2")
    p.add_argument("--target", choices=["malignant", "benign"], required=True)
    p.add_argument("--out", required=True, help="the GIF to write (the last frame goes beside it as PNG)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
