"""A Tune trial that is one Ray Train run, tracked as a child MLflow run (Ray 2.60, Train V2).

The V2 pattern: the trial is a function that builds and fits a ``TorchTrainer`` whose
``RunConfig`` carries ``TuneReportCallback``, so every epoch the Train workers report reaches
Tune (and its scheduler) as a trial result. The trial itself only drives the trainer and holds
a sliver of a CPU (``tune.with_resources(..., {"cpu": 0.01})``); the Train workers hold the
cores (and fractional GPUs) the config gives them.

Names are stable across restarts: the Train run and the MLflow run are named after the trial
id, so a trial restarted by ``mammo-ray tune --resume`` continues its Train run from the latest
checkpoint and its MLflow run, instead of starting both again.

``CloseTrialRuns`` is a Tune callback in the driver. A trial that the scheduler stops early is
torn down without reaching the end of its ``TrackedRun``; the callback ends that MLflow run as
KILLED with the reason as a tag, and a trial that errored as FAILED, so no run is left RUNNING.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray.tune import Callback

from mammo_ray.config import Config
from mammo_ray.data.pipeline import PreparedData
from mammo_ray.search.cells import trial_config

TRIAL_TAG = "mammo_ray.trial_id"


@dataclass
class Plan:
    """Everything a trial needs, fixed when the search (or ensemble) starts; saved as JSON so
    ``--resume`` rebuilds the same trials."""

    kind: str  # "search" or "ensemble"
    name: str  # experiment name: the Tune experiment folder and the prefix of run names
    workdir: str
    experiment_dir: str
    tracking_uri: str
    experiment: str  # MLflow experiment name
    parent_run_id: str
    metric: str
    mode: str
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {cell, config, prepared}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell_config(self, key: str) -> Config:
        return Config.model_validate(self.cells[key]["config"])


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
        filter_string=f"tags.mlflow.parentRunId = '{plan.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    return runs[0].info.run_id if runs else None


def run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """The function trainable: one cell's config with this trial's values, trained with Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mammo_ray.train.run import run_training

    plan_ = Plan(**plan)
    trial_id = tune.get_context().get_trial_id()
    cell = plan_.cells[params["cell"]]
    config = trial_config(plan_.cell_config(params["cell"]), params, trial_id)
    tags = {
        TRIAL_TAG: trial_id,
        "mammo_ray.kind": f"{plan_.kind}-trial",
        "mammo_ray.cell": params["cell"],
        "mammo_ray.search": plan_.name,
    }
    client = MlflowClient(plan_.tracking_uri)
    previous = find_trial_run(client, plan_, trial_id)
    if previous is not None:
        done = client.get_run(previous)
        if done.info.status == "FINISHED" and done.data.tags.get("mammo_ray.checkpoint"):
            # It finished before the driver died, but Tune had not saved that yet (it writes its
            # state every few seconds): report the finished run's final metrics, do not train again.
            tune.report({**{k: float(v) for k, v in done.data.metrics.items()}, "mammo_ray_restored": 1.0})
            return
    run_training(
        config,
        plan_.workdir,
        prepared=PreparedData(**cell["prepared"]),
        parent_run_id=plan_.parent_run_id,
        run_name=run_name(plan_, trial_id),
        progress=False,
        callbacks=[TuneReportCallback()],
        tags=tags,
        resume_run_id=previous,
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
        client.set_tag(run_id, "mammo_ray.stop_reason", reason)
        client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED", "stopped early by the search scheduler (ASHA)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", f"trial error: {trial.error_file or 'see the Tune trial folder'}")


def read_plan(experiment_dir: str | Path) -> Plan:
    import json

    path = Path(experiment_dir) / "mammo_ray_plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{experiment_dir}: no mammo_ray_plan.json; not a mammo-ray tune/ensemble folder")
    return Plan(**json.loads(path.read_text()))


def write_plan(plan: Plan) -> Path:
    import json

    path = Path(plan.experiment_dir) / "mammo_ray_plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=2))
    tmp.replace(path)
    return path
