"""Ensemble execution benchmark: all members in one vmap over stacked weights next to a Python loop.

    python benchmarks/bench_ensemble.py                      # levynet 64 px + resnet18 112 px, 10 and 100 members
    python benchmarks/bench_ensemble.py --threads 2          # both cores (noisy when other jobs share them)
    python benchmarks/bench_ensemble.py --device cuda        # on a GPU, 224 px
    python benchmarks/bench_ensemble.py --models resnet18 --members 10,50,100 --batch 16 --member-chunk 25
    python benchmarks/bench_ensemble.py --smoke              # tiny: a check that it runs

Paper 000's ensemble is 100 networks that differ only in their seed. ``mammo_ray.ensemble.execution``
can run them two ways: ``loop`` (``Ensemble.forward``: member after member on the whole batch) and
``stacked`` (``StackedEnsemble``: ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``,
one computation whose convolutions are grouped over members). For each model and member count this
script builds N members with random weights (seeds 0..N-1; speed does not depend on the weights) and
calls ``measure_execution`` on one random batch, which is exactly what the Serve app's
``choose_execution(mode="auto")`` measures: both executions on the same batch and device, one
warm-up round, then ``--repeats`` rounds in alternating order (loop first, then stacked first, ...)
so that drift on a noisy machine hits both; the median seconds per forward of the batch are
reported, CUDA synchronised around each call. ``loop/stacked`` > 1 means stacked is faster;
``max abs diff`` is the largest difference of the two outputs' probabilities (auto accepts
stacked only within 1e-4); ``auto`` is what ``choose_execution`` would pick from these figures.

100 x resnet18 on CPU is slow (about 100x one resnet18 per batch, stacked more): that cell runs at
``--slow-batch`` images (default 2) instead of ``--batch``, and the table says so. Stacking copies
the weights, so 100 x resnet18 needs about 2 x 4.7 GB of memory. Torch runs on ``--threads`` threads,
1 by default: with 2 threads on 2 cores shared with other jobs, every op waits for the slower
thread, which costs the loop's many small ops most (measured here: loop 6-21x slower than on one
thread, stacked 1.3-3.2x), so the 2-thread figures say more about the load than about the executions.
The default run takes about 3.5 minutes on these 2 cores (about 8 with --threads 2). Results go to
WORKDIR/benchmarks/ensemble.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import torch

from mammo_ray.config import load_config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.ensemble.execution import TOLERANCE, measure_execution
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.models import create_view_model
from mammo_ray.workdir import resolve_workdir

CPU_PX = {"levynet": 64, "resnet18": 112}  # default input side on CPU; 224 on CUDA
SLOW_MODEL, SLOW_MEMBERS = "resnet18", 100  # from these members on, this model runs at --slow-batch on CPU


def build_members(model: str, view_mode: str, count: int, device: str) -> list[torch.nn.Module]:
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        members.append(create_view_model(model, view_mode).eval().to(device))
    return members


def example(view_mode: str, batch: int, px: int, device: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, px, px)
    if view_mode == "multimodal":
        return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    return torch.randn(shape, generator=g).to(device)


def machine_info(device: str, threads: int) -> dict:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="levynet,resnet18", help="comma-separated backbones")
    parser.add_argument("--members", default="10,100", help="comma-separated member counts")
    parser.add_argument("--view-mode", default="single", choices=("single", "parallel", "multimodal"))
    parser.add_argument("--batch", type=int, default=8, help="images per forward (pairs for multimodal)")
    parser.add_argument(
        "--slow-batch",
        type=int,
        default=2,
        help="batch of resnet18 with >= 100 members on CPU (0: --batch); ignored on cuda",
    )
    parser.add_argument(
        "--input-px",
        type=int,
        help="input side for every model (default: levynet 64, resnet18 112 on cpu; 224 on cuda)",
    )
    parser.add_argument("--member-chunk", type=int, help="members per vmap call (default: all at once)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steady on a shared machine, see the docstring)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--smoke", action="store_true", help="2 and 4 members, 32 px, batch 2, 1 repeat")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.smoke:
        args.members, args.input_px, args.batch, args.slow_batch, args.repeats = "2,4", 32, 2, 0, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    models, counts = args.models.split(","), sorted(int(n) for n in args.members.split(","))
    torch.set_num_threads(args.threads)

    load_start = list(os.getloadavg())
    rows, start = [], time.perf_counter()
    for model in models:
        px = args.input_px or (224 if args.device == "cuda" else CPU_PX.get(model, 112))
        config = load_config(None, [f"model.name={model}", f"model.view_mode={args.view_mode}"])
        built = time.perf_counter()
        members = build_members(model, args.view_mode, max(counts), args.device)  # N=10 uses the first 10
        build_s = time.perf_counter() - built
        for n in counts:
            slow = args.device == "cpu" and model == SLOW_MODEL and n >= SLOW_MEMBERS and args.slow_batch > 0
            batch = args.slow_batch if slow else args.batch
            ensemble = Ensemble(members[:n], TransformSpec(input_px=px), config).eval()
            report = measure_execution(
                ensemble,
                example(args.view_mode, batch, px, args.device),
                repeats=args.repeats,
                warmup=1,
                member_chunk=args.member_chunk,
            )
            stacked_s = report["stacked_s"]
            auto = (
                "loop"
                if stacked_s is None or not report["max_abs_diff"] <= TOLERANCE
                else "stacked"
                if stacked_s < report["loop_s"]
                else "loop"
            )
            row = {
                "model": model,
                "view_mode": args.view_mode,
                "members": n,
                "input_px": px,
                "batch": batch,
                "small_batch": slow,
                "loop_s": report["loop_s"],
                "stacked_s": stacked_s,
                "ratio_loop_to_stacked": report.get("ratio_loop_to_stacked"),
                "max_abs_diff": report["max_abs_diff"],
                "auto": auto,
                "build_members_s": round(build_s, 2),
                "report": report,
            }
            rows.append(row)
            ratio = f"{row['ratio_loop_to_stacked']:.2f}" if stacked_s is not None else "-"
            print(
                f"[{model} x{n}, {px} px, batch {batch}] loop {report['loop_s']:.4f} s, stacked "
                f"{stacked_s if stacked_s is None else round(stacked_s, 4)} s, loop/stacked {ratio}"
                + (f", stacked failed: {report['stacked_error']}" if report["stacked_error"] else ""),
                flush=True,
            )
            del ensemble
            gc.collect()
        del members
        gc.collect()

    result = {
        "machine": {**machine_info(args.device, args.threads), "load_average_at_start": load_start},
        "settings": {
            "models": models,
            "members": counts,
            "view_mode": args.view_mode,
            "batch": args.batch,
            "slow_batch": args.slow_batch,
            "input_px": args.input_px,
            "member_chunk": args.member_chunk,
            "repeats": args.repeats,
            "warmup": 1,
            "threads": args.threads,
            "device": args.device,
            "smoke": args.smoke,
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "results": rows,
    }
    out = resolve_workdir(args.workdir) / "benchmarks" / "ensemble.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.device}, {args.threads} torch threads, {args.view_mode} view, median of {args.repeats} rounds "
        f"after 1 warm-up; load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print("\n| model | members | px | batch | loop s | stacked s | loop/stacked | max abs diff | auto |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stacked = "failed" if r["stacked_s"] is None else f"{r['stacked_s']:.4f}"
        ratio = "-" if r["stacked_s"] is None else f"{r['ratio_loop_to_stacked']:.2f}"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        batch = f"{r['batch']} (small)" if r["small_batch"] else str(r["batch"])
        print(
            f"| {r['model']} | {r['members']} | {r['input_px']} | {batch} | {r['loop_s']:.4f} | {stacked} | "
            f"{ratio} | {diff} | {r['auto']} |"
        )
    print(f"\nwritten to {out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
