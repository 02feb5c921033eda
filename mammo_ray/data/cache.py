"""Decode-once, sharded, resumable crop cache (``mammo-ray prepare``).

Layout of a cache directory::

    cache.json                 parameters, counts, training statistics, skipped inputs
    config.yaml                the resolved config that produced it
    index.parquet              one row per entry (crop), see ``ENTRY_COLUMNS``
    mean_image.npy             mean training crop (for mean-image subtraction, paper 001)
    shards/shard-00007.images.npy   uint16 (n, H, W) crops
    shards/shard-00007.masks.npy    uint8  (n, H, W) masks cropped the same way: a lesion's own ROI,
                                    a negative's lesion map (empty), a whole image's kept ROIs
    shards/shard-00007.skipped.json inputs left out, each with its reason
    shards/shard-00007.stats.json   counts for the report (resampled masks, orientation checks)
    shards/shard-00007.parquet      the shard's entries; written last, so it marks the shard done

Each film (manifest ``image_id``: CBIS-DDSM stores some films twice, under a Mass and a Calc
folder) is decoded once per cache, and all of its crops are made from that one decode. Every
file is written to a temporary name and renamed into place, so an interrupted run leaves no
corrupt entry; a rerun skips the shards that are done and produces the same cache as an
uninterrupted run. ``CACHE_FORMAT`` is part of the fingerprint: a cache written by code that
stored its crops differently is never mistaken for a current one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook

from mammo_ray.config import DataConfig
from mammo_ray.data.quirks import film_ids
from mammo_ray.data.shard_worker import (
    CACHE_FORMAT,
    CROP_FIELDS,
    ENTRY_COLUMNS,
    STAT_KEYS,
    ShardResult,
    process_shard,
    read_shard,
)


class CacheError(RuntimeError):
    """A cache directory that belongs to other parameters, or an unusable input."""


@dataclass
class CacheSummary:
    cache_dir: str
    crop: str
    entries: int
    images_decoded: int
    shards_total: int
    shards_reused: int
    seconds: float
    images_per_second: float
    by_split: dict[str, dict[str, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    resampled_masks: int = 0  # ROI masks stored at another size (same aspect ratio), resampled to their film
    orientation_from_content: int = 0  # films without a laterality header: mirrored by image content
    orientation_disagreements: int = 0  # films whose laterality header and image content disagree

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _fingerprint(cfg: DataConfig, rows: pd.DataFrame) -> tuple[dict[str, Any], str]:
    params = {name: getattr(cfg, name) for name in CROP_FIELDS} | {"cache_format": CACHE_FORMAT}
    # Shard i holds films i*n..(i+1)*n-1: a resume with another n would take other films' shards as done.
    params["shard_images"] = cfg.shard_images
    params = json.loads(json.dumps(params))  # tuples -> lists, as they come back from JSON
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(pd.util.hash_pandas_object(rows, index=False).values.tobytes())
    return params, digest.hexdigest()[:16]


def _select_rows(manifest: pd.DataFrame, split_of: pd.Series, cfg: DataConfig) -> pd.DataFrame:
    rows = manifest.assign(split=split_of.fillna("").astype(str).str.lower())
    rows = rows[rows["resolved"] & (rows["split"] != "")]
    rows = rows.assign(image_id=film_ids(rows), keep=True)
    if cfg.abnormality != "all":
        rows["keep"] = rows["abnormality_type"].str.lower().str.startswith(cfg.abnormality[:4])
    # Rows that are not kept still travel with their film (whichever folder lists them): their
    # masks keep negative patches off every lesion, not only off the kept ones.
    keep_films = set(rows.loc[rows["keep"], "image_id"])
    rows = rows[rows["image_id"].isin(keep_films)]
    return rows.sort_values(["image_id", "image_path", "lesion_id"]).reset_index(drop=True)


def _shards(rows: pd.DataFrame, per_shard: int) -> list[list[dict[str, Any]]]:
    """Films in groups of ``per_shard``; a film is decoded from its first image path (sorted order)."""
    films: dict[str, list[dict[str, Any]]] = {}  # in order of first appearance
    for record in rows.to_dict("records"):  # one conversion: per-film pandas calls cost ms each
        films.setdefault(record["image_id"], []).append(record)
    items = [{"image_id": f, "image_path": group[0]["image_path"], "rows": group} for f, group in films.items()]
    return [items[start : start + per_shard] for start in range(0, len(items), per_shard)]


def worker_context() -> mp.context.BaseContext:
    """How prepare starts its workers: fork on Linux when this process runs no other thread, else spawn.

    A forked worker starts at once with the parent's imports; a spawned one imports pandas, pydicom
    and scipy again (1.5-2 s of a 14 s replica prepare with 2 workers). Fork copies other threads'
    locks mid-state (Ray's, gRPC's, a server's), so another thread (but tqdm's monitor) means spawn. Native
    pools that are not Python threads (BLAS, torch's) are not used by the workers.
    """
    # tqdm's monitor thread (left running by an earlier bar) only refreshes bars; workers never use tqdm.
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t is not tqdm.monitor]
    alone = not others
    return mp.get_context("fork" if alone and sys.platform == "linux" else "spawn")


def _shard_done(folder: Path, shard: int) -> bool:
    """A shard is done when its entry table (written last) and its counts exist."""
    stem = f"shard-{shard:05d}"
    return (folder / f"{stem}.parquet").exists() and (folder / f"{stem}.stats.json").exists()


def _training_statistics(cache_dir: Path, results: list[ShardResult]) -> dict[str, float]:
    """Mean image and global mean/std of the training crops, for normalisation.

    Summed from each shard's ``TrainSums`` in shard order (the workers computed their own).
    """
    sums = [r.train for r in results if r.train.total is not None]
    if not sums:
        return {"train_mean": float("nan"), "train_std": float("nan")}
    total = sums[0].total
    assert total is not None  # kept above: shards with training crops only
    for part in sums[1:]:
        total = total + part.total
    count = sum(part.count for part in sums)
    sq = sum(part.squares for part in sums)
    mean_image = (total / count).astype(np.float32)
    buf = _npy_bytes(mean_image)
    _atomic_write_bytes(cache_dir / "mean_image.npy", buf)
    mean = float(mean_image.mean())
    std = float(np.sqrt(max(sq / (count * mean_image.size) - mean**2, 0.0)))
    return {"train_mean": mean, "train_std": std}


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def prepare_cache(
    manifest: pd.DataFrame, split_of: pd.Series, cfg: DataConfig, out_dir: str | Path, *, progress: bool = True
) -> CacheSummary:
    """Build (or finish) the crop cache for the rows of ``manifest`` that have a split.

    Args:
        manifest: a conformed manifest (see ``mammo_ray.data.manifest``).
        split_of: split name per manifest row ("train"/"val"/"test", empty = not in a split).
        cfg: the data config; its crop fields decide the cache contents.
        out_dir: the cache directory. An existing cache with other parameters is an error.
    """
    start = time.perf_counter()
    cache_dir = Path(out_dir).resolve()
    (cache_dir / "shards").mkdir(parents=True, exist_ok=True)
    rows = _select_rows(manifest, split_of, cfg)
    if rows.empty:
        raise CacheError(f"{cache_dir}: no resolved manifest rows fall in a split; nothing to prepare")
    params, fingerprint = _fingerprint(cfg, rows.drop(columns=["keep"]))
    meta_path = cache_dir / "cache.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != fingerprint:
            changed = sorted(k for k in params if old.get("params", {}).get(k) != params[k]) or ["manifest rows"]
            raise CacheError(
                f"{cache_dir}: holds a cache built from other inputs (differs in {changed}); "
                "choose another --out or delete it"
            )
    else:
        # Written first so a resumed run can tell the shards on disk belong to these inputs.
        _atomic_write_bytes(meta_path, json.dumps({"fingerprint": fingerprint, "params": params}).encode())

    for stray in (cache_dir / "shards").glob("*.tmp*"):
        stray.unlink()  # half-written files of an interrupted run; their shards are redone below
    shards = _shards(rows, cfg.shard_images)
    todo = [i for i in range(len(shards)) if not _shard_done(cache_dir / "shards", i)]
    bar = tqdm(
        total=len(shards),
        initial=len(shards) - len(todo),
        desc=f"prepare {cfg.crop}",
        unit="shard",
        disable=not progress,
    )
    results: dict[int, ShardResult] = {}
    if todo:
        pool = ProcessPoolExecutor(max(1, min(cfg.num_workers, len(todo))), mp_context=worker_context())
        try:
            futures = {pool.submit(process_shard, i, shards[i], params, str(cache_dir), cfg.seed): i for i in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        finally:
            # Idle workers exit on their own; waiting for them cost 0.35 s of a 14 s replica prepare.
            pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    ordered = [results[i] if i in results else read_shard(cache_dir, i) for i in range(len(shards))]
    decoded = sum(r.decoded for r in ordered)

    index = pd.concat([r.table for r in ordered], ignore_index=True)[ENTRY_COLUMNS]
    index.insert(0, "entry", np.arange(len(index)))
    skipped = [item for r in ordered for item in r.skipped]
    counts = dict.fromkeys(STAT_KEYS, 0)
    for r in ordered:
        for key, value in r.stats.items():
            counts[key] += int(value)
    tmp = cache_dir / "index.parquet.tmp"
    index.to_parquet(tmp, index=False)
    tmp.replace(cache_dir / "index.parquet")
    stats = _training_statistics(cache_dir, ordered)

    seconds = time.perf_counter() - start
    by_split = {
        s: {str(k): int(v) for k, v in g["malignant"].value_counts().sort_index().items()}
        for s, g in index.groupby("split")
    }
    summary = CacheSummary(
        cache_dir=str(cache_dir),
        crop=cfg.crop,
        entries=len(index),
        images_decoded=decoded,
        shards_total=len(shards),
        shards_reused=len(shards) - len(todo),
        seconds=round(seconds, 3),
        images_per_second=round(decoded / seconds, 3) if decoded else 0.0,
        by_split=by_split,
        skipped=skipped,
        **counts,
    )
    meta = {"fingerprint": fingerprint, "params": params, **stats, "summary": summary.to_dict()}
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return summary
