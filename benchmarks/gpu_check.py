"""GPU readiness check (issue 18): four measurements in one run, written to one JSON file.

    benchmarks/gpu_check.sh                         # on a GPU: about 4 minutes, at most 8
    benchmarks/gpu_check.sh --out h200.json --parts train,ensemble
    benchmarks/gpu_check.sh --dry-run --out x.json  # every part on the CPU, tiny: a check that it runs

Parts (``--parts``, default all, run in this order):

    train      training images/s of every registered backbone at its own input size, one step being
               ``mammo_ray.train.loop.train_one_epoch`` (AMP bf16, channels_last) on batches already on
               the device, and model FLOP utilisation: images/s x 6 x MACs per image (2 FLOPs a MAC,
               backward about twice the forward) over the device's dense bf16 peak (``PEAK_BF16``;
               null for a device not in the table). MACs are counted with ``FlopCounterMode``.
    ensemble   ``measure_execution`` (the Serve app's choice of execution) for 10 and 100 resnet18
               members: the loop against the stacked ``torch.func`` execution, images/s of each and
               loop/stacked; their probabilities must agree within ``TOLERANCE``, or the part fails.
    ray_train  two Ray Train workers sharing the GPU (0.5 each) through the platform's ``build_trainer``,
               with NCCL. NCCL usually refuses two ranks on one device: its error is recorded and gloo
               runs instead. The dry run has no GPU and runs gloo on 2 CPUs.
    serve      ``bench_serve.measure_serve`` with the replica and the in-process runtime on the GPU: HTTP
               p50 minus in-process p50 at 1 client is Serve's overhead per request.

Each part runs under a time budget (SIGALRM) and inside a guard: a part that fails or runs out of time
records ``{"error": ...}`` beside what it measured so far, and the next part runs. The JSON is rewritten
after every part, so it exists even if the run is killed. Exit status 1 when a part failed.
Performance is never asserted in the tests; ``tests/test_gpu_check.py`` runs ``--dry-run``.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve, bench_ensemble: imported, not copied

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
PARTS = ("train", "ensemble", "ray_train", "serve")

# Dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class Sizes:
    """How large each part runs: ``GPU`` for the check, ``DRY`` for the CPU dry run."""

    train_batch: int
    train_warmup: int  # steps before timing (cuDNN algorithm choice, allocator)
    train_steps: int  # timed steps
    train_min_px: int | None  # None: each backbone's ModelInfo.input_size; else max(this, min_input_size)
    amp: bool  # bf16 autocast (CUDA only)
    ensemble_model: str
    ensemble_px: int
    ensemble_batch: int
    ensemble_members: tuple[int, ...]
    ensemble_repeats: int
    ray_overrides: tuple[str, ...]  # on top of tune_configs/smoke.yaml
    serve_members: int  # levynet members, as bench_serve's default
    serve_px: int
    serve_requests: int
    serve_clients: int
    budgets_s: tuple[tuple[str, float], ...]  # per part; the four add up to 7.5 minutes on the GPU


_RAY_COMMON = (
    "data.synth_size=[384, 240]",
    "data.num_workers=0",
    "data.split_fractions=[0.6, 0.2, 0.2]",
    "train.num_workers=2",
    "train.max_failures=0",  # a refused backend fails at once instead of restarting the workers
    "train.keep_checkpoints=1",
    "train.early_stop_patience=null",
    "train.stop_train_acc=null",
    "train.channels_last=true",
)

GPU = Sizes(
    train_batch=64,
    train_warmup=3,
    train_steps=20,
    train_min_px=None,
    amp=True,
    ensemble_model="resnet18",
    ensemble_px=224,
    ensemble_batch=32,
    ensemble_members=(10, 100),
    ensemble_repeats=5,
    ray_overrides=(
        *_RAY_COMMON,
        "data.synth_patients=100",
        "data.cache_px=72",
        "data.input_px=64",
        "model.name=resnet18",
        "train.batch_size=32",
        "train.epochs=3",
        "train.use_gpu=true",
        "train.gpus_per_worker=0.5",
        "train.shared_gpu_ranks=true",  # two ranks on one GPU on purpose: NCCL refuses, gloo is tried next
        "train.cpus_per_worker=2",
        "train.amp=bf16",
    ),
    serve_members=4,
    serve_px=64,
    serve_requests=200,
    serve_clients=16,
    budgets_s=(("train", 120), ("ensemble", 90), ("ray_train", 150), ("serve", 90)),
)

DRY = Sizes(
    train_batch=2,
    train_warmup=0,  # on the CPU a step of vgg16 or alexnet is seconds (Adam over 60-140M parameters)
    train_steps=2,
    train_min_px=32,
    amp=False,
    ensemble_model="resnet18",
    ensemble_px=32,
    ensemble_batch=2,
    ensemble_members=(2, 4),
    ensemble_repeats=1,
    ray_overrides=(
        *_RAY_COMMON,
        "data.synth_patients=16",
        "data.cache_px=40",
        "data.input_px=32",
        "model.name=levynet",
        "train.batch_size=8",
        "train.epochs=2",
        "train.use_gpu=false",
        "train.cpus_per_worker=1",
    ),
    serve_members=2,
    serve_px=32,
    serve_requests=10,
    serve_clients=2,
    budgets_s=(("train", 240), ("ensemble", 120), ("ray_train", 240), ("serve", 240)),  # hang guards only
)


class PartTimeout(BaseException):
    """A part ran past its budget (raised by SIGALRM). Not an Exception, so library code does not swallow it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise PartTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Timeout)\b.*", re.MULTILINE)


def describe(exc: BaseException, limit: int = 4000) -> str:
    """The exception as text (colour codes removed), its start and end kept when it is long."""
    text = ANSI.sub("", f"{type(exc).__name__}: {exc}")
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def innermost(text: str, limit: int = 1000) -> str:
    """From the last line that names an exception to the end: a worker's own error inside Ray's wrapping."""
    found = list(EXCEPTION_LINE.finditer(text))
    return (text[found[-1].start() :] if found else text.strip().splitlines()[-1] if text.strip() else "")[:limit]


def peak_bf16(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, where it comes from) of ``device``; None for a CPU or a GPU not in ``PEAK_BF16``."""
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"PEAK_BF16[{key!r}] (data sheet, dense) for {name!r}"
    return None, f"{name!r} is not in PEAK_BF16"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. training images/s and MFU per backbone -----------------------------------------------------


def count_macs(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Multiply-accumulates of one forward pass at ``shape`` (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2  # the counter counts 2 FLOPs per multiply-accumulate


def train_backbone(name: str, sizes: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    from mammo_ray.config import load_config
    from mammo_ray.models import build_view_model, get_model_info
    from mammo_ray.train.loop import build_optimizer, train_one_epoch

    info = get_model_info(name)
    px = info.input_size if sizes.train_min_px is None else max(sizes.train_min_px, info.min_input_size)
    config = load_config(None, [f"model.name={name}"])  # the platform's default model settings
    torch.manual_seed(0)
    model = build_view_model(config.model).to(device).to(memory_format=torch.channels_last)
    channels = model.expected_input_channels
    macs = count_macs(model, (1, channels, px, px), device)
    optimizer = build_optimizer(model, config)
    amp = torch.bfloat16 if sizes.amp and device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.train_batch, channels, px, px, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)  # on the device already: the step copies nothing
    y = torch.randint(0, 2, (sizes.train_batch,), generator=g).to(device)
    step = dict(device=device, amp_dtype=amp, channels_last=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if sizes.train_warmup:
        train_one_epoch(model, [(x, y)] * sizes.train_warmup, optimizer, **step)
    synchronize(device)
    metrics = train_one_epoch(model, [(x, y)] * sizes.train_steps, optimizer, **step)  # syncs every step
    rate = metrics["train_images_per_s"]
    train_flops = 6 * macs  # per image: forward 2 FLOPs a MAC, backward about twice the forward
    achieved = rate * train_flops
    row = {
        "input_px": px,
        "in_chans": channels,
        "batch": sizes.train_batch,
        "steps": sizes.train_steps,
        "images_per_s": rate,
        "macs_per_image": macs,
        "train_flops_per_image": train_flops,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del model, optimizer, x, y
    free_memory(device)
    return row


def part_train(record: dict[str, Any], sizes: Sizes, device: torch.device, backbones: list[str]) -> None:
    peak, source = peak_bf16(device)
    budget = dict(sizes.budgets_s)["train"]
    record["settings"] = {
        "amp": "bf16" if sizes.amp and device.type == "cuda" else None,
        "channels_last": True,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "peak_bf16_flops": peak,
        "peak_source": source,
        "mfu_definition": "images/s x 6 x MACs per image / peak",
    }
    rows: dict[str, Any] = {}
    record["backbones"] = rows
    start = time.perf_counter()
    for name in backbones:
        if time.perf_counter() - start > 0.85 * budget:
            rows[name] = {"error": f"not run: the part's {budget:.0f} s budget was nearly spent"}
            continue
        try:
            rows[name] = train_backbone(name, sizes, device, peak)
        except Exception as exc:  # noqa: BLE001 - one backbone's failure is recorded and the others still run
            rows[name] = {"error": describe(exc)}
            free_memory(device)
        row = rows[name]
        if "error" in row:
            print(f"  {name}: {row['error'].splitlines()[0]}", flush=True)
        else:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            gmacs = row["macs_per_image"] / 1e9
            print(f"  {name:<13}{row['images_per_s']:>9.1f} img/s  {gmacs:.2f} GMAC  MFU {mfu}", flush=True)
    failed = [name for name, row in rows.items() if "error" in row]
    if failed:
        raise RuntimeError(f"backbones without a figure: {', '.join(failed)}")


# --- 2. two Ray Train workers sharing the GPU ------------------------------------------------------


def fit_two_workers(config: Any, cache_dir: str, storage: Path, backend: str) -> dict[str, Any]:
    """The platform's trainer (``build_trainer``), with its process-group backend set to ``backend``."""
    from ray.train.torch import TorchConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from mammo_ray.train.checkpoint import load_checkpoint
    from mammo_ray.train.ray_train import build_trainer, loop_config

    name = f"gpu-check-{backend}-{os.getpid()}-{time.time_ns()}"  # a new name: never a resume
    base = build_trainer(config, loop_config(config, cache_dir), name=name, storage_path=storage)
    trainer = TorchTrainer(
        base.train_loop_per_worker,
        train_loop_config=base.train_loop_config,
        torch_config=TorchConfig(backend=backend, timeout_s=60),  # a hung collective fails in time
        scaling_config=base.scaling_config,
        run_config=base.run_config,
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    with result.checkpoint.as_directory() as directory:  # the last checkpoint holds every epoch's metrics
        history = load_checkpoint(directory)["history"]
    rates = [h["train_images_per_s"] for h in history]  # both ranks' images over rank 0's epoch time
    return {
        "images_per_s": statistics.harmonic_mean(rates[1:] or rates),  # epoch 1 is a warm-up when there are more
        "epoch_images_per_s": rates,
        "fit_wall_s": wall,
    }


def part_ray_train(record: dict[str, Any], sizes: Sizes, device: torch.device, work: Path, ray: LocalRay) -> None:
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared

    start = time.perf_counter()
    config = load_config(SMOKE_CONFIG, list(sizes.ray_overrides))
    cache_dir = str(ensure_prepared(config, work / "train-data", progress=False).cache_dir)
    record["prepare_data_s"] = time.perf_counter() - start
    t = config.train
    record["settings"] = {
        "model": config.model.name,
        "input_px": config.data.input_px,
        "batch_per_worker": t.batch_size,
        "epochs": t.epochs,
        "workers": t.num_workers,
        "gpus_per_worker": t.gpus_per_worker if t.use_gpu else 0,
        "cpus_per_worker": t.cpus_per_worker,
        "amp": t.amp if t.use_gpu else None,
    }
    attempts: dict[str, Any] = {}
    record["attempts"] = attempts
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    if device.type != "cuda":
        attempts["nccl"] = {"skipped": "no CUDA device (dry run): gloo on the CPU instead"}
    start = time.perf_counter()
    ray.start()
    record["ray_start_s"] = time.perf_counter() - start
    for backend in backends:
        print(f"  {backend}: 2 workers ...", flush=True)
        try:
            attempts[backend] = fit_two_workers(config, cache_dir, work / "ray_results", backend)
            print(f"  {backend}: {attempts[backend]['images_per_s']:.1f} images/s", flush=True)
            break  # the first backend that runs is the figure
        except Exception as exc:  # noqa: BLE001 - a refused backend is a finding: record it, try the next
            attempts[backend] = {"reason": innermost(describe(exc, 20_000)), "error": describe(exc)}
            print(f"  {backend}: failed: {attempts[backend]['reason']}", flush=True)
            ray.restart()  # a failed run can leave its workers holding the GPU share and the CPUs
    ran = [b for b in backends if "images_per_s" in attempts.get(b, {})]
    record["backend"] = ran[0] if ran else None
    record["images_per_s"] = attempts[ran[0]]["images_per_s"] if ran else None
    if not ran:
        raise RuntimeError(f"no backend ran 2 workers: {', '.join(backends)} failed (see attempts)")


# --- 3. the ensemble stacked against a loop -------------------------------------------------------


def part_ensemble(record: dict[str, Any], sizes: Sizes, device: torch.device) -> None:
    import bench_ensemble

    from mammo_ray.config import load_config
    from mammo_ray.data.transforms import TransformSpec
    from mammo_ray.ensemble.execution import TOLERANCE, measure_execution
    from mammo_ray.ensemble.model import Ensemble

    model, px, batch = sizes.ensemble_model, sizes.ensemble_px, sizes.ensemble_batch
    record["settings"] = {
        "model": model,
        "input_px": px,
        "batch": batch,
        "repeats": sizes.ensemble_repeats,
        "tolerance": TOLERANCE,
        "dtype": "float32",
    }
    cells: list[dict[str, Any]] = []
    record["cells"] = cells
    config = load_config(None, [f"model.name={model}"])
    members = bench_ensemble.build_members(model, "single", max(sizes.ensemble_members), str(device))
    example = bench_ensemble.example("single", batch, px, str(device))
    for n in sizes.ensemble_members:
        ensemble = Ensemble(members[:n], TransformSpec(input_px=px), config).eval()
        report = measure_execution(ensemble, example, repeats=sizes.ensemble_repeats, warmup=1)
        loop_s, stacked_s, diff = report["loop_s"], report["stacked_s"], report["max_abs_diff"]
        cells.append(
            {
                "members": n,
                "loop_images_per_s": batch / loop_s,
                "stacked_images_per_s": batch / stacked_s if stacked_s else None,
                "ratio_stacked_to_loop_images_per_s": loop_s / stacked_s if stacked_s else None,
                "loop_s": loop_s,
                "stacked_s": stacked_s,
                "max_abs_diff": diff,
                "stacked_error": report["stacked_error"],
                "warnings": report["warnings"],
            }
        )
        ratio = f"{loop_s / stacked_s:.2f}" if stacked_s else "-"
        print(f"  {n} x {model}: loop {batch / loop_s:.1f} img/s, stacked/loop {ratio}, diff {diff}", flush=True)
        del ensemble
        free_memory(device)
        if report["stacked_error"]:
            raise RuntimeError(f"{n} members: {report['stacked_error']}")
        if not diff <= TOLERANCE:  # also catches NaN
            raise AssertionError(f"{n} members: stacked and loop disagree, max |diff| {diff:.3g} > {TOLERANCE:g}")
    del members, example
    free_memory(device)


# --- 4. Serve's overhead with the model on the GPU ---------------------------------------------------


def part_serve(record: dict[str, Any], sizes: Sizes, device: torch.device, work: Path, ray: LocalRay) -> None:
    import bench_serve

    on_gpu = device.type == "cuda"
    record["settings"] = {
        "model": "levynet",
        "members": sizes.serve_members,
        "input_px": sizes.serve_px,
        "requests": sizes.serve_requests,
        "clients": sizes.serve_clients,
        "device": device.type,
        "num_gpus": 1.0 if on_gpu else 0.0,
    }
    ray.start()
    figures, execution = bench_serve.measure_serve(
        work / "serve",
        model="levynet",  # bench_serve's default, so the overhead compares with its CPU figure
        members=sizes.serve_members,
        px=sizes.serve_px,
        requests=sizes.serve_requests,
        clients=sizes.serve_clients,
        device=device.type,
        num_gpus=1.0 if on_gpu else 0.0,
    )
    record.update(figures)
    record["execution"] = {k: execution.get(k) for k in ("chosen", "reason", "loop_s", "stacked_s", "device")}
    local, http = figures["in_process"]["p50_ms"], figures["http_sequential"]["p50_ms"]
    record["overhead_p50_ms"] = http - local
    print(f"  in-process p50 {local:.1f} ms, HTTP p50 {http:.1f} ms: overhead {http - local:.1f} ms", flush=True)


# --- the run ---------------------------------------------------------------------------------------


class LocalRay:
    """Ray for the parts that need it: ``$RAY_ADDRESS`` if set, else a local one with explicit resources."""

    def __init__(self, num_cpus: int, num_gpus: int) -> None:
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def start(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, include_dashboard=False, log_to_driver=False
            )  # worker logs stay in Ray's session folder

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # Serve's actors too: the serve part shuts Serve down itself, even when it fails

    def restart(self) -> None:
        self.stop()
        self.start()


def machine(device: torch.device) -> dict[str, Any]:
    import ray

    info: dict[str, Any] = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            driver=nvidia_smi("driver_version"),
        )
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def nvidia_smi(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of GPU 0, or None where nvidia-smi is missing or fails."""
    import subprocess

    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write(result: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out)  # whole or not at all, even if the run is killed while writing


def run_part(name: str, budget_s: float, fn: Callable[[dict[str, Any]], None], result: dict, out: Path) -> None:
    record: dict[str, Any] = {"budget_s": budget_s}
    result["parts"][name] = record
    print(f"[{name}] budget {budget_s:.0f} s", flush=True)
    start = time.perf_counter()
    try:
        with time_limit(budget_s):
            fn(record)
    except (Exception, PartTimeout) as exc:  # noqa: BLE001 - a failed part is recorded and the next one runs
        record["error"] = describe(exc)
        print(f"[{name}] failed: {describe(exc, 300).splitlines()[0]}", flush=True)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    print(f"[{name}] {record['wall_s']} s", flush=True)
    write(result, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file written (default: gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--backbones", help="comma-separated (default: every registered backbone)")
    parser.add_argument("--workdir", help="members, data and Ray results go under WORKDIR/benchmarks/gpu-check")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # Ray's processes inherit it
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")

    from mammo_ray.models import list_models
    from mammo_ray.workdir import resolve_workdir

    backbones = args.backbones.split(",") if args.backbones else list_models()
    out = Path(args.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = resolve_workdir(args.workdir) / "benchmarks" / "gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = DRY if args.dry_run else GPU
    if args.dry_run:
        torch.set_num_threads(1)  # on 2 shared cores every op of 2 threads waits for the slower one
    peak, source = peak_bf16(device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "load_average_start": list(os.getloadavg()),
        "peak_bf16_flops": peak,
        "peak_source": source,
        "sizes": asdict(sizes),
        "parts": {},
    }
    if not cuda and not args.dry_run:
        result["error"] = "no CUDA device: run on a GPU machine, or with --dry-run"
        for name in parts:
            result["parts"][name] = {"error": result["error"]}
        write(result, out)
        print(f"{result['error']}; written {out}", file=sys.stderr)
        return 1

    ray = LocalRay(num_cpus=2 if args.dry_run else min(8, os.cpu_count() or 1), num_gpus=1 if cuda else 0)
    steps: dict[str, Callable[[dict[str, Any]], None]] = {
        "train": lambda r: part_train(r, sizes, device, backbones),
        "ensemble": lambda r: part_ensemble(r, sizes, device),
        "ray_train": lambda r: part_ray_train(r, sizes, device, work, ray),
        "serve": lambda r: part_serve(r, sizes, device, work, ray),
    }
    budgets = dict(sizes.budgets_s)
    try:
        for name in PARTS:  # the parts without Ray first
            if name in parts:
                run_part(name, budgets[name], steps[name], result, out)
    finally:
        ray.stop()
        result["load_average_end"] = list(os.getloadavg())
        result["wall_s"] = round(time.perf_counter() - started, 1)
        write(result, out)
    failed = [name for name, record in result["parts"].items() if "error" in record]
    print(f"written {out} in {result['wall_s']} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
