"""Data benchmark: `prepare` throughput next to raw pydicom decode, measured in one run.

    python benchmarks/bench_data.py [--patients 24] [--size 1664x1024] [--crop proportional]
    python benchmarks/bench_data.py --replica [--size 256x160]   # all 3568 rows of the real CSVs

Both figures are images per second over the same full-field DICOMs, on the same machine,
one after the other, so their ratio is meaningful even on a noisy machine:

    raw decode   pydicom.dcmread(path).pixel_array, one process: the films alone, and the
                 films with their ROI masks (what prepare must decode: its bound); then the
                 films and masks again in N processes at once (the bound with every core busy)
    prepare 1    mammo-ray prepare with one worker process (decode + orient + crops + writes)
    prepare N    the same with N worker processes (default: every core), compared with the
                 N-process bound

Results are printed and written to WORKDIR/benchmarks/data.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom

from mammo_ray.config import DataConfig
from mammo_ray.data.cache import prepare_cache, worker_context
from mammo_ray.data.index import index_dataset
from mammo_ray.data.splits import make_splits
from mammo_ray.data.synthetic import csv_source, synthesize
from mammo_ray.workdir import resolve_workdir


def decode_all(paths: list[str], repeats: int = 1) -> int:
    for _ in range(repeats):
        for path in paths:
            pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the work
    return repeats * len(paths)


def raw_decode_rate(paths: list[str], repeats: int) -> float:
    start = time.perf_counter()
    return decode_all(paths, repeats) / (time.perf_counter() - start)


def parallel_bound(paths: list[str], masks: list[str], workers: int, repeats: int) -> float:
    """Films/s decoding every film and mask with ``workers`` processes at once: the bound with those cores busy.

    The files are dealt round-robin; the pool is started and warmed (imports, page cache) before the clock.
    """
    files = paths + masks
    chunks = [files[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(decode_all, chunks))  # warm: imports and the page cache
        start = time.perf_counter()
        list(pool.map(decode_all, chunks, [repeats] * workers))
        seconds = time.perf_counter() - start
    return repeats * len(paths) / seconds


def prepare_rate(manifest, split_of, cfg: DataConfig, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    summary = prepare_cache(manifest, split_of, cfg, out, progress=False)
    return summary.images_decoded / summary.seconds, summary.images_decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument(
        "--size", help="full-field HxW of the synthetic images (default 1664x1024; 256x160 with --replica)"
    )
    parser.add_argument(
        "--replica",
        action="store_true",
        help="the full-structure replica of the real CSVs (all 1566 patients) instead of invented patients",
    )
    parser.add_argument("--crop", default="proportional")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the files for the raw decode")
    parser.add_argument("--workdir")
    args = parser.parse_args()

    workdir = resolve_workdir(args.workdir) / "benchmarks"
    h, w = (int(v) for v in (args.size or ("256x160" if args.replica else "1664x1024")).split("x"))
    patients = 1566 if args.replica else args.patients
    data = workdir / f"{'replica' if args.replica else 'data'}-p{patients}-{h}x{w}"
    if not (data / "mass_case_description_train_set.csv").exists():
        synthesize(
            data,
            patients=patients,
            seed=0,
            size=(h, w),
            progress=False,
            from_csv=csv_source("cbis-ddsm") if args.replica else None,
        )
    manifest, _ = index_dataset(root=data, csv_dir=data)
    manifest = manifest[manifest["resolved"]].reset_index(drop=True)
    split_of = make_splits(manifest, seed=0).assign(manifest)
    films = manifest.drop_duplicates("image_id")  # prepare decodes a film stored twice once
    paths = sorted(films["image_path"])
    masks = sorted(set(manifest["roi_mask_path"]) - {""})

    raw_decode_rate(paths[:2], 1)  # warm the page cache and imports before timing
    raw = raw_decode_rate(paths, args.repeats)
    raw_masks = raw_decode_rate(masks, args.repeats)
    bound = len(paths) / (len(paths) / raw + len(masks) / raw_masks)  # films/s decoding films and masks
    bound_n = parallel_bound(paths, masks, args.workers, args.repeats)  # the same, every core busy
    cfg = DataConfig(crop=args.crop, abnormality="all", num_workers=1, cache_px=256, input_px=224)
    start_method = worker_context().get_start_method()  # fork when nothing else runs here, else spawn
    one, decoded = prepare_rate(manifest, split_of, cfg, workdir / "cache-1")
    many, _ = prepare_rate(
        manifest, split_of, cfg.model_copy(update={"num_workers": args.workers}), workdir / f"cache-{args.workers}"
    )

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pydicom": pydicom.__version__},
        "replica": args.replica,
        "load_average": os.getloadavg(),
        "prepare_worker_start": start_method,
        "images": len(paths),
        "masks": len(masks),
        "image_size": [h, w],
        "crop": args.crop,
        "images_decoded_by_prepare": decoded,
        "raw_decode_images_per_s": round(raw, 2),
        "raw_decode_images_and_masks_images_per_s": round(bound, 2),
        "prepare_1_worker_images_per_s": round(one, 2),
        f"prepare_{args.workers}_workers_images_per_s": round(many, 2),
        "ratio_prepare_1_worker_to_raw": round(one / raw, 3),
        f"ratio_prepare_{args.workers}_workers_to_raw": round(many / raw, 3),
        f"raw_decode_images_and_masks_{args.workers}_processes_images_per_s": round(bound_n, 2),
        "ratio_prepare_1_worker_to_bound": round(one / bound, 3),
        f"ratio_prepare_{args.workers}_workers_to_bound_{args.workers}_processes": round(many / bound_n, 3),
    }
    out = workdir / "data.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{len(paths)} films ({len(masks)} ROI masks) of {h}x{w}, crop mode {args.crop}, "
        f"load average {os.getloadavg()[0]:.2f}, prepare's workers start by {start_method}"
    )
    print(f"  raw pydicom decode, films          {raw:8.1f} images/s")
    print(f"  raw decode, films + their masks    {bound:8.1f} images/s   (the bound, 1 process)")
    print(f"  the same, {args.workers} processes at once      {bound_n:8.1f} images/s   (the bound, every core busy)")
    print(
        f"  prepare, 1 worker                  {one:8.1f} images/s   ({one / raw:.2f}x raw, "
        f"{one / bound:.2f}x the 1-process bound)"
    )
    print(
        f"  prepare, {args.workers} workers                 {many:8.1f} images/s   "
        f"({many / bound_n:.2f}x the {args.workers}-process bound)"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
