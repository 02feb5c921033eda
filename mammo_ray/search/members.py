"""``mammo-ray ensemble``: paper 000's ensemble (see docs/papers.md), its members trained as parallel Tune trials.

The members share one configuration (by default the best of a search: the cell winner with the
lowest exam-level validation loss, ``val_exam_loss``, see ``search.select_best``)
and differ only in ``train.seed``. They run as a Tune grid over seeds: each member a training
run (``trial.run_trial``) holding the resources the config gives its workers, so Ray packs
as many as fit (a fractional ``train.gpus_per_worker`` puts several members on one GPU), up to
``ensemble.max_concurrent_trials``. Each member is a child MLflow run of the ensemble's run.

Afterwards every member predicts the evaluation split, the ensemble averages their
probabilities (and per exam, CC and MLO), and the ensemble is compared with its members
(``mammo_ray.ensemble.combine``). It is registered in the MLflow model registry as one model
version whose tags point back to every member's run (``mammo_ray.ensemble.model``).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow import MlflowClient
from ray import tune

from mammo_ray import tags
from mammo_ray.config import Config, metric_mode, save_config, with_values
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.decisions.report import decision_report, fit_policy
from mammo_ray.ensemble.combine import ensemble_report, member_matrix
from mammo_ray.ensemble.model import register_ensemble
from mammo_ray.search.cells import AS_CONFIGURED, Cell
from mammo_ray.search.progress import TrialLines
from mammo_ray.search.search import trainable, trial_failures
from mammo_ray.search.trial import CloseTrialRuns, Plan, PlanCell, find_trial_run, read_plan, run_name, write_plan
from mammo_ray.train import storage
from mammo_ray.train.checkpoint import CHECKPOINT_FILE
from mammo_ray.train.evaluation import predict_checkpoint
from mammo_ray.train.in_process import runs_in_process
from mammo_ray.train.run import check_resources
from mammo_ray.train.tracking import TrackedRun, artifact_root, tracking_uri

# What an ensemble config decides even when the members' config comes from a search.
RUNTIME_FIELDS = (
    "data.num_workers",  # loading processes per member: the crops themselves come from the search's data
    "train.use_gpu",
    "train.num_workers",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.amp",
    "train.storage_path",
    "train.mlflow_uri",
    "train.experiment",
    "train.max_failures",
    "train.in_process",
    "train.shared_gpu_ranks",
)


def config_from_search(config: Config, parent_run_id: str, workdir: Path) -> Config:
    """The best config of search ``parent_run_id``, with ``config``'s ensemble section and runtime fields."""
    uri = tracking_uri(config, workdir)
    client = MlflowClient(uri)
    try:
        run = client.get_run(parent_run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise ValueError(f"--from-search {parent_run_id}: no such run in {uri} ({exc})") from None
    if run.data.tags.get(tags.KIND) != "search":
        raise ValueError(f"--from-search {parent_run_id}: not a `mammo-ray tune` parent run")
    try:
        local = client.download_artifacts(parent_run_id, "best/best_config.yaml")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"--from-search {parent_run_id}: the search logged no best config (did it finish? {exc})"
        ) from None
    best = Config.model_validate(yaml.safe_load(Path(local).read_text()))
    dumped = config.model_dump(mode="json")
    values = {key: dumped[key.split(".")[0]][key.split(".")[1]] for key in RUNTIME_FIELDS}
    values.update({f"ensemble.{k}": v for k, v in dumped["ensemble"].items()})
    return with_values(best, values, f"ensemble from search {parent_run_id}")


def member_config(config: Config) -> Config:
    """A member's config: the ensemble's, with ``train.plots`` set by ``ensemble.member_plots`` and
    ``train.log_model`` by ``ensemble.member_models``."""
    e = config.ensemble
    return with_values(
        config,
        {"train.plots": e.member_plots, "train.log_model": e.member_models},
        "ensemble.member_plots and ensemble.member_models",
    )


def build_tuner(plan: Plan, config: Config, *, progress: bool) -> tune.Tuner:
    e = config.ensemble
    seeds = [e.seed_start + i for i in range(e.members)]
    return tune.Tuner(
        trainable(plan),
        param_space={"cell": "member", "train.seed": tune.grid_search(seeds)},
        # Members that train in process reuse their trial processes (no ASHA here stops one mid-run):
        # a new process per member costs ~10 s of start-up and imports on 2 cores.
        tune_config=tune.TuneConfig(
            max_concurrent_trials=e.max_concurrent_trials, reuse_actors=runs_in_process(config)
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(storage.parent(plan.experiment_dir)),
            callbacks=[
                CloseTrialRuns(plan),
                *([TrialLines(e.members, config.train.epochs, "member")] if progress else []),
            ],
            failure_config=trial_failures(config),
            verbose=0,  # TrialLines prints a line per trial event instead of Tune's tables
        ),
    )


def collect_members(plan: Plan, results: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished members, failed members): each with seed, trial id, MLflow run and checkpoint."""
    client = MlflowClient(plan.tracking_uri)
    done, failed = [], []
    for result in results:
        seed = int((result.config or {}).get("train.seed", -1))
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path or "").name
        checkpoint = Path(plan.workdir) / "runs" / run_name(plan, trial_id) / CHECKPOINT_FILE
        member = {
            "seed": seed,
            "trial_id": trial_id,
            "run_id": find_trial_run(client, plan, trial_id),
            "checkpoint": str(checkpoint),
        }
        if result.error is not None or not checkpoint.is_file():
            failed.append({**member, "error": repr(result.error) if result.error else "no checkpoint written"})
        else:
            done.append(member)
    return sorted(done, key=lambda m: m["seed"]), failed


def run_ensemble(
    config: Config | None,
    workdir: str | Path,
    *,
    from_search: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the members, evaluate and register the ensemble; Ray must be initialised."""
    workdir = Path(workdir).resolve()
    if resume is not None:
        plan = read_plan(resume)
        config = plan.cell_config("member")
    else:
        if config is None:
            raise ValueError("run_ensemble needs a config unless it resumes an ensemble")
        if from_search:
            config = config_from_search(config, from_search, workdir)
        check_resources(config)
        prepared = ensure_prepared(config, workdir, progress=progress)
        name = f"ensemble-{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        cell = Cell(config.model.name, config.model.view_mode, AS_CONFIGURED)
        plan = Plan(
            kind="ensemble",
            name=name,
            workdir=str(workdir),
            experiment_dir=str(storage.join(storage.storage_path_for(config, workdir), name)),
            tracking_uri=tracking_uri(config, workdir),
            experiment=config.train.experiment,
            parent_run_id="",
            metric=config.train.monitor,
            mode=metric_mode(config.train.monitor),
            # The members' own evaluation PNGs only when asked for: the ensemble draws its own.
            cells={"member": PlanCell(cell, member_config(config), prepared)},
        )
    run_tags = {
        tags.KIND: "ensemble",
        tags.EXPERIMENT_DIR: plan.experiment_dir,
        tags.MEMBERS: str(config.ensemble.members),
    }
    if from_search:
        run_tags[tags.FROM_SEARCH] = from_search
    with TrackedRun(
        plan.tracking_uri,
        plan.experiment,
        plan.name,
        config=None if resume else config,
        tags=run_tags,
        artifact_location=artifact_root(plan.tracking_uri, workdir),
        run_id=plan.parent_run_id or None,
    ) as parent:
        if resume is None:
            plan.parent_run_id = parent.run_id
            write_plan(plan)
            parent.log_artifact(save_config(config, plan.output_dir), "config")
            tuner = build_tuner(plan, config, progress=progress)
        else:
            tuner = tune.Tuner.restore(plan.experiment_dir, trainable=trainable(plan), resume_errored=True)
        members, failed = collect_members(plan, tuner.fit())
        if not members:
            raise RuntimeError(
                f"ensemble {plan.name}: no member finished ({len(failed)} failed); see {plan.experiment_dir}"
            )
        split = config.ensemble.split
        member_data = plan.cells["member"].prepared

        def frames_on(part: str) -> list[pd.DataFrame]:
            return [
                predict_checkpoint(
                    m["checkpoint"], part, workdir, cache_dir=member_data.cache_dir, splits_path=member_data.splits
                ).frame
                for m in members
            ]

        frames = frames_on(split)
        out = plan.output_dir / "evaluation"
        out.mkdir(parents=True, exist_ok=True)  # a resume from object storage may start without it
        report = ensemble_report(
            frames, config.model.view_mode, out, split=split, n_boot=config.train.eval_bootstrap, seed=config.train.seed
        )
        # Calibration, thresholds and the referral cut-off: fitted on the members' val predictions only,
        # then reported on the ensemble's split and registered with the model.
        val_keys, val_probs = member_matrix(frames if split == "val" else frames_on("val"))
        decided: dict[str, Any]
        labels = val_keys["label"].to_numpy()
        if not 0 < labels.sum() < labels.size:  # the members stay trained and registered; say why this is missing
            reason = f"the val split has {int(labels.sum())} malignant case(s) of {labels.size}: no policy to fit"
            policy, decided = None, {"skipped": reason}
        else:
            policy = fit_policy(labels, val_probs, config.decisions)
            keys, probs = member_matrix(frames)
            decided = decision_report(
                keys.assign(prob=probs.mean(axis=1)),
                probs,
                policy,
                out,
                split=split,
                n_boot=config.train.eval_bootstrap,
                seed=config.train.seed,
                policy_source="fitted on val now",
            )
            parent.log_metrics({f"ensemble_{k}": v for k, v in decided["metrics"].items()})
            parent.log_artifacts([*decided["plots"], decided["json"]], "evaluation")
        parent.log_metrics({k: v for k, v in report["metrics"].items()})
        parent.log_metrics(
            {
                "ensemble_auc": report["ensemble_auc"],
                "mean_member_auc": report["mean_member_auc"],
                "members_finished": len(members),
                "members_failed": len(failed),
            }
        )
        parent.log_artifacts([*report["plots"], report["predictions"]], "evaluation")
        registered = register_ensemble(
            plan.tracking_uri,
            parent.run_id,
            [m["checkpoint"] for m in members],
            [m["run_id"] or "" for m in members],
            config.ensemble.registered_model,
            description=f"{len(members)}-member ensemble of {config.model.name} "
            f"({config.model.view_mode}), members differ only in seed",
            alias=config.ensemble.alias,
            decisions=policy.to_dict() if policy else None,
        )
        summary = {
            "experiment_dir": plan.experiment_dir,
            "parent_run_id": parent.run_id,
            "tracking_uri": plan.tracking_uri,
            "members": len(members),
            "members_failed": failed,
            "member_runs": members,
            "split": split,
            "ensemble_auc": report["ensemble_auc"],
            "ensemble_auc_ci": report["ensemble_auc_ci"],
            "mean_member_auc": report["mean_member_auc"],
            "mean_member_auc_ci": report["mean_member_auc_ci"],
            "diff": report["diff"],
            "diff_ci": report["diff_ci"],
            "plots": [*report["plots"], *decided.get("plots", [])],
            **{
                k: decided.get(k)
                for k in ("brier", "ece", "ece_calibrated", "operating_points", "referral", "calibration")
            },
            "policy": policy.to_dict() if policy else decided,
            "model_uri": registered["model_uri"],
            "alias_uri": registered["alias_uri"],
            "registered_model": registered,
        }
        (plan.output_dir / "ensemble_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        parent.log_artifact(plan.output_dir / "ensemble_summary.json")
        if storage.is_uri(plan.experiment_dir):  # the outputs beside the members' Tune state
            storage.upload(plan.output_dir, plan.experiment_dir)
    return summary
