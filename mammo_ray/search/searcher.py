"""A Tune searcher and scheduler that keep the cells of a search apart.

``CellSearcher`` hands out trials round-robin over the cells, each cell with the same budget
(``tune.num_samples``) and its own ``OptunaSearch`` (TPE, or random for the benchmark's control),
seeded ``tune.seed + i``. One Optuna study over the categoricals too would spend most trials on
the combinations that look good early and starve the rest; a grid over the categoricals with
Optuna inside each cell answers paper 000's Table 1, which needs a tuned result in every cell.

``CellScheduler`` gives each cell its own ``AsyncHyperBandScheduler``, so a trial is stopped
only for being worse than trials of its own backbone and view mode at the same epoch. It never
stops a trial at its last epoch: that trial is finishing anyway, and stopping it would kill the
final evaluation its run still has to write.
"""

from __future__ import annotations

import pickle
from typing import Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from mammo_ray.config import TuneConfig

TIME_ATTR = "epochs_done"  # reported by every Train epoch; survives a trial restarting from a checkpoint


def optuna_space(t: TuneConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """Dropout uniform, learning rate and L2 log-uniform (the ranges of ``tune``)."""
    return {
        "model.dropout": optuna.distributions.FloatDistribution(*t.dropout),
        "optim.lr": optuna.distributions.FloatDistribution(*t.lr, log=True),
        "optim.weight_decay": optuna.distributions.FloatDistribution(*t.weight_decay, log=True),
    }


def _sampler(t: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if t.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Few trials per cell: start modelling after a third of them (Optuna's default waits for 10).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, t.num_samples // 3))


class CellSearcher(Searcher):
    """Round-robin over cells; inside a cell, its own seeded Optuna study."""

    def __init__(self, cells: list[str], t: TuneConfig, *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.cells = list(cells)
        self.budget = t.num_samples
        self.inner = {
            cell: OptunaSearch(space=optuna_space(t), metric=metric, mode=mode, sampler=_sampler(t, t.seed + i))
            for i, cell in enumerate(self.cells)
        }
        self.issued = {cell: 0 for cell in self.cells}
        self.trial_cell: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self.trial_cell:  # asked again for the same trial
            return self._suggest_in(self.trial_cell[trial_id], trial_id)
        open_cells = [cell for cell in self.cells if self.issued[cell] < self.budget]
        if not open_cells:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's sentinel string; its annotation omits it
        cell = min(open_cells, key=lambda c: (self.issued[c], self.cells.index(c)))
        self.issued[cell] += 1
        self.trial_cell[trial_id] = cell
        return self._suggest_in(cell, trial_id)

    def _suggest_in(self, cell: str, trial_id: str) -> dict[str, Any] | None:
        values = self.inner[cell].suggest(trial_id)
        if not isinstance(values, dict):  # None (nothing to suggest yet) or Ray's sentinel: passed on as is
            return values
        return {"cell": cell, **values}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.trial_cell and self.metric in result:
            self.inner[self.trial_cell[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.trial_cell:
            self.inner[self.trial_cell[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class CellScheduler(FIFOScheduler):
    """One ASHA per cell (``tune.scheduler: asha``), or none (``fifo``)."""

    def __init__(self, t: TuneConfig, *, metric: str, mode: str, max_epochs: int):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.asha = t.scheduler == "asha"
        self.options: dict[str, Any] = dict(
            time_attr=TIME_ATTR,
            metric=metric,
            mode=mode,
            max_t=max_epochs,
            grace_period=min(t.grace_period, max_epochs),
            reduction_factor=t.reduction_factor,
            stop_last_trials=False,
        )
        self.max_epochs = max_epochs
        self.by_cell: dict[str, AsyncHyperBandScheduler] = {}
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # set at construction, from the config

    def _inner(self, trial: Any) -> AsyncHyperBandScheduler | None:
        if not self.asha:
            return None
        cell = trial.config.get("cell", "")
        if cell not in self.by_cell:
            self.by_cell[cell] = AsyncHyperBandScheduler(**self.options)
        return self.by_cell[cell]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        inner = self._inner(trial)
        if inner is not None:
            inner.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        inner = self._inner(trial)
        if inner is None or trial.trial_id not in inner._trial_info:
            return TrialScheduler.CONTINUE
        decision = inner.on_trial_result(tune_controller, trial, result)
        if result.get(TIME_ATTR, 0) >= self.max_epochs:
            return TrialScheduler.CONTINUE  # finishing anyway: let it write its final evaluation
        if decision == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        inner = self._inner(trial)
        if inner is not None and trial.trial_id in inner._trial_info:
            inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        inner = self._inner(trial)
        if inner is not None:
            inner._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        if not self.asha:
            return "Using FIFO scheduling (no early stopping)."
        return f"Using one AsyncHyperBand per cell ({len(self.by_cell)} cells): stopped {len(self.stopped)} trials."
