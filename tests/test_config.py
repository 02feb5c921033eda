"""Config: YAML + overrides, unknown keys and wrong types named, saved config round-trips."""

import pytest
import yaml

from mammo_ray.config import Config, ConfigError, flatten, load_config, save_config


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.crop == "proportional"
    assert cfg.data.split_fractions == (0.8, 0.1, 0.1)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  crop: fixed\n  cache_px: 128\n  input_px: 112\nmodel:\n  name: alexnet\n")
    cfg = load_config(path, ["data.fixed_pad_px=30", "optim.lr=0.01", "data.synth_size=[256, 128]"])
    assert cfg.data.crop == "fixed"
    assert cfg.data.fixed_pad_px == 30
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.data.synth_size == (256, 128)
    assert cfg.model.name == "alexnet"


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("data:\n  cropp: fixed\n", [], "unknown key 'data.cropp'"),
        ("nonsense:\n  a: 1\n", [], "unknown key 'nonsense'"),
        ("", ["data.cache_px=big"], "data.cache_px"),
        ("", ["data.crop=round"], "data.crop"),
        ("", ["train.epochs=0"], "train.epochs"),
        ("", ["data.split_fractions=[0.5, 0.1, 0.1]"], "sum to 1"),
        ("", ["data.input_px=512"], "must not exceed data.cache_px"),
        ("", ["data"], "expected section.key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)
    assert str(path) in str(err.value) or "--set" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["data.crop=patch", "model.dropout=0.25"])
    saved = save_config(cfg, tmp_path / "out")
    assert load_config(saved) == cfg
    assert yaml.safe_load(saved.read_text())["data"]["crop"] == "patch"
    assert flatten(cfg)["model.dropout"] == 0.25


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
    assert configs, "tune_configs/ has no YAML"
    for path in configs:
        load_config(path)


GPU_RANKS = ["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.5"]


@pytest.mark.parametrize(
    "overrides",
    [GPU_RANKS, ["train.use_gpu=true", "train.num_workers=4", "train.gpus_per_worker=0.25"]],
)
def test_two_ranks_on_one_gpu_are_refused_with_nccls_reason(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "train.num_workers=" in message and "train.gpus_per_worker=" in message  # the values that clash
    assert "NCCL" in message and "Duplicate GPU detected" in message  # why
    assert "use train.gpus_per_worker=1, or train.num_workers=1" in message  # the two ways out


@pytest.mark.parametrize(
    "overrides, workers, gpus",
    [
        (["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=1"], 2, 1.0),  # a GPU per rank
        (["train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.25"], 1, 0.25),  # trials share GPUs
        (["train.use_gpu=false", "train.num_workers=2", "train.gpus_per_worker=0.5"], 2, 0.5),  # CPU ranks
        ([*GPU_RANKS, "train.shared_gpu_ranks=true"], 2, 0.5),  # the override, for gloo (benchmarks/gpu_check.py)
    ],
)
def test_gpu_layouts_nccl_accepts_and_the_explicit_override_load(overrides, workers, gpus):
    train = load_config(None, overrides).train
    assert (train.num_workers, train.gpus_per_worker) == (workers, gpus)
