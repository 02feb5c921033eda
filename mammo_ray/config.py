"""One typed, validated config: data, model, optim, train and tune sections.

Loaded from the YAML files in ``tune_configs/`` and overridden on the command line with
``--set section.key=value``. Unknown keys and wrong types are errors that name the key.
The resolved config is written beside every output it produced (``save_config``), so a
run is fully described by its config and seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    source: Literal["synthetic", "cbis-ddsm", "generic"] = "synthetic"  # where images come from
    root: str | None = None  # image tree (CBIS-DDSM download); synthetic: made in the workdir
    csv_dir: str | None = None  # CBIS-DDSM case-description CSVs; defaults to root
    generic_csv: str | None = None  # generic manifest CSV (source: generic)
    anonymize: bool = False  # keyed pseudonyms for patient IDs and image paths in the manifest (data/anonymize.py)
    private_dir: str | None = None  # the key and links for anonymize, outside the workdir; default ~/.mammo-ray/private
    synth_patients: int = Field(60, ge=2)  # synthetic patients (with synth_from_csv: the first N real patient ids)
    synth_size: tuple[int, int] = (832, 512)  # synthetic full-field image (H, W); ~(5000, 3000) is full size
    synth_layout: Literal["csv", "tcia"] = "csv"  # folder layout of the synthetic tree
    synth_from_csv: str | None = None  # "cbis-ddsm" (the shipped real CSVs) or a CSV folder: replicate those rows
    split_seed: int | None = None  # seeds the patient split; None: data.seed (vary splits on one dataset)
    seed: int = 0  # seeds synthesis, splits and the offline augmentation
    abnormality: Literal["mass", "calcification", "all"] = "mass"  # rows kept before splitting
    task: Literal["pathology", "abnormality", "mass_presence"] = "pathology"  # what the label means
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test, by patient
    split: Literal["patient", "official"] = "patient"  # official: the dataset's own test set, val from its train
    balance_eval: bool = False  # class-balanced val and test (paper 001)
    folds: int | None = Field(None, ge=2)  # k patient folds (paper 004)
    crop: Literal["seed750", "fixed", "proportional", "patch", "whole"] = "proportional"
    seed_crop_px: int = Field(750, ge=8)  # side of the seed750 box, in full-image pixels (paper 000)
    fixed_pad_px: int = Field(50, ge=0)  # padding around the mask box for `fixed` (paper 001)
    proportional_factor: float = Field(2.0, ge=1.0)  # box scale for `proportional` (paper 001)
    square_boxes: bool = True  # widen the short side of a box instead of distorting the lesion
    patch_px: int = Field(256, ge=8)  # side of `patch` crops, in full-image pixels (paper 003)
    negatives_per_image: int = Field(2, ge=0)  # non-mass patches drawn per image for `patch`
    whole_size: tuple[int, int] = (640, 384)  # `whole` images are letterboxed to this (H, W)
    cache_px: int = Field(256, ge=8)  # side crops are stored at (the "resize to 256" of paper 000)
    input_px: int = Field(224, ge=8)  # network input side: random crop in training, centre crop at eval
    # per-crop z-score, train mean image, or train mean/std (translation-invariant: dense maps, paper 003)
    normalization: Literal["meanvar", "mean_image", "global"] = "meanvar"
    rotation_deg: int = Field(0, ge=0, le=180)  # random integer rotation in [-deg, deg], mean fill
    hflip: bool = True  # random horizontal mirroring in training
    vflip: bool = False  # random vertical mirroring in training
    offline_aug: bool = False  # paper 001's 25x: 5 rotations x 5 crops per training image
    channels: Literal[1, 3] = 3  # 3 replicates grayscale for ImageNet backbones
    max_dim: int = Field(10_000, ge=64)  # reject DICOMs larger than this per side, before decoding
    num_workers: int = Field(2, ge=0)  # processes for prepare and data loading
    shard_images: int = Field(16, ge=1)  # source images per cache shard
    scale_aug: tuple[float, float] | None = None  # random zoom range (min, max) in training (paper 003: scale)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"data.split_fractions must sum to 1, got {self.split_fractions}")
        if self.input_px > self.cache_px:
            raise ValueError(f"data.input_px ({self.input_px}) must not exceed data.cache_px ({self.cache_px})")
        if self.source != "synthetic" and not (self.root or self.generic_csv):
            raise ValueError(f"data.root (or data.generic_csv) is required for data.source={self.source!r}")
        return self


class ModelConfig(_Section):
    name: str = "resnet18"  # a registered model name
    view_mode: Literal["single", "parallel", "multimodal"] = "single"  # paper 000 view modes
    in_chans: Literal[1, 3, 9] = 3  # 9 = image + 8 DoG channels (paper 000)
    num_classes: int = Field(2, ge=2)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    pretrained: str | None = None  # local torchvision state dict, or "imagenet" (TORCH_HOME cache); None: scratch
    # Fine-tuning policy (papers 001, 004). None: every layer at the base LR.
    train_last: int | None = Field(None, ge=0)  # the last N trunk groups at full LR; earlier ones x early_lr_mult
    early_lr_mult: float = Field(0.1, ge=0)  # 0 freezes the earlier groups (paper 004's frozen trunk)
    head_lr_mult: float = Field(1.0, gt=0)  # new classifier weights (paper 001: x10, paper 004: x20)
    head_bias_lr_mult: float = Field(1.0, gt=0)  # new classifier bias (paper 001: x20)


class OptimConfig(_Section):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)  # L2
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["exponential", "poly", "constant"] = "exponential"
    gamma: float = Field(0.99, gt=0, le=1)  # per-epoch decay for `exponential` (paper 000)
    poly_power: float = Field(0.5, gt=0)  # power for `poly` (paper 001)


# Validation metrics that pick checkpoints and trials. ``val_loss`` / ``val_auc`` are the view
# mode's primary level (per image for single, per exam for parallel and multimodal); ``val_exam_loss``
# is per exam in every view mode, so it compares models across view modes (``loop.summarize_predictions``).
SelectionMetric = Literal["val_exam_loss", "val_loss", "val_auc"]


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether lower (a loss) or higher (an AUC, an accuracy) is better: the one place that decides."""
    return "min" if metric.endswith("loss") else "max"


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per Ray Train worker
    seed: int = 0  # seeds weights, sampling and augmentation (the same on every rank)
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data parallel)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)  # fractional GPUs let small models share one
    # Allows num_workers > 1 with a fractional GPU each. NCCL, the GPU backend of the platform's trainers, refuses
    # two ranks on one GPU; set it only where the caller picks a backend that allows it (gloo: benchmarks/gpu_check.py)
    shared_gpu_ranks: bool = False
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # mixed precision, used on GPU only
    channels_last: bool = False  # NHWC memory format (faster convolutions on tensor cores)
    balanced_sampling: bool = False  # draw each class equally often in training
    monitor: SelectionMetric = "val_loss"  # picks the best checkpoint and drives early stopping (not in --folds)
    early_stop_patience: int | None = Field(None, ge=1)  # epochs without improvement before stopping
    stop_train_acc: float | None = Field(None, gt=0, le=1)  # paper 004: stop at this mean train accuracy ...
    stop_train_window: int = Field(50, ge=1)  # ... over the last N batches
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the latest checkpoint
    # A 1-worker search trial, ensemble member or --folds fold trains in its own Ray process, which holds the
    # worker's CPUs and GPU share, without a TorchTrainer's ~15 s start-up (train/in_process.py); false: always
    # a TorchTrainer. `mammo-ray train` always uses a TorchTrainer.
    in_process: bool = True
    keep_checkpoints: int = Field(2, ge=1)  # best ones by `monitor` (the latest is kept too, for resuming)
    eval_bootstrap: int = Field(1000, ge=0)  # bootstrap resamples for the final AUC CI
    plots: bool = True  # the final evaluation's PNGs (ROC, confusion, curves, reliability, PR, referral)
    # The network as an MLflow logged model of the run (the UI's Model column, mlflow.pytorch.load_model); the
    # checkpoint is logged as an artifact either way
    log_model: bool = True
    # Ray Train/Tune storage (checkpoints, trial state, --resume): an absolute folder, or s3://bucket/prefix,
    # gs://bucket/prefix, file:///folder (train/storage.py); <workdir>/ray_results when unset
    storage_path: str | None = None
    mlflow_uri: str | None = None  # tracking URI; else $MLFLOW_TRACKING_URI, else sqlite in <workdir>/mlflow
    experiment: str = "mammo-ray"  # MLflow experiment name

    @model_validator(mode="after")
    def _check_gpu_sharing(self) -> TrainConfig:
        """Ray packs fractional GPU shares onto one device, so two ranks of one data-parallel run would meet on the
        same GPU, and NCCL stops the run there ("Duplicate GPU detected"). Searches and ensembles share GPUs
        between 1-worker trials instead."""
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1 and not self.shared_gpu_ranks:
            raise ValueError(
                f"train.num_workers={self.num_workers} with train.gpus_per_worker={self.gpus_per_worker} can put "
                "two ranks of one run on one GPU, which NCCL refuses ('Duplicate GPU detected'): use "
                "train.gpus_per_worker=1, or train.num_workers=1 to share GPUs between trials"
            )
        return self

    @field_validator("storage_path")
    @classmethod
    def _storage_location(cls, value: str | None) -> str | None:
        """Every Ray process resolves the path on its own node and from its own working directory, so a
        relative one lands in a different place (or fails obscurely): absolute, or a URI Ray reads."""
        if value is None:
            return None
        scheme, uri, rest = value.partition("://")
        if not uri:
            if not Path(value).is_absolute():
                raise ValueError(
                    f"must be an absolute folder or a URI (s3://bucket/prefix, gs://bucket/prefix, file:///folder), "
                    f"got the relative path {value!r}"
                )
            return value
        if scheme not in ("s3", "gs", "file"):
            raise ValueError(f"{value!r}: the URI schemes Ray storage takes here are s3://, gs:// and file://")
        if "?" in value or not rest.strip("/") or (scheme == "file" and not rest.startswith("/")):
            raise ValueError(
                f"{value!r}: expected s3://bucket/prefix, gs://bucket/prefix or file:///absolute/folder, without "
                "query options (an S3-compatible endpoint comes from $AWS_ENDPOINT_URL)"
            )
        return value.rstrip("/")


AUGMENT_OFF = {"data.hflip": False, "data.vflip": False, "data.rotation_deg": 0, "data.offline_aug": False}
AUGMENT_ON = {"data.hflip": True, "data.vflip": True, "data.rotation_deg": 25}


class TuneConfig(_Section):
    """``mammo-ray tune``: a grid over the categorical axes, with its own Optuna study in each cell."""

    backbones: list[str] | None = None  # models searched; None: model.name only
    view_modes: list[Literal["single", "parallel", "multimodal"]] | None = None  # None: model.view_mode only
    augment: list[Literal["on", "off"]] | None = None  # None: the config's own augmentation settings
    augment_on: dict[str, Any] = AUGMENT_ON  # what "on" sets (dotted keys, as with --set)
    augment_off: dict[str, Any] = AUGMENT_OFF  # what "off" sets
    backbone_overrides: dict[str, dict[str, Any]] = {}  # e.g. inception_v3: {data.input_px: 299, ...}
    num_samples: int = Field(4, ge=1)  # trials per cell (every cell gets the same budget)
    dropout: tuple[float, float] = (0.0, 0.6)  # uniform
    lr: tuple[float, float] = (1e-5, 1e-2)  # log-uniform
    weight_decay: tuple[float, float] = (1e-7, 1e-3)  # log-uniform (L2)
    algorithm: Literal["tpe", "random"] = "tpe"  # Optuna sampler per cell (random: the benchmark's control)
    scheduler: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs all train.epochs
    metric: SelectionMetric = "val_exam_loss"  # drives Optuna and ASHA and picks each cell's best trial; the
    # best config overall is always the cell winner with the lowest val_exam_loss (one level for every view mode)
    max_concurrent_trials: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1)  # ASHA: epochs before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA: keep the top 1/rf at each rung
    seed: int = 0  # seeds the samplers (cell i uses seed + i)
    baseline: bool = True  # add the texture + LDA row (paper 000 §2.4) to the leaderboard

    @field_validator("augment", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:  # YAML 1.1 reads a bare on/off as a boolean
        if isinstance(value, list):
            return [{True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> TuneConfig:
        for name in ("dropout", "lr", "weight_decay"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"tune.{name}: low ({low}) must be below high ({high})")
        if self.lr[0] <= 0 or self.weight_decay[0] <= 0:
            raise ValueError("tune.lr and tune.weight_decay are searched log-uniformly: their lows must be > 0")
        if not (0 <= self.dropout[0] and self.dropout[1] < 1):
            raise ValueError(f"tune.dropout must lie in [0, 1), got {self.dropout}")
        return self


class EnsembleConfig(_Section):
    """``mammo-ray ensemble`` (paper 000): members that differ only in ``train.seed``."""

    members: int = Field(100, ge=1)
    seed_start: int = 0  # member i trains with train.seed = seed_start + i
    max_concurrent_trials: int = Field(4, ge=1)  # members in flight at once (Ray packs them by resources)
    split: Literal["val", "test"] = "test"  # where the ensemble is compared with its members
    # Each member's own evaluation PNGs (train.plots for the members). Off: the ensemble draws its own, and six
    # plots cost a member about 2 s of CPU, most of its fixed cost (benchmarks/bench_tune.py --part members).
    member_plots: bool = False
    # Each member's own MLflow logged model (train.log_model for the members). Off: the ensemble is registered as one
    # model whose tags name every member's run and checkpoint; a member's logged model cost it about 0.1-0.25 s,
    # a sixth of a small member's fixed cost (bench_tune.py --part members)
    member_models: bool = False
    registered_model: str = "mammo-ray-ensemble"  # MLflow model registry name
    alias: str | None = "champion"  # registry alias moved to each new version (models:/<name>@<alias>); null: none

    @field_validator("alias")
    @classmethod
    def _check_alias(cls, value: str | None) -> str | None:
        """MLflow's alias rules, checked before any member trains: letters, digits, _ and -; not
        ``latest`` and not ``v<number>`` (both name versions)."""
        if value is None:
            return None
        if not re.fullmatch(r"[\w\-]{1,255}", value) or value.lower() == "latest" or re.fullmatch(r"v\d+", value):
            raise ValueError(
                f"ensemble.alias {value!r}: an MLflow alias is 1-255 letters, digits, '_' or '-', and not "
                "'latest' or 'v<number>' (reserved for versions)"
            )
        return value


class DecisionsConfig(_Section):
    """How probabilities become decisions (``mammo_ray.decisions``): all fitted on the validation split only."""

    calibration: Literal["temperature", "isotonic", "none"] = "temperature"  # post-hoc calibration
    referral_rate: float = Field(0.10, ge=0, lt=1)  # share of validation cases above the referral cut-off
    referral_measure: Literal["entropy", "mutual_information", "std"] = "entropy"  # ranks cases for referral
    ece_bins: int = Field(10, ge=2)  # equal-mass bins of the ECE and the reliability diagram


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    decisions: DecisionsConfig = DecisionsConfig()

    @model_validator(mode="after")
    def _check_model_input(self) -> Config:
        expected = 1 if self.model.in_chans in (1, 9) else 3  # a 9-channel model makes its DoG channels itself
        if self.data.channels != expected:
            raise ValueError(
                f"data.channels ({self.data.channels}) must be {expected} for model.in_chans={self.model.in_chans}"
            )
        if self.model.view_mode != "single" and self.data.task == "mass_presence":
            raise ValueError(
                "model.view_mode must be 'single' for data.task=mass_presence: non-mass patches have no CC/MLO partner"
            )
        return self


class ConfigError(ValueError):
    """A config file or override that is unreadable, has an unknown key, or a wrong type."""


def _format_validation(error: ValidationError, origin: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            parts.append(f"{key}: {item['msg']}")
    return f"{origin}: " + "; ".join(parts)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to a nested dict; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    path = key.strip().split(".")
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[path[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(tree, assignment)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, origin)) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain-data form of the config (tuples as lists), for YAML, JSON and MLflow params."""
    return config.model_dump(mode="json")


def save_config(config: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside an output, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = target.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    tmp.replace(target)
    return target


def flatten(config: Config) -> dict[str, Any]:
    """``{"data.crop": "proportional", ...}``: the form MLflow params and tables use."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def with_values(config: Config, values: dict[str, Any], origin: str) -> Config:
    """A copy of ``config`` with dotted keys set (``{"model.dropout": 0.3}``), validated again.

    ``origin`` names where the values came from (a search cell, a trial) in the error message.
    """
    tree = config_to_dict(config)
    for key, value in values.items():
        section, _, name = key.partition(".")
        if not name or section not in tree or not isinstance(tree[section], dict):
            raise ConfigError(f"{origin}: {key!r} is not a section.key of the config")
        tree[section][name] = value
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, origin)) from None
