"""Localization benchmark: the dense (fully convolutional) map against an explicit sliding window
over the same image, side by side, and the heatmap time of one full-size mammogram.

    python benchmarks/bench_localize.py                      # resnet18 + levynet, 1024x640 and 5000x3000
    python benchmarks/bench_localize.py --models resnet18 --size 768x512 --full 5000x3000 --threads 2
    python benchmarks/bench_localize.py --smoke              # tiny: a check that it runs
    python benchmarks/bench_localize.py --device cuda        # on a GPU

Paper 003 converts its patch classifier into a fully convolutional net because one pass over the
whole image replaces one forward pass per window. ``compare``: for each model, the same image and
the same window, ``fcn.sliding_window_map`` (every window cropped and classified, batched) and
``fcn.dense_map`` at the network's stride (the trunk once, then the head on feature windows) are
timed back to back (order alternating between models, one warm-up call each); the ratio
sliding / dense is the speed-up, and the maps' agreement is printed beside it (they differ a
little near window borders because the backbones pad their convolutions). ``full``: the dense
map of one full-size single-channel image (default 5000x3000) with ``--tile`` px tiles, its wall
time and the process's peak RSS. Weights are random: speed does not depend on them. Results go
to WORKDIR/benchmarks/localize.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch

from mammo_ray.localize.fcn import dense_map, sliding_window_map, trunk_geometry
from mammo_ray.models import create_model
from mammo_ray.workdir import resolve_workdir

WINDOWS = {
    "levynet": 64,
    "resnet18": 224,
    "resnet50": 224,
    "googlenet": 224,
    "alexnet": 224,
    "vgg16": 224,
    "inception_v3": 299,
}


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(name: str, size: tuple[int, int], device: str, repeats: int, first: str) -> dict:
    window = WINDOWS[name]
    model = create_model(name, in_chans=1, num_classes=2).to(device).eval()
    image = torch.randn(1, 1, *size, device=device)
    stride = trunk_geometry(model, window).stride
    runs = {
        "dense": lambda: dense_map(model, image, window),
        "sliding": lambda: sliding_window_map(model, image, window, stride, batch=32),
    }
    order = ["dense", "sliding"] if first == "dense" else ["sliding", "dense"]
    with torch.inference_mode():
        dense_map(model, image[..., : window * 2, : window * 2], window)  # warm-up
        times, maps = {}, {}
        for key in order:
            times[key], maps[key] = _timed(runs[key], repeats)
    a, b = maps["dense"].probs, maps["sliding"].probs
    windows = a.size
    return {
        "model": name,
        "image": list(size),
        "window": window,
        "stride": stride,
        "windows": windows,
        "dense_s": times["dense"],
        "sliding_s": times["sliding"],
        "speedup_sliding_over_dense": times["sliding"] / times["dense"],
        "sliding_windows_per_s": windows / times["sliding"],
        "max_abs_diff": float(np.abs(a - b).max()),
        "corr": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
    }


def full_size(name: str, size: tuple[int, int], tile: int, device: str) -> dict:
    window = WINDOWS[name]
    model = create_model(name, in_chans=1, num_classes=2).to(device).eval()
    image = torch.randn(1, 1, *size)  # stays on the CPU: dense_map copies one tile at a time
    with torch.inference_mode():
        start = time.perf_counter()
        out = dense_map(model, image, window, tile=tile)
        seconds = time.perf_counter() - start
    return {
        "model": name,
        "image": list(size),
        "tile": tile,
        "window": window,
        "map": list(out.probs.shape),
        "seconds": seconds,
        "megapixels_per_s": size[0] * size[1] / 1e6 / seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,levynet")
    parser.add_argument("--size", type=_size, default=(1024, 640), help="HxW of the compared image")
    parser.add_argument("--full", type=_size, default=(5000, 3000), help="HxW of the full-size image")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (the best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.size, args.full, args.tile, args.repeats = (448, 320), (1024, 640), 512, 1
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = [
        compare(n, args.size, args.device, args.repeats, "dense" if i % 2 == 0 else "sliding")
        for i, n in enumerate(names)
    ]
    print(
        f"dense map vs sliding window, {args.size[0]}x{args.size[1]} image, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| model | window | stride | windows | sliding s | dense s | sliding/dense | max |diff| | corr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['window']} | {r['stride']} | {r['windows']} | {r['sliding_s']:.2f} | "
            f"{r['dense_s']:.3f} | {r['speedup_sliding_over_dense']:.1f}x | {r['max_abs_diff']:.3f} | {r['corr']:.3f} |"
        )
    full = [full_size(n, args.full, args.tile, args.device) for n in names]
    print(f"\nfull-size heatmap, {args.full[0]}x{args.full[1]} single-channel, tile {args.tile}")
    for r in full:
        print(
            f"  {r['model']}: {r['seconds']:.1f} s ({r['megapixels_per_s']:.2f} MP/s), map {r['map']}, "
            f"peak RSS so far {r['peak_rss_gib']:.2f} GiB"
        )
    out = resolve_workdir(args.workdir) / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "compare": rows,
        "full": full,
        "settings": vars(args) | {"size": list(args.size), "full": list(args.full)},
        "machine": {
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    (out / "localize.json").write_text(json.dumps(record, indent=2))
    print(f"\nwritten {out / 'localize.json'}")


if __name__ == "__main__":
    main()
