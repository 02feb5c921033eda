"""Many Ray Tune trials logging to one MLflow tracking server at once: a load check for `mlflow server`.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    ray job submit --working-dir . -- python scripts/mlflow_parallel_trials.py --trials 16 --concurrent 8

Each trial is a Tune function trial that opens its own run with ``MlflowClient`` (as mammo-ray's
trials do), logs parameters in one batch, ``--steps`` steps of two metrics one request at a time,
and a small artifact, and ends the run FINISHED (FAILED on an error). Every run is tagged with this
invocation's ``load_batch``. Prints one JSON line: the batch, the experiment, the run ids found in
MLflow afterwards, the trials that errored and the wall time. With a SQLite store behind the
server, this is where ``database is locked`` shows; with PostgreSQL it must not.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

NUM_PARAMS = 10


def trial(config: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray import tune

    client = MlflowClient(config["tracking_uri"])
    index = config["index"]
    run = client.create_run(
        config["experiment_id"],
        run_name=f"load-trial-{index:02d}",
        tags={"load_batch": config["batch"], "trial_index": str(index)},
    )
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param(f"param_{k}", str(index * 100 + k)) for k in range(NUM_PARAMS)])
        for step in range(config["steps"]):
            client.log_metric(run_id, "loss", 1.0 / (step + 1 + index), step=step)
            client.log_metric(run_id, "accuracy", step / config["steps"], step=step)
            tune.report({"step": step})
        with tempfile.TemporaryDirectory() as tmp:
            note = Path(tmp) / "trial.json"
            note.write_text(json.dumps({"index": index, "run_id": run_id}))
            client.log_artifact(run_id, str(note), "notes")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the MLflow server (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment", default="mammo-ray-load")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=8, help="trials at once")
    parser.add_argument("--steps", type=int, default=20, help="metric steps per trial (two metrics each)")
    parser.add_argument("--cpus-per-trial", type=float, default=0.25)
    args = parser.parse_args()
    if not args.tracking_uri:
        parser.error("no --tracking-uri and no $MLFLOW_TRACKING_URI")

    import ray
    from mlflow import MlflowClient
    from ray import tune

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(args.experiment)
    batch = uuid.uuid4().hex[:12]
    ray.init()  # the job's cluster ($RAY_ADDRESS under `ray job submit`), else a local one
    started = time.monotonic()
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": args.cpus_per_trial}),
        param_space={
            "index": tune.grid_search(list(range(args.trials))),
            "steps": args.steps,
            "batch": batch,
            "experiment_id": experiment_id,
            "tracking_uri": args.tracking_uri,
        },
        # Reused actors: the trials' processes start (and import MLflow) once per slot, not once per trial.
        tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"mlflow-load-{batch}", verbose=0, storage_path=tempfile.mkdtemp(prefix="mlflow-load-")
        ),
    )
    results = tuner.fit()
    elapsed = time.monotonic() - started
    runs = client.search_runs([experiment_id], f"tags.load_batch = '{batch}'", max_results=1000)
    edges = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time or r.info.start_time, -1) for r in runs])
    open_runs = [sum(step for _, step in edges[: i + 1]) for i in range(len(edges))]
    print(
        json.dumps(
            {
                "batch": batch,
                "experiment_id": experiment_id,
                "trials": args.trials,
                "errored": results.num_errors,
                "runs": sorted(r.info.run_id for r in runs),
                "most_runs_open_at_once": max(open_runs, default=0),
                "seconds": round(elapsed, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
