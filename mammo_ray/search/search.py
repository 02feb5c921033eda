"""``mammo-ray tune``: the hyperparameter search of paper 000 (see docs/papers.md) with Ray Tune, Optuna and ASHA.

Every backbone x view mode x augmentation cell (``cells.py``) gets ``tune.num_samples`` trials
from its own seeded Optuna study over dropout, learning rate and L2 (``searcher.py``). Each trial
is one training run (``trial.py``: in the trial's own process for one worker, a Ray Train run for
more), stopped early by its cell's ASHA when it trails its cell at
the same epoch. One parent MLflow run holds a child run per trial.

Afterwards each cell's best trial (best ``tune.metric`` over all its epochs) is evaluated on
the held-out test split, and the leaderboard (``leaderboard.py``) is written, logged to the
parent run and returned. The best configuration overall is the cell winner with the lowest
``val_exam_loss`` (``select_best``): validation log loss per exam in every view mode (a single-view
model's exam probability is the mean of its CC and MLO probabilities), because ``val_loss`` is per
image for single-view cells and per exam for two-view cells, and losses on different cases do not
compare. It is saved as ``best_config.yaml`` (and logged to the parent run), where
``mammo-ray ensemble --from-search`` picks it up.

A search killed midway (Ctrl-C, or SIGKILL of the driver) continues with ``--resume DIR``:
``Tuner.restore`` keeps the finished trials, restarts the unfinished ones (their training runs
resume from their latest checkpoints) and asks the restored searcher for the rest.

``run_search`` returns a ``SearchSummary`` (its ``best`` a ``BestTrial``); ``to_dict`` is the JSON
of ``search_summary.json`` and of ``mammo-ray tune --json``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from mlflow import MlflowClient
from ray import tune
from ray.util.state import list_actors

from mammo_ray import tags
from mammo_ray.baseline.lda import run_baseline
from mammo_ray.config import Config, metric_mode, save_config
from mammo_ray.data.pipeline import PreparedData, ensure_prepared
from mammo_ray.search.cells import Cell, make_cells, trial_config
from mammo_ray.search.leaderboard import CALIBRATION_COLUMNS, write_leaderboard
from mammo_ray.search.progress import TrialLines
from mammo_ray.search.searcher import TIME_ATTR, CellScheduler, CellSearcher
from mammo_ray.search.trial import CloseTrialRuns, Plan, PlanCell, find_trial_run, read_plan, run_trial, write_plan
from mammo_ray.train import storage
from mammo_ray.train.evaluation import evaluate_checkpoint
from mammo_ray.train.in_process import runs_in_process, trial_resources
from mammo_ray.train.run import check_resources
from mammo_ray.train.tracking import TrackedRun, artifact_root, log_metrics, tracking_uri

SEARCH_CONFIG = "search_config.json"  # the search's config, beside its plan: what --resume continues with
TRIAL_CPU = 0.01  # a trial that only drives its TorchTrainer; the Train workers hold the cores
SELECTION_METRIC = "val_exam_loss"  # picks the best configuration overall: one level for every view mode
METRIC_LEVELS = {
    "val_exam_loss": "validation log loss per exam (the CC and MLO probabilities of a lesion averaged) in every "
    "view mode",
    "val_loss": "validation log loss at the view mode's primary level: per image for single, per exam for "
    "parallel and multimodal",
    "val_auc": "validation ROC AUC at the view mode's primary level: per image for single, per exam for "
    "parallel and multimodal",
}


@dataclass
class BestTrial:
    """The best configuration of a search: the cell winner with the lowest ``SELECTION_METRIC``."""

    trial_id: str
    cell: str  # its cell's key
    params: dict[str, float]  # the sampled values (model.dropout, optim.lr, optim.weight_decay)
    metrics: dict[str, float]  # its best epoch's validation metrics (and best_epoch)
    selected_by: str  # SELECTION_METRIC
    selection: str  # the sentence that says how it was chosen (as under the leaderboard)
    config_path: str  # best_config.yaml, where ``mammo-ray ensemble --from-search`` takes it from
    checkpoint: str | None  # the checkpoint of its best epoch
    config: dict[str, Any]  # the full config, as JSON


@dataclass
class SearchSummary:
    """What ``run_search`` did and where its outputs are."""

    experiment_dir: str  # the Tune experiment folder (``mammo-ray tune --resume`` takes it)
    parent_run_id: str
    tracking_uri: str
    leaderboard: str  # leaderboard.csv
    leaderboard_markdown: str  # leaderboard.md
    trials_csv: str
    trials: int
    errored: int
    cells: int
    best: BestTrial | None
    leaderboard_text: str = field(default="", repr=False)  # the Markdown table, for printing (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary (``search_summary.json``, ``mammo-ray tune --json``), without the table text."""
        data = asdict(self)
        data.pop("leaderboard_text")
        return data


def describe_metric(metric: str) -> str:
    """``lowest val_exam_loss (validation log loss per exam ...)``: what a selection compared."""
    return f"{'lowest' if metric_mode(metric) == 'min' else 'highest'} {metric} ({METRIC_LEVELS[metric]})"


def best_row(frame: pd.DataFrame, metric: str) -> pd.Series | None:
    """The row with the best finite ``metric`` (lowest or highest as ``metric_mode`` says); None when none has one."""
    scored = frame.dropna(subset=[metric])
    if scored.empty:
        return None
    sign = 1.0 if metric_mode(metric) == "min" else -1.0
    return scored.loc[(sign * scored[metric]).idxmin()]


def select_best(trials: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best configuration overall: each cell's best trial by ``metric`` (the leaderboard's
    winners), then the one of those with the lowest ``SELECTION_METRIC`` at that epoch.

    Within a cell every trial has the same view mode, so ``metric`` compares like with like
    whatever its level; across cells only an exam-level metric does, which ``SELECTION_METRIC`` is
    for every view mode. None when no cell winner has it.
    """
    winners = [row for _, cell in trials.groupby("cell", sort=False) if (row := best_row(cell, metric)) is not None]
    return best_row(pd.DataFrame(winners), SELECTION_METRIC) if winners else None


def selection_text(metric: str, best: pd.Series | None) -> str:
    """How the leaderboard's winners and the best configuration were chosen, for its Markdown."""
    text = f"Each cell's best trial: {describe_metric(metric)} over its epochs."
    overall = describe_metric(SELECTION_METRIC).replace("lowest", "the lowest", 1)
    if best is None:
        return f"{text} Best configuration overall: none (no cell's best trial reported {SELECTION_METRIC})."
    return (
        f"{text} Best configuration overall: the cell winner with {overall}: {best['cell']} trial "
        f"{best['trial_id']} ({SELECTION_METRIC} {float(best[SELECTION_METRIC]):.4f})."
    )


def prepare_cells(cells: list[tuple[Cell, Config]], workdir: Path, progress: bool) -> dict[str, PreparedData]:
    """Prepare each distinct dataset once, in the driver (trials running at once must not race)."""
    prepared: dict[str, PreparedData] = {}
    by_data: dict[str, PreparedData] = {}
    for cell, config in cells:
        key = config.data.model_dump_json()
        if key not in by_data:
            by_data[key] = ensure_prepared(config, workdir, progress=progress)
        prepared[cell.key] = by_data[key]
    return prepared


def cell_resources(configs: dict[str, Config]) -> dict[str, float]:
    """What every trial of these cells holds (``in_process.trial_resources``): the worker's own when
    it trains in process, else a sliver to drive its TorchTrainer. One trial function serves every
    cell, so the cells must agree; a per-backbone override that makes them differ is an error."""
    by_cell = {key: trial_resources(config, driver_cpu=TRIAL_CPU) for key, config in configs.items()}
    if len({json.dumps(r, sort_keys=True) for r in by_cell.values()}) > 1:
        raise ValueError(
            f"search cells ask for different trial resources ({by_cell}): keep train.num_workers, "
            "train.cpus_per_worker, train.use_gpu, train.gpus_per_worker and train.in_process the same "
            "for every backbone (tune.backbone_overrides)"
        )
    return next(iter(by_cell.values()))


def trainable(plan: Plan) -> Any:
    """The trial function with its resources (``cell_resources``)."""
    resources = cell_resources({key: cell.config for key, cell in plan.cells.items()})
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan.to_dict()), resources)


def trial_failures(config: Config) -> tune.FailureConfig:
    """Trials that train in process are restarted by Tune (from their latest checkpoint) up to
    ``train.max_failures`` times; a TorchTrainer restarts its own workers instead."""
    return tune.FailureConfig(max_failures=config.train.max_failures if runs_in_process(config) else 0)


def check_state_api(config: Config) -> None:
    """ASHA stops trials by killing them; their Train workers' placement groups are then freed by
    Ray Train's placement-group cleaner, which polls Ray's state API (served by the dashboard).
    Without it the freed CPUs/GPUs stay reserved and the search stalls: fail fast instead."""
    if config.tune.scheduler != "asha" or runs_in_process(config):
        return
    try:
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - any failure means no state API
        raise RuntimeError(
            "tune.scheduler=asha needs Ray's state API (the dashboard) so the resources of "
            "stopped trials are freed; start Ray with its dashboard (mammo-ray does when it starts "
            f"Ray itself) or set tune.scheduler=fifo ({type(exc).__name__}: {exc})"
        ) from None


def build_tuner(plan: Plan, config: Config, *, progress: bool) -> tune.Tuner:
    t = config.tune
    searcher = CellSearcher(list(plan.cells), t, metric=plan.metric, mode=plan.mode)
    scheduler = CellScheduler(t, metric=plan.metric, mode=plan.mode, max_epochs=config.train.epochs)
    return tune.Tuner(
        trainable(plan),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=len(plan.cells) * t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(storage.parent(plan.experiment_dir)),
            callbacks=[
                CloseTrialRuns(plan),
                *([TrialLines(len(plan.cells) * t.num_samples, config.train.epochs, "trial")] if progress else []),
            ],
            failure_config=trial_failures(config),
            verbose=0,  # TrialLines prints a line per trial event instead of Tune's tables
        ),
    )


def trial_table(results: Any, plan: Plan) -> pd.DataFrame:
    """One row per trial: cell, sampled values, status, epochs, and its best epoch by the metric
    (with ``val_auc``, ``val_loss`` and ``SELECTION_METRIC`` of that epoch)."""
    rows = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        row: dict[str, Any] = {
            "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path or "").name,
            "cell": config.get("cell"),
            **{k: v for k, v in config.items() if k != "cell"},
            "error": None if result.error is None else type(result.error).__name__,
            "epochs": 0,
            "best_epoch": math.nan,
            plan.metric: math.nan,
            SELECTION_METRIC: math.nan,
            "checkpoint": None,
        }
        if history is not None and len(history) and plan.metric in history:
            row["epochs"] = int(history[TIME_ATTR].max()) if TIME_ATTR in history else len(history)
            best = best_row(history, plan.metric)
            if best is not None:
                row.update(
                    {
                        "best_epoch": int(best[TIME_ATTR]),
                        plan.metric: float(best[plan.metric]),
                        "val_auc": float(best.get("val_auc", math.nan)),
                        "val_loss": float(best.get("val_loss", math.nan)),
                        SELECTION_METRIC: float(best.get(SELECTION_METRIC, math.nan)),
                        "checkpoint": best.get("checkpoint_path"),
                    }
                )
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_cells(plan: Plan, trials: pd.DataFrame, n_boot: int) -> list[dict[str, Any]]:
    """Test metrics of each cell's best trial: the leaderboard rows."""
    client = MlflowClient(plan.tracking_uri)
    rows = []
    for key, planned in plan.cells.items():
        cell = planned.cell
        row: dict[str, Any] = {
            "cell": key,
            "backbone": cell.backbone,
            "column": cell.column,
            "view_mode": cell.view_mode,
            "augment": cell.augment,
            "trials": int((trials["cell"] == key).sum()),
        }
        best = best_row(trials[(trials["cell"] == key) & trials["checkpoint"].notna()], plan.metric)
        if best is None:
            rows.append({**row, "status": "no finished trial"})
            continue
        prepared = planned.prepared
        out_dir = plan.output_dir / "cells" / key
        with storage.fetched(best["checkpoint"]) as checkpoint:  # a trial's checkpoint may be on object storage
            result = evaluate_checkpoint(
                checkpoint,
                "test",
                plan.workdir,
                out_dir,
                n_boot=n_boot,
                cache_dir=prepared.cache_dir,
                splits_path=prepared.splits,
            )
        metrics = result.metrics
        run_id = find_trial_run(client, plan, best["trial_id"])
        if run_id:
            log_metrics(plan.tracking_uri, run_id, metrics, step=int(best["best_epoch"]))
            client.set_tag(run_id, tags.CELL_BEST, "true")
        rows.append(
            {
                **row,
                "status": "ok",
                "trial_id": best["trial_id"],
                "run_id": run_id,
                "val_metric": float(best[plan.metric]),
                "checkpoint": best["checkpoint"],
                SELECTION_METRIC: float(best.get(SELECTION_METRIC, math.nan)),
                **{
                    k: metrics.get(k, math.nan)
                    for k in ("test_acc", "test_auc", "test_auc_ci_low", "test_auc_ci_high", "test_loss", "test_n")
                },
                **{k: metrics.get(k, math.nan) for k in CALIBRATION_COLUMNS},
                "plots": result.plots,
            }
        )
    return rows


def baseline_rows(
    config: Config, prepared: PreparedData, columns: list[tuple[str, str, str]], out_dir: Path, n_boot: int
) -> list[dict[str, Any]]:
    """The texture + LDA rows of paper 000 (§2.4), on the same split: per image under the single
    view columns, per exam (CC and MLO averaged, as the parallel mode evaluates) under the
    parallel ones. Multi-modal needs a network; those columns stay empty."""
    name = "texture + LDA (non-deep)"
    targets = [
        (column, view, aug) for column, view, aug in columns if view in ("single", "parallel") and aug != "on"
    ] or [("single", "single", "off")]
    try:
        result = run_baseline(config, prepared.cache_dir, out_dir, n_boot=n_boot)
    except ValueError as exc:
        return [
            {"backbone": name, "column": column, "view_mode": view, "augment": aug, "status": f"not run: {exc}"}
            for column, view, aug in targets
        ]
    rows = []
    for column, view, aug in targets:
        level = result["test"].level("image" if view == "single" else "exam")
        rows.append(
            {
                "backbone": name,
                "column": column,
                "view_mode": view,
                "augment": aug,
                "status": "ok",
                "test_acc": float(level.accuracy),
                "test_auc": float(level.auc),
                "test_auc_ci_low": float(level.auc_ci[0]),
                "test_auc_ci_high": float(level.auc_ci[1]),
                "test_loss": float(level.log_loss),
                "test_n": float(level.n),
            }
        )
    return rows


def run_search(
    config: Config | None, workdir: str | Path, *, resume: str | Path | None = None, progress: bool = True
) -> SearchSummary:
    """Run (or resume) a search; Ray must be initialised.

    Args:
        config: the search's config; None with ``resume`` (the saved config is used).
        resume: a search folder (``experiment_dir``) to continue: a local path or a URI (s3://, gs://).
    """
    workdir = Path(workdir).resolve()
    if resume is not None:
        plan = read_plan(resume)
        config = Config.model_validate(json.loads(storage.read_text(storage.join(resume, SEARCH_CONFIG))))
    else:
        if config is None:
            raise ValueError("run_search needs a config unless it resumes a search")
        cells = make_cells(config)
        check_resources(cells[0][1])
        check_state_api(config)
        prepared = prepare_cells(cells, workdir, progress)
        name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        uri = tracking_uri(config, workdir)
        plan = Plan(
            kind="search",
            name=name,
            workdir=str(workdir),
            experiment_dir=str(storage.join(storage.storage_path_for(config, workdir), name)),
            tracking_uri=uri,
            experiment=config.train.experiment,
            parent_run_id="",
            metric=config.tune.metric,
            mode=metric_mode(config.tune.metric),
            cells={cell.key: PlanCell(cell, c, prepared[cell.key]) for cell, c in cells},
        )
    parent = TrackedRun(
        plan.tracking_uri,
        plan.experiment,
        plan.name,
        config=None if resume else config,
        tags={tags.KIND: "search", tags.EXPERIMENT_DIR: plan.experiment_dir},
        artifact_location=artifact_root(plan.tracking_uri, workdir),
        run_id=plan.parent_run_id or None,
    )
    with parent:
        if not resume:
            plan.parent_run_id = parent.run_id
            write_plan(plan)
            storage.write_text(storage.join(plan.experiment_dir, SEARCH_CONFIG), config.model_dump_json(indent=2))
            parent.log_artifact(save_config(config, plan.output_dir), "config")
            tuner = build_tuner(plan, config, progress=progress)
        else:
            tuner = tune.Tuner.restore(plan.experiment_dir, trainable=trainable(plan), resume_errored=True)
        results = tuner.fit()
        return summarize(plan, config, results, parent)


def summarize(plan: Plan, config: Config, results: Any, parent: TrackedRun) -> SearchSummary:
    """Trial table, per-cell test evaluation, leaderboard and best config; all logged to the parent (and
    uploaded to the experiment folder when that is on object storage)."""
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)  # a resume from object storage may start without it
    trials = trial_table(results, plan)
    trials.to_csv(out / "trials.csv", index=False)
    rows = evaluate_cells(plan, trials, config.train.eval_bootstrap)
    if config.tune.baseline:
        first = next(iter(plan.cells.values()))
        columns = list(dict.fromkeys((r["column"], r["view_mode"], r["augment"]) for r in rows))
        rows += baseline_rows(
            first.config,
            first.prepared,
            columns,
            out / "baseline",
            config.train.eval_bootstrap,
        )
    best = select_best(trials, plan.metric)
    board = write_leaderboard(
        rows,
        out,
        title=f"Search {plan.name}: {config.data.task} on {config.data.source} data",
        selection=selection_text(plan.metric, best),
    )
    parent.log_artifacts([board["csv"], board["long_csv"], board["markdown"], out / "trials.csv"], "leaderboard")
    for row in rows:
        if row.get("plots"):
            parent.log_artifacts(row["plots"], f"cells/{row['cell']}")
    summary = SearchSummary(
        experiment_dir=plan.experiment_dir,
        parent_run_id=plan.parent_run_id,
        tracking_uri=plan.tracking_uri,
        leaderboard=board["csv"],
        leaderboard_markdown=board["markdown"],
        trials_csv=str(out / "trials.csv"),
        trials=int(len(trials)),
        errored=int(trials["error"].notna().sum()),
        cells=len(plan.cells),
        best=None,
        leaderboard_text=board["text"],
    )
    if best is not None:
        params = {k: best[k] for k in ("model.dropout", "optim.lr", "optim.weight_decay") if k in best}
        best_config = trial_config(
            plan.cell_config(best["cell"]), {k: float(v) for k, v in params.items()}, best["trial_id"]
        )
        path = save_config(best_config, out, "best_config.yaml")
        parent.log_artifact(path, "best")
        metrics = {
            plan.metric: float(best[plan.metric]),
            SELECTION_METRIC: float(best[SELECTION_METRIC]),
            "val_auc": float(best["val_auc"]),
            "val_loss": float(best["val_loss"]),
            "best_epoch": int(best["best_epoch"]),
        }
        parent.log_metrics({f"best_{k}": v for k, v in metrics.items()})
        parent.set_tags({tags.BEST_TRIAL: best["trial_id"], tags.BEST_CELL: best["cell"], tags.BEST_CONFIG: path})
        summary.best = BestTrial(
            trial_id=best["trial_id"],
            cell=best["cell"],
            params=params,
            metrics=metrics,
            selected_by=SELECTION_METRIC,
            selection=selection_text(plan.metric, best),
            config_path=str(path),
            checkpoint=best["checkpoint"],
            config=best_config.model_dump(mode="json"),
        )
    (out / "search_summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    if storage.is_uri(plan.experiment_dir):
        storage.upload(out, plan.experiment_dir)
    return summary
