"""The console of a search or an ensemble: one line when a trial starts, one per epoch, one when it ends.

Tune's own reporter prints a configuration table per trial and a full metrics table per result; a
person reads a few hundred lines of tables as noise, or as failures. ``TrialLines`` prints what a
person follows instead, from the driver (the trials' own output stays in Ray's worker logs):

    trial 1/8 levynet-single-aug_as-configured started: dropout 0.274, lr 0.00269, weight_decay 3e-05
    trial 1/8 levynet-single-aug_as-configured epoch 1/2: train loss 5.528 | val loss 0.858 AUC 0.250 | 193 images/s
    trial 1/8 levynet-single-aug_as-configured done after 2/2 epochs (29 s)

A trial that fails is reported on stderr with its error's last line and the file that holds the
traceback; errors stay loud.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

SAMPLED = ("model.dropout", "optim.lr", "optim.weight_decay", "train.seed")


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class TrialLines(Callback):
    """Tune callback: a start line, an epoch line per result, an end line per trial (stdout); failures on stderr.

    Args:
        total: the trials the run will have (for "trial 3/8").
        epochs: the epochs a trial runs at most (``train.epochs``).
        what: what a trial is called: ``trial`` for a search, ``member`` for an ensemble.
    """

    def __init__(self, total: int, epochs: int, what: str = "trial") -> None:
        self.total, self.epochs, self.what = total, epochs, what
        self.numbers: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def _label(self, trial: Any) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        cell = (trial.config or {}).get("cell", "")
        name = f"{self.what} {number}/{self.total}"
        if cell and cell != "member":
            name += f" {cell}"
        seed = (trial.config or {}).get("train.seed")
        return name + (f" (seed {seed})" if self.what == "member" and seed is not None else "")

    @staticmethod
    def _print(text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        sampled = ", ".join(
            f"{key.split('.')[-1]} {_number(trial.config[key])}"
            for key in SAMPLED
            if key in (trial.config or {}) and key != "train.seed"
        )
        self._print(f"{self._label(trial)} started" + (f": {sampled}" if sampled else ""))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("epochs_done", result.get("training_iteration", 0)))
        parts = []
        if "train_loss" in result:
            parts.append(f"train loss {result['train_loss']:.3f}")
        if "val_loss" in result:
            val = f"val loss {result['val_loss']:.3f}"
            if "val_auc" in result:
                val += f" AUC {result['val_auc']:.3f}"
            parts.append(val)
        if "train_images_per_s" in result:
            parts.append(f"{result['train_images_per_s']:.0f} images/s")
        self._print(f"{self._label(trial)} epoch {epoch}/{self.epochs}: " + " | ".join(parts))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epochs_done", 0))
        seconds = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        how = "done after" if epochs >= self.epochs else "stopped early (ASHA or early stopping) after"
        self._print(f"{self._label(trial)} {how} {epochs}/{self.epochs} epochs ({seconds:.0f} s)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        where = trial.error_file or trial.path
        message = ""
        if trial.error_file:
            try:
                with open(trial.error_file) as handle:
                    lines = [line.strip() for line in handle if line.strip()]
                message = f": {lines[-1]}" if lines else ""
            except OSError:
                pass
        self._print(f"{self._label(trial)} FAILED{message} (traceback: {where})", error=True)
