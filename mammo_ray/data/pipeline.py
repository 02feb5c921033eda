"""From a config to a prepared crop cache: synthesize (if synthetic), index, split, prepare.

Every step writes under the work directory and is reused when its output exists, so any
command can start from a clean checkout and the second run starts where the first ended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mammo_ray.config import Config, DataConfig, save_config
from mammo_ray.data.anonymize import anonymize_manifest, default_private_dir, open_private_dir
from mammo_ray.data.cache import prepare_cache
from mammo_ray.data.index import index_dataset
from mammo_ray.data.manifest import MANIFEST_FORMAT, read_manifest, write_manifest
from mammo_ray.data.shard_worker import CACHE_FORMAT, CROP_FIELDS
from mammo_ray.data.splits import Splits, make_splits
from mammo_ray.data.synthetic import csv_source, synthesize


@dataclass(frozen=True)  # never changed once made; hashable, so per-process memos can key on it
class PreparedData:
    dataset_dir: str  # image tree (synthetic or the user's)
    manifest: str
    index_report: str
    splits: str
    cache_dir: str
    rows: int
    resolved: int
    entries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def dataset_key(cfg: DataConfig, *, images_only: bool = False) -> str:
    """A folder name that changes whenever the source data would (``images_only``: the image tree, which
    anonymisation leaves as it is)."""
    if cfg.source == "synthetic":
        h, w = cfg.synth_size
        key = f"synthetic-p{cfg.synth_patients}-s{cfg.seed}-{h}x{w}-{cfg.synth_layout}"
        if cfg.synth_from_csv is not None:  # a replica of real CSV rows
            name = "cbis" if cfg.synth_from_csv == "cbis-ddsm" else _short_hash(str(Path(cfg.synth_from_csv).resolve()))
            key = f"replica-{name}-" + key.removeprefix("synthetic-")
    else:
        key = f"{cfg.source}-{_short_hash([cfg.root, cfg.csv_dir, cfg.generic_csv])}"
    if cfg.anonymize and not images_only:  # another key gives other pseudonyms: its own index, splits, cache
        key += f"-anon{_short_hash(str(private_dir_of(cfg)))[:6]}"
    return key


def private_dir_of(cfg: DataConfig) -> Path:
    """Where ``data.anonymize`` keeps its key and links."""
    return Path(cfg.private_dir).expanduser().resolve() if cfg.private_dir else default_private_dir()


def ensure_dataset(cfg: DataConfig, workdir: Path, *, progress: bool = True) -> Path:
    """The image root: the synthetic dataset is made once in the workdir; real data is used in place."""
    if cfg.source != "synthetic":
        if cfg.root:
            return Path(cfg.root).resolve()
        assert cfg.generic_csv is not None  # DataConfig requires root or generic_csv for a real source
        return Path(cfg.generic_csv).parent.resolve()
    out = workdir / "datasets" / dataset_key(cfg, images_only=True)
    if not (out / "synth.json").is_file():
        from_csv = csv_source(cfg.synth_from_csv) if cfg.synth_from_csv is not None else None
        summary = synthesize(
            out,
            patients=cfg.synth_patients,
            seed=cfg.seed,
            size=cfg.synth_size,
            layout=cfg.synth_layout,
            from_csv=from_csv,
            progress=progress,
            workers=max(1, cfg.num_workers),
        )
        (out / "synth.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return out


def ensure_manifest(cfg: DataConfig, root: Path, workdir: Path, *, progress: bool = True) -> tuple[Path, Path]:
    """Index the dataset once; return the manifest and the index report paths."""
    folder = workdir / "index" / f"{dataset_key(cfg)}-{MANIFEST_FORMAT}"  # a new format re-indexes
    manifest_path, report_path = folder / "manifest.parquet", folder / "index_report.json"
    # Checked on every run, before indexing: a key in the workdir would travel with what is shared.
    pseudo = open_private_dir(private_dir_of(cfg), workdir) if cfg.anonymize else None
    if not manifest_path.is_file():
        csv_dir = None if cfg.source == "generic" else (cfg.csv_dir or root)
        frame, indexed = index_dataset(
            root=root,
            csv_dir=csv_dir,
            generic_csv=cfg.generic_csv,
            progress=progress,
            workers=max(1, cfg.num_workers),
        )
        report = indexed.to_dict()
        if pseudo is not None:
            frame, report = anonymize_manifest(frame, pseudo, report)
        folder.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, default=str))
        write_manifest(frame, manifest_path)
    return manifest_path, report_path


def rows_for(cfg: DataConfig, manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows of the configured abnormality type (all rows for ``all``)."""
    if cfg.abnormality == "all":
        return manifest
    return manifest[manifest["abnormality_type"].str.upper().str.startswith(cfg.abnormality[:4].upper())]


def ensure_splits(cfg: DataConfig, manifest_path: Path, workdir: Path) -> Path:
    """Split every patient of the manifest once per (fractions, seed, mode, balance, folds).

    The split does not depend on ``data.abnormality``: strata carry each patient's abnormality
    types (``splits.composition_strata``), so val and test get their share of mass patients, and
    a mass model and an all-abnormality model with the same seed have the same test patients
    (``froc --classifier`` never scores one model on the other's training images).
    """
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    params = {
        "fractions": list(cfg.split_fractions),
        "seed": seed,
        "balance_eval": cfg.balance_eval,
        "folds": cfg.folds,
        "mode": cfg.split,
    }
    path = workdir / "splits" / f"{dataset_key(cfg)}-{_short_hash(params)}.json"
    if not path.is_file():
        rows = read_manifest(manifest_path)
        if rows_for(cfg, rows).empty:
            raise ValueError(f"{manifest_path}: no {cfg.abnormality} rows to split (data.abnormality)")
        splits = make_splits(
            rows,
            fractions=cfg.split_fractions,
            seed=seed,
            balance_eval=cfg.balance_eval,
            folds=cfg.folds,
            mode=cfg.split,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        splits.save(path)
    return path


def cache_dir_for(cfg: DataConfig, splits_path: Path, workdir: Path) -> Path:
    params = {name: getattr(cfg, name) for name in CROP_FIELDS} | {
        "abnormality": cfg.abnormality,
        "splits": splits_path.name,
        "cache_format": CACHE_FORMAT,
    }
    return workdir / "cache" / f"{dataset_key(cfg)}-{cfg.crop}-{_short_hash(params)}"


def ensure_prepared(config: Config, workdir: str | Path, *, progress: bool = True) -> PreparedData:
    """Run every data step the config needs, reusing what the workdir already holds."""
    workdir = Path(workdir).resolve()
    cfg = config.data
    root = ensure_dataset(cfg, workdir, progress=progress)
    manifest_path, report_path = ensure_manifest(cfg, root, workdir, progress=progress)
    splits_path = ensure_splits(cfg, manifest_path, workdir)
    cache_dir = cache_dir_for(cfg, splits_path, workdir)
    manifest = read_manifest(manifest_path)
    if not (cache_dir / "index.parquet").is_file():
        splits = Splits.load(splits_path)
        prepare_cache(manifest, splits.assign(manifest), cfg, cache_dir, progress=progress)
        save_config(config, cache_dir)
    entries = len(pd.read_parquet(cache_dir / "index.parquet", columns=["shard"]))
    return PreparedData(
        dataset_dir=str(root),
        manifest=str(manifest_path),
        index_report=str(report_path),
        splits=str(splits_path),
        cache_dir=str(cache_dir),
        rows=len(manifest),
        resolved=int(manifest["resolved"].sum()),
        entries=entries,
    )
