"""Training benchmark: one Ray Train worker next to the same loop in plain PyTorch, per backbone.

    python benchmarks/bench_train.py [--models resnet18,levynet] [--epochs 3] [--input-px 112]
    python benchmarks/bench_train.py --smoke        # levynet + resnet18, tiny, ~2 minutes

Both paths train on the same prepared synthetic data with the same config, seed, batch size,
number of epochs and torch threads, and run the same functions of ``mammo_ray.train.loop``:

    plain   build_training + fit in this process (torch.set_num_threads(--threads))
    ray     build_trainer(...).fit(): one TorchTrainer worker with cpus_per_worker = --threads
            (the worker sets its torch threads from it), running train_loop_per_worker

The two runs of a backbone are back to back, in alternating order from one backbone to the
next, so drift on a noisy machine hits both. Images/s is timed inside ``train_one_epoch`` (the
``train_images_per_s`` each epoch reports; evaluation and checkpoints are outside it), and the
first epoch is a warm-up left out: the figure is the images of epochs 2..N over their seconds.

ray/plain is the ratio of the two: 1.00 means Ray Train costs nothing per step once running
(Ray's own benchmark puts Train within 2.5% of native PyTorch DDP; with one worker there is no
DDP, so expect about 1). Ray start-up is separate: the wall time of ``fit()`` minus the time
inside epochs (training as timed in the worker, plus building and evaluation as timed on the
plain path): worker start, reports, checkpoints and teardown, about 30 s on 2 cores.

Results are printed and written to WORKDIR/benchmarks/train.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from mammo_ray.config import Config, load_config
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.models import list_models
from mammo_ray.train.checkpoint import load_checkpoint
from mammo_ray.train.loop import build_training, fit
from mammo_ray.train.ray_train import build_trainer, loop_config
from mammo_ray.workdir import resolve_workdir

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


def steady_rate(history: list[dict], images: int) -> tuple[float, float]:
    """(images/s over epochs 2..N, seconds in training over all epochs), from per-epoch rates."""
    seconds = [images / h["train_images_per_s"] for h in history]
    return images * (len(seconds) - 1) / sum(seconds[1:]), sum(seconds)


def run_plain(config: Config, cache_dir: str, device: str, images: int) -> dict:
    start = time.perf_counter()
    training = build_training(config, cache_dir, device=device)
    assert len(training.train_loader.sampler) == images
    history = fit(training)
    wall = time.perf_counter() - start
    rate, train_s = steady_rate(history, images)
    return {
        "images_per_s": rate,
        "wall_s": wall,
        "train_s": train_s,
        "epoch_images_per_s": [h["train_images_per_s"] for h in history],
    }


def run_ray(config: Config, cache_dir: str, storage: Path, images: int) -> dict:
    name = f"bench-train-{config.model.name}-{os.getpid()}-{time.time_ns()}"  # new name: never a resume
    trainer = build_trainer(config, loop_config(config, cache_dir), name=name, storage_path=storage)
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    with result.checkpoint.as_directory() as directory:  # the last checkpoint holds every epoch's metrics
        history = load_checkpoint(directory)["history"]
    shutil.rmtree(storage / name, ignore_errors=True)
    rate, train_s = steady_rate(history, images)
    return {
        "images_per_s": rate,
        "wall_s": wall,
        "train_s": train_s,
        "epoch_images_per_s": [h["train_images_per_s"] for h in history],
    }


def machine_info(device: str, threads: int) -> dict:
    import ray

    return {
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated backbones (default: every registered one)")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up, not timed")
    parser.add_argument("--input-px", type=int, default=112, help="network input side (inception_v3 needs >= 75)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patients", type=int, default=100, help="synthetic patients (sets the dataset size)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of the plain path = cpus_per_worker of the Ray worker",
    )
    parser.add_argument("--use-gpu", action="store_true", help="plain path on cuda, Ray worker with use_gpu")
    parser.add_argument("--smoke", action="store_true", help="levynet + resnet18, 64 px, 32 patients")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.input_px, args.patients = args.models or "levynet,resnet18", 64, 32
    models = args.models.split(",") if args.models else list_models()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is a warm-up")
    device = "cuda" if args.use_gpu else "cpu"

    workdir = resolve_workdir(args.workdir) / "benchmarks"
    storage = workdir / "ray_results"
    base = [
        "data.num_workers=0",
        f"data.synth_patients={args.patients}",
        f"data.input_px={args.input_px}",
        f"data.cache_px={args.input_px + args.input_px // 8}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.num_workers=1",
        f"train.cpus_per_worker={args.threads}",
        f"train.use_gpu={args.use_gpu}",
        "train.max_failures=0",
        "train.keep_checkpoints=1",
        "train.early_stop_patience=null",
        "train.stop_train_acc=null",
    ]
    configs = {m: load_config(SMOKE_CONFIG, base + [f"model.name={m}"]) for m in models}
    cache_dir = ensure_prepared(configs[models[0]], workdir / "train-data", progress=False).cache_dir  # shared
    torch.set_num_threads(args.threads)
    probe = build_training(configs[models[0]], cache_dir)
    images = len(probe.train_loader.sampler)  # training images per epoch, the same for every backbone
    del probe

    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(
            num_cpus=max(args.threads, os.cpu_count() or 1),
            num_gpus=1 if args.use_gpu else 0,
            include_dashboard=False,
            log_to_driver=False,
        )  # worker logs: in Ray's session dir
    rows = []
    try:
        for i, model in enumerate(models):
            config = configs[model]
            order = ("plain", "ray") if i % 2 == 0 else ("ray", "plain")
            runs = {}
            for path in order:
                runs[path] = (
                    run_plain(config, cache_dir, device, images)
                    if path == "plain"
                    else run_ray(config, cache_dir, storage, images)
                )
                rates = " ".join(f"{r:.1f}" for r in runs[path]["epoch_images_per_s"])
                print(f"[{model}] {path:<5} images/s per epoch {rates}, wall {runs[path]['wall_s']:.1f} s", flush=True)
            plain, ray_run = runs["plain"], runs["ray"]
            startup = ray_run["wall_s"] - ray_run["train_s"] - (plain["wall_s"] - plain["train_s"])
            rows.append(
                {
                    "model": model,
                    "order": list(order),
                    "plain_images_per_s": round(plain["images_per_s"], 3),
                    "ray_images_per_s": round(ray_run["images_per_s"], 3),
                    "ratio_ray_to_plain": round(ray_run["images_per_s"] / plain["images_per_s"], 3),
                    "ray_startup_s": round(startup, 1),
                    "plain": {k: v if isinstance(v, list) else round(v, 3) for k, v in plain.items()},
                    "ray": {k: v if isinstance(v, list) else round(v, 3) for k, v in ray_run.items()},
                }
            )
    finally:
        ray.shutdown()

    result = {
        "machine": machine_info(device, args.threads),
        "settings": {
            "models": models,
            "epochs": args.epochs,
            "warmup_epochs_skipped": 1,
            "input_px": args.input_px,
            "batch_size": args.batch_size,
            "patients": args.patients,
            "train_images_per_epoch": images,
            "threads": args.threads,
            "use_gpu": args.use_gpu,
            "smoke": args.smoke,
            "config": configs[models[0]].model_dump(mode="json"),
        },
        "results": rows,
    }
    out = workdir / "train.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\n{images} training images per epoch, {args.input_px} px, batch {args.batch_size}, "
        f"{args.threads} threads, {device}; images/s over epochs 2..{args.epochs} (epoch 1 is a warm-up)"
    )
    print(f"{'model':<14}{'plain img/s':>12}{'ray img/s':>11}{'ray/plain':>11}{'ray start-up s':>16}")
    for r in rows:
        print(
            f"{r['model']:<14}{r['plain_images_per_s']:>12.2f}{r['ray_images_per_s']:>11.2f}"
            f"{r['ratio_ray_to_plain']:>11.3f}{r['ray_startup_s']:>16.1f}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
