"""The cells of a search: every backbone x view mode x augmentation combination of the config.

Paper 000 (see docs/papers.md) compares five backbones, each trained in the multi-modal and parallel view modes with
and without augmentation (its Table 1), and tunes dropout, learning rate and L2. Here the
categorical axes form a grid; each cell gets the same number of trials and its own seeded
Optuna study over the continuous axes (``searcher.CellSearcher``), so no combination is starved
and a weak backbone never steals another's trials.

A cell's config is the base config with the cell's values set. A trial's config is its cell's
config with the sampled values set (``trial_config``). Both are validated, so an impossible
combination (a 9-channel model on 3-channel crops, a paired view mode for patch data) is an
error naming the cell before anything runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mammo_ray.config import Config, ConfigError, with_values
from mammo_ray.models.registry import list_models

SEARCHED = ("model.dropout", "optim.lr", "optim.weight_decay")  # the continuous axes (paper 000)
AS_CONFIGURED = "as-configured"  # augmentation left as the base config has it


@dataclass(frozen=True)
class Cell:
    backbone: str
    view_mode: str
    augment: str  # "on", "off" or AS_CONFIGURED

    @property
    def key(self) -> str:
        return f"{self.backbone}-{self.view_mode}-aug_{self.augment}"

    @property
    def column(self) -> str:
        """The leaderboard column group: view mode and augmentation (paper 000's Table 1)."""
        aug = {"on": "w/ aug", "off": "w/o aug"}.get(self.augment, "")
        return f"{self.view_mode} {aug}".strip()

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def make_cells(config: Config) -> list[tuple[Cell, Config]]:
    """Every cell of ``config.tune`` with its validated config, in grid order."""
    t = config.tune
    backbones = t.backbones or [config.model.name]
    unknown = sorted(set(backbones) - set(list_models()))
    if unknown:
        raise ConfigError(f"tune.backbones: unknown model(s) {unknown}; registered: {list_models()}")
    missing = sorted(set(t.backbone_overrides) - set(backbones))
    if missing:
        raise ConfigError(f"tune.backbone_overrides: {missing} not in tune.backbones {backbones}")
    view_modes = t.view_modes or [config.model.view_mode]
    augments: list[str] = list(t.augment) if t.augment else [AS_CONFIGURED]
    if (
        len(set(backbones)) != len(backbones)
        or len(set(view_modes)) != len(view_modes)
        or len(set(augments)) != len(augments)
    ):
        raise ConfigError("tune.backbones, tune.view_modes and tune.augment must not repeat a value")
    cells = []
    for backbone in backbones:
        for view_mode in view_modes:
            for augment in augments:
                cell = Cell(backbone, view_mode, augment)
                values: dict[str, Any] = {
                    "model.name": backbone,
                    "model.view_mode": view_mode,
                    "train.monitor": t.metric,
                }  # the kept checkpoints are the ones ranked
                if augment != AS_CONFIGURED:
                    values.update(t.augment_on if augment == "on" else t.augment_off)
                values.update(t.backbone_overrides.get(backbone, {}))
                cells.append((cell, with_values(config, values, f"search cell {cell.key}")))
    return cells


def trial_config(cell_config: Config, params: dict[str, Any], trial: str) -> Config:
    """A trial's config: its cell's config with the trial's sampled (or seed) values set."""
    values = {key: value for key, value in params.items() if key != "cell"}
    return with_values(cell_config, values, f"trial {trial}")
