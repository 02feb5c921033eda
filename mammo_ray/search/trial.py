"""A Tune trial that is one training run, tracked as a child MLflow run (Ray 2.60, Train V2).

A 1-worker trial (``in_process.runs_in_process``: ``train.num_workers: 1`` and
``train.in_process``, the default) trains in the trial's own process, which holds the
worker's CPUs and GPU share, and reports each epoch to Tune itself: no Ray Train start-up.

A multi-worker trial follows the V2 pattern: the trial is a function that builds and fits a
``TorchTrainer`` whose ``RunConfig`` carries ``TuneReportCallback``, so every epoch the Train
workers report reaches Tune (and its scheduler) as a trial result. The trial then only drives
the trainer and holds a sliver of a CPU (``search.TRIAL_CPU``); the Train workers hold the
cores (and fractional GPUs) the config gives them.

Names are stable across restarts: the training run's checkpoint folder and the MLflow run are named after the trial
id, so a trial restarted by ``mammo-ray tune --resume`` (or by Tune after a failure) continues its
training from the latest checkpoint and its MLflow run, instead of starting both again.

``CloseTrialRuns`` is a Tune callback in the driver. A trial that the scheduler stops early is
torn down without reaching the end of its ``TrackedRun``; the callback ends that MLflow run as
KILLED with the reason as a tag, and a trial that errored as FAILED, so no run is left RUNNING.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from mammo_ray import tags
from mammo_ray.config import Config
from mammo_ray.data.pipeline import PreparedData
from mammo_ray.search.cells import Cell, trial_config
from mammo_ray.train import storage
from mammo_ray.train.in_process import runs_in_process
from mammo_ray.train.run import run_training

PLAN_FILE = "mammo_ray_plan.json"


@dataclass
class PlanCell:
    """One cell of a plan: its grid values, its validated config and the data prepared for it."""

    cell: Cell
    config: Config  # the cell's config: the base config with the cell's values set
    prepared: PreparedData

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.cell.to_dict(),
            "config": self.config.model_dump(mode="json"),
            "prepared": self.prepared.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanCell:
        return cls(
            cell=Cell(**data["cell"]),
            config=Config.model_validate(data["config"]),
            prepared=PreparedData(**data["prepared"]),
        )


@dataclass
class Plan:
    """Everything a trial needs, fixed when the search (or ensemble) starts; saved as JSON so
    ``--resume`` rebuilds the same trials."""

    kind: str  # "search" or "ensemble"
    name: str  # experiment name: the Tune experiment folder and the prefix of run names
    workdir: str
    experiment_dir: str  # <train.storage_path>/<name>: a local folder or a URI (s3://, gs://)
    tracking_uri: str
    experiment: str  # MLflow experiment name
    parent_run_id: str
    metric: str
    mode: str  # "min" or "max": ``config.metric_mode(metric)``, for Tune's searcher and scheduler
    cells: dict[str, PlanCell] = field(default_factory=dict)  # cell key -> cell

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data (``mammo_ray_plan.json``, and what trials receive)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "workdir": self.workdir,
            "experiment_dir": self.experiment_dir,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "metric": self.metric,
            "mode": self.mode,
            "cells": {key: cell.to_dict() for key, cell in self.cells.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"plan: unknown keys {unknown}")
        cells = {key: PlanCell.from_dict(value) for key, value in data.get("cells", {}).items()}
        return cls(**{**data, "cells": cells})

    def cell_config(self, key: str) -> Config:
        return self.cells[key].config

    @property
    def output_dir(self) -> Path:
        """Where the leaderboard, evaluations and summaries are written: the experiment folder, or
        ``<workdir>/runs/<name>`` when that is on object storage (they are uploaded there at the end)."""
        if storage.is_uri(self.experiment_dir):
            return Path(self.workdir) / "runs" / self.name
        return Path(self.experiment_dir)


def run_name(plan: Plan, trial_id: str) -> str:
    return f"{plan.name}-{trial_id}"


def find_trial_run(client: MlflowClient, plan: Plan, trial_id: str) -> str | None:
    """The MLflow run of an earlier attempt of this trial, if any."""
    experiment = client.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        max_results=1,
        filter_string=f"tags.mlflow.parentRunId = '{plan.parent_run_id}' and tags.`{tags.TRIAL_ID}` = '{trial_id}'",
    )
    return runs[0].info.run_id if runs else None


def run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """The function trainable: one cell's config with this trial's values, trained here or with Ray Train."""
    plan_ = Plan.from_dict(plan)
    trial_id = tune.get_context().get_trial_id()
    cell = plan_.cells[params["cell"]]
    config = trial_config(cell.config, params, trial_id)
    trial_tags = {
        tags.TRIAL_ID: trial_id,
        tags.KIND: f"{plan_.kind}-trial",
        tags.CELL: params["cell"],
        tags.SEARCH: plan_.name,
    }
    client = MlflowClient(plan_.tracking_uri)
    previous = find_trial_run(client, plan_, trial_id)
    if previous is not None:
        done = client.get_run(previous)
        if done.info.status == "FINISHED" and done.data.tags.get(tags.CHECKPOINT):
            # It finished before the driver died, but Tune had not saved that yet (it writes its
            # state every few seconds): report the finished run's final metrics, do not train again.
            tune.report({**{k: float(v) for k, v in done.data.metrics.items()}, "mammo_ray_restored": 1.0})
            return
    in_process = runs_in_process(config)
    run_training(
        config,
        plan_.workdir,
        prepared=cell.prepared,
        parent_run_id=plan_.parent_run_id,
        run_name=run_name(plan_, trial_id),
        progress=False,
        callbacks=None if in_process else [TuneReportCallback()],
        extra_tags=trial_tags,
        resume_run_id=previous,
        in_process=in_process,
        report=tune.report,
    )


class CloseTrialRuns(Callback):
    """End the MLflow run of a trial that Tune stopped or lost, with an honest status."""

    def __init__(self, plan: Plan):
        self.uri, self.plan = plan.tracking_uri, plan

    def _close(self, trial: Any, status: str, reason: str) -> None:
        client = MlflowClient(self.uri)
        run_id = find_trial_run(client, self.plan, trial.trial_id)
        if run_id is None or client.get_run(run_id).info.status != "RUNNING":
            return  # finished by the trial itself, or never started
        client.set_tag(run_id, tags.STOP_REASON, reason)
        client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED", "stopped early by the search scheduler (ASHA)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", f"trial error: {trial.error_file or 'see the Tune trial folder'}")


def read_plan(experiment_dir: storage.Location) -> Plan:
    """The plan in a search or ensemble folder: a local one or a URI (s3://, gs://)."""
    path = storage.join(experiment_dir, PLAN_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{experiment_dir}: no {PLAN_FILE}; not a mammo-ray tune/ensemble folder")
    return Plan.from_dict(json.loads(storage.read_text(path)))


def write_plan(plan: Plan) -> storage.Location:
    path = storage.join(plan.experiment_dir, PLAN_FILE)
    storage.write_text(path, json.dumps(plan.to_dict(), indent=2))
    return path
