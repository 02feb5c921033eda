"""Tune benchmark: Tune's bookkeeping overhead, and ASHA+TPE against random search, in one run.

    python benchmarks/bench_tune.py [--part overhead|search|both]
    python benchmarks/bench_tune.py --part overhead --trials-overhead 200 --work-s 0.5 --concurrency 8
    python benchmarks/bench_tune.py --part search --trials 8 --epochs 6 --patients 120 --seed 0
    python benchmarks/bench_tune.py --part members --members 6 --member-epochs 2
    python benchmarks/bench_tune.py --smoke        # both parts, tiny: a check that it runs

overhead   N function trials (``--trials-overhead``), each doing ``--work-s`` seconds of work
           (``time.sleep``, split over ``--reports`` ``tune.report`` calls), ``--concurrency`` at
           once (each asks for num_cpus/concurrency CPUs, and max_concurrent_trials caps it).
           The wall time of ``Tuner.fit()`` is compared with the ideal N * work / concurrency:
           overhead = wall / ideal - 1, and the slot time each trial takes beyond its work
           = (wall - ideal) * concurrency / N. The work measured inside the trials (from the
           function's start to its last report) is summed beside N * work, and the fixed cost
           is shown apart: fit() start to the first trial's start, last report to fit()'s
           return (it dominates small runs such as --smoke). Ray's own figure for
           reference: 10,000 trials of 1 s, 16 at once, one result a second, took 715.3 s against
           a 625 s minimum, +14.4%, about 144 ms per trial (docs.ray.io, Tune scalability benchmarks).

search     Two ``mammo_ray.search.search.run_search`` calls on one cell (levynet, single view,
           tiny synthetic data), same seed, same data, same Ray: ``tune.algorithm=tpe`` with
           ``tune.scheduler=asha``, then ``tune.algorithm=random`` with ``tune.scheduler=fifo``
           (every trial runs every epoch). Every epoch report of every trial is read back from
           the trials' ``result.json``. Target = a validation AUC both searches reached (the
           lower of the two best, or ``--target-auc``); for each search, epochs spent to reach it
           = the epoch reports (over all trials) stamped no later than the first report that
           reached it. Ray stamps reports to the second, so reports of other trials within that
           second count as before it. Also: total epochs, wall time, best val AUC / loss, trials
           stopped early. With a handful of trials this is one noisy sample: repeat with other
           ``--seed`` values before reading much into the ratio. At most 2 trials run at once;
           with ``--cpus-per-worker 1`` (the default) on 2 CPUs the second trial's Train run
           waits for the first (1 + 1 CPU + 0.01 per trial > 2), so trials train one at a time.

members   Two ``mammo_ray.search.members.run_ensemble`` calls on the same tiny data, in the same Ray:
           ``--members`` levynet members of ``--member-epochs`` epochs, ``--member-concurrency`` at
           once, first with ``train.in_process=true`` (each 1-worker member trains in its Tune
           trial's own process), then with ``train.in_process=false`` (each member drives a
           TorchTrainer: the path before, for comparison). Per path: the wall time of the members'
           ``Tuner.fit()``, the members' work (the sum of every epoch's ``epoch_seconds``: training
           and validation), ideal = work / concurrency, wall / ideal, and the fixed cost per member
           = (wall x concurrency - work) / members: everything a member pays besides its epochs
           (process, MLflow run, data and model set-up, TorchTrainer start-up, final evaluation,
           checkpoint and model logging). ``--member-cpus`` 0.99 lets two TorchTrainer members run
           at once on 2 CPUs (their trials hold 0.01 each); in process, each trial holds that much.

It starts its own local Ray (``--num-cpus``, default 2) unless ``RAY_ADDRESS`` is set, and shuts
it down at the end: without a dashboard for the overhead part; with one, on 127.0.0.1, for the
search part, because ASHA needs Ray's state API (``search.check_state_api``). Results are
printed and written to WORKDIR/benchmarks/tune.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from mammo_ray.ray_session import free_port
from mammo_ray.workdir import resolve_workdir

# Ray's bookkeeping benchmark (Tune scalability benchmarks, docs.ray.io): 10,000 trials x 1 s,
# 1 node x 16 CPUs, one result per second per trial: 715.27 s observed, 625 s minimum.
RAY_REFERENCE = {
    "trials": 10_000,
    "trial_s": 1.0,
    "concurrency": 16,
    "results_per_s": 1,
    "observed_s": 715.27,
    "minimum_s": 625.0,
}
RAY_REFERENCE["overhead"] = RAY_REFERENCE["observed_s"] / RAY_REFERENCE["minimum_s"] - 1
RAY_REFERENCE["per_trial_ms"] = (
    (RAY_REFERENCE["observed_s"] - RAY_REFERENCE["minimum_s"])
    * RAY_REFERENCE["concurrency"]
    / RAY_REFERENCE["trials"]
    * 1000
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from setups import TINY_TRAIN  # noqa: E402 - the tests' tiny training setup (tests/ is not a package)

SEARCHES = (("asha+tpe", "tpe", "asha"), ("random+fifo", "random", "fifo"))


def overhead_trial(config: dict) -> None:
    """One overhead trial: ``work_s`` of sleep in ``reports`` steps, a report after each.
    At module level so Ray can pickle it."""
    import time as _time

    from ray import tune as _tune

    t_start, start = _time.time(), _time.perf_counter()
    step = config["work_s"] / config["reports"]
    for i in range(config["reports"]):
        _time.sleep(step)
        _tune.report(
            {"step": i + 1, "inside_s": _time.perf_counter() - start, "t_start": t_start, "t_last": _time.time()}
        )


# --- Ray ----------------------------------------------------------------------------------------


def start_ray(num_cpus: int, *, dashboard: bool, attempts: int = 3) -> dict[str, Any]:
    """Join ``$RAY_ADDRESS``, or start a local Ray (retried: a busy machine can time ``ray.init`` out)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return {"address": os.environ["RAY_ADDRESS"], "own": False, "dashboard": None, "saved_env": None}
    for attempt in range(1, attempts + 1):
        saved = os.environ.get("RAY_API_SERVER_ADDRESS")
        try:
            if dashboard:
                port = free_port()
                # Pin Ray's state API to this Ray's dashboard. Left to itself it finds the cluster
                # by looking for GCS processes, and fails ("Found multiple active Ray instances")
                # when another local Ray runs on the machine; Train's placement-group cleaner
                # actors inherit this through the raylet.
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
                ray.init(
                    num_cpus=num_cpus,
                    num_gpus=0,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    log_to_driver=False,
                )
            else:
                ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False)
            return {
                "address": None,
                "own": True,
                "dashboard": os.environ.get("RAY_API_SERVER_ADDRESS") if dashboard else None,
                "saved_env": saved,
            }
        except Exception as exc:
            ray.shutdown()
            _restore_env(saved)
            if attempt == attempts:
                raise
            print(f"ray.init failed ({type(exc).__name__}: {exc}); retrying in 30 s", flush=True)
            time.sleep(30)
    raise AssertionError("unreachable")


def _restore_env(saved: str | None) -> None:
    if saved is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = saved


def stop_ray(info: dict[str, Any]) -> None:
    import ray

    ray.shutdown()
    if info.get("own"):
        _restore_env(info["saved_env"])


def wait_for_state_api(timeout_s: float = 120) -> None:
    """The dashboard answers a few seconds after ``ray.init`` returns; ASHA's check needs it."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_actors(limit=1, raise_on_missing_output=False)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


# --- overhead -----------------------------------------------------------------------------------


def run_overhead(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import ray
    from ray import tune

    cpus = ray.cluster_resources().get("CPU", args.num_cpus)
    per_trial_cpu = math.floor(cpus / args.concurrency * 1e4) / 1e4  # rounded down: `concurrency` must fit
    name = f"bench-tune-overhead-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    storage = workdir / "ray_results"
    tuner = tune.Tuner(
        tune.with_resources(overhead_trial, {"cpu": per_trial_cpu}),
        param_space={"work_s": args.work_s, "reports": args.reports},
        tune_config=tune.TuneConfig(
            num_samples=args.trials_overhead, max_concurrent_trials=args.concurrency, reuse_actors=args.reuse_actors
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    print(
        f"[overhead] {args.trials_overhead} trials x {args.work_s} s ({args.reports} reports), "
        f"{args.concurrency} at once ({per_trial_cpu:g} CPU each of {cpus:g})",
        flush=True,
    )
    fit_t0, start = time.time(), time.perf_counter()
    results = tuner.fit()
    wall, fit_t1 = time.perf_counter() - start, time.time()
    finished = [r.metrics for r in results if r.metrics and "inside_s" in r.metrics]
    inside = [m["inside_s"] for m in finished]
    first_start = min((m["t_start"] for m in finished), default=math.nan)
    last_report = max((m["t_last"] for m in finished), default=math.nan)
    errors = results.num_errors
    if not args.keep:
        shutil.rmtree(storage / name, ignore_errors=True)
    ideal = args.trials_overhead * args.work_s / args.concurrency
    work_total = args.trials_overhead * args.work_s
    return {
        "trials": args.trials_overhead,
        "finished": len(inside),
        "errors": errors,
        "work_s": args.work_s,
        "reports_per_trial": args.reports,
        "concurrency": args.concurrency,
        "cpu_per_trial": per_trial_cpu,
        "cluster_cpus": cpus,
        "reuse_actors": args.reuse_actors,
        "wall_s": round(wall, 3),
        "ideal_s": round(ideal, 3),
        "overhead": round(wall / ideal - 1, 4),
        "per_trial_overhead_ms": round((wall - ideal) * args.concurrency / args.trials_overhead * 1000, 1),
        "inside_sum_s": round(sum(inside), 3),
        "work_total_s": round(work_total, 3),
        "inside_mean_extra_ms": round((sum(inside) / max(len(inside), 1) - args.work_s) * 1000, 2),
        "first_trial_start_s": round(first_start - fit_t0, 2),
        "after_last_report_s": round(fit_t1 - last_report, 2),
        "experiment_dir": str(storage / name) if args.keep else None,
        "ray_reference": {k: round(v, 4) for k, v in RAY_REFERENCE.items()},
    }


def print_overhead(o: dict[str, Any]) -> None:
    ref = o["ray_reference"]
    print(
        f"\nTune overhead: {o['trials']} trials x {o['work_s']} s of work ({o['reports_per_trial']} reports each), "
        f"{o['concurrency']} at once on {o['cluster_cpus']:g} CPUs; {o['finished']} finished, {o['errors']} errors"
    )
    print(f"  {'wall (Tuner.fit)':<34}{o['wall_s']:>10.1f} s")
    print(f"  {'ideal (N x work / concurrency)':<34}{o['ideal_s']:>10.1f} s")
    print(
        f"  {'overhead (wall / ideal - 1)':<34}{o['overhead'] * 100:>+9.1f} %   "
        f"Ray's figure: {ref['overhead'] * 100:+.1f} % ({ref['trials']:,} trials x {ref['trial_s']:g} s, "
        f"{ref['concurrency']} at once: {ref['observed_s']:g} s vs {ref['minimum_s']:g} s)"
    )
    print(
        f"  {'per trial, beyond its work':<34}{o['per_trial_overhead_ms']:>10.0f} ms  "
        f"Ray's: {ref['per_trial_ms']:.0f} ms"
    )
    print(
        f"  {'work inside trials (sum)':<34}{o['inside_sum_s']:>10.1f} s   (N x work = {o['work_total_s']:g} s, "
        f"{o['inside_mean_extra_ms']:+.1f} ms a trial)"
    )
    print(f"  {'fit() start to first trial start':<34}{o['first_trial_start_s']:>10.1f} s")
    print(f"  {'last report to fit() return':<34}{o['after_last_report_s']:>10.1f} s")


# --- search -------------------------------------------------------------------------------------


def search_overrides(args: argparse.Namespace, algorithm: str, scheduler: str) -> list[str]:
    return [
        *TINY_TRAIN,
        f"data.synth_patients={args.patients}",
        f"train.epochs={args.epochs}",
        f"train.cpus_per_worker={args.cpus_per_worker:g}",
        "train.keep_checkpoints=1",
        "train.eval_bootstrap=0",
        "train.experiment=bench-tune",
        "tune.baseline=false",
        f"tune.num_samples={args.trials}",
        f"tune.seed={args.seed}",
        "tune.max_concurrent_trials=2",
        f"tune.metric={args.metric}",
        f"tune.algorithm={algorithm}",
        f"tune.scheduler={scheduler}",
    ]


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_trials(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial folder of a Tune experiment (one holding result.json): its epoch reports."""
    trials = []
    for result_file in sorted(Path(experiment_dir).glob("*/result.json")):
        reports = []
        for line in result_file.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "epochs_done" not in row:
                continue
            reports.append(
                {
                    "timestamp": int(row["timestamp"]),
                    "epochs_done": int(_num(row["epochs_done"])),
                    "val_auc": _num(row.get("val_auc")),
                    "val_loss": _num(row.get("val_loss")),
                    "time_total_s": _num(row.get("time_total_s")),
                }
            )
        config = {}
        if reports:
            config = json.loads(result_file.read_text().splitlines()[0]).get("config") or {}
        trials.append(
            {
                "dir": result_file.parent.name,
                "reports": reports,
                "params": {k: v for k, v in config.items() if k != "cell"},
                "error": (result_file.parent / "error.txt").is_file(),
            }
        )
    return trials


def _best(values: list[float], sign: float) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sign * min(sign * v for v in finite) if finite else math.nan


def search_stats(trials: list[dict[str, Any]], target: float, max_epochs: int, start_ts: float) -> dict[str, Any]:
    reports = [r for t in trials for r in t["reports"]]
    reached = [r["timestamp"] for r in reports if not math.isnan(r["val_auc"]) and r["val_auc"] >= target]
    hit = min(reached) if reached else None
    return {
        "trials": len(trials),
        "errored": sum(t["error"] for t in trials),
        "stopped_early": sum(
            1
            for t in trials
            if not t["error"] and max((r["epochs_done"] for r in t["reports"]), default=0) < max_epochs
        ),
        "epochs": len(reports),
        "epochs_to_target": None if hit is None else sum(1 for r in reports if r["timestamp"] <= hit),
        "time_to_target_s": None if hit is None else round(hit - start_ts, 1),
        "best_val_auc": _best([r["val_auc"] for r in reports], -1.0),
        "best_val_loss": _best([r["val_loss"] for r in reports], 1.0),
        # seconds from a trial's start to its first epoch report: Train start-up, plus any wait for CPUs
        "mean_first_epoch_at_s": round(
            sum(t["reports"][0]["time_total_s"] for t in trials if t["reports"])
            / max(1, sum(1 for t in trials if t["reports"])),
            1,
        ),
    }


def run_searches(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared
    from mammo_ray.search.search import run_search

    search_dir = workdir / "tune-search"  # the mammo-ray workdir: data, MLflow store, ray_results
    configs = {
        label: load_config(None, search_overrides(args, algorithm, scheduler))
        for label, algorithm, scheduler in SEARCHES
    }
    first = next(iter(configs.values()))
    prepared = ensure_prepared(first, search_dir, progress=False)  # before timing; both searches share it
    print(f"[search] data ready: {prepared.entries} crops, {args.patients} patients", flush=True)
    wait_for_state_api()
    runs: dict[str, dict[str, Any]] = {}
    for label, _, _ in SEARCHES:
        print(f"[search] {label}: {args.trials} trials x up to {args.epochs} epochs, max 2 at once", flush=True)
        start_ts = time.time()
        start = time.perf_counter()
        summary = run_search(configs[label], search_dir, progress=False)
        wall = time.perf_counter() - start
        trials = read_trials(summary.experiment_dir)
        runs[label] = {
            "experiment_dir": summary.experiment_dir,
            "wall_s": round(wall, 1),
            "start_ts": start_ts,
            "trials_detail": trials,
        }
        print(
            f"[search] {label}: {len(trials)} trials, {sum(len(t['reports']) for t in trials)} epochs, {wall:.0f} s",
            flush=True,
        )

    bests = {
        label: _best([r["val_auc"] for t in run["trials_detail"] for r in t["reports"]], -1.0)
        for label, run in runs.items()
    }
    target = args.target_auc if args.target_auc is not None else min(bests.values())
    rows = {}
    for label, run in runs.items():
        stats = search_stats(run["trials_detail"], target, args.epochs, run["start_ts"])
        rows[label] = {
            **stats,
            "wall_s": run["wall_s"],
            "experiment_dir": run["experiment_dir"],
            "per_trial": [
                {
                    "dir": t["dir"],
                    "params": t["params"],
                    "error": t["error"],
                    "epochs": len(t["reports"]),
                    "best_val_auc": _best([r["val_auc"] for r in t["reports"]], -1.0),
                    "reports": t["reports"],
                }
                for t in run["trials_detail"]
            ],
        }
    a, r = rows["asha+tpe"], rows["random+fifo"]
    ratio = a["epochs_to_target"] / r["epochs_to_target"] if a["epochs_to_target"] and r["epochs_to_target"] else None
    return {
        "target_val_auc": target,
        "target_from": "--target-auc" if args.target_auc is not None else "lower of the two best val AUCs",
        "ratio_epochs_to_target": ratio,
        "ratio_total_epochs": a["epochs"] / r["epochs"] if r["epochs"] else None,
        "searches": rows,
    }


def print_search(s: dict[str, Any], args: argparse.Namespace) -> None:
    target = s["target_val_auc"]
    print(
        f"\nSearch: levynet, single view, {args.patients} synthetic patients, {args.trials} trials x "
        f"up to {args.epochs} epochs, max 2 at once ({args.cpus_per_worker:g} CPU a Train run), "
        f"tune.metric={args.metric}, seed {args.seed}; "
        f"target val AUC {target:.3f} ({s['target_from']})"
    )
    head = (
        f"{'search':<13}{'trials':>7}{'stopped':>9}{'errored':>9}{'epochs':>8}{'to target':>11}"
        f"{'s to target':>13}{'wall s':>8}{'best AUC':>10}{'best loss':>11}"
    )
    print(head)
    for label, row in s["searches"].items():
        to_target = "-" if row["epochs_to_target"] is None else str(row["epochs_to_target"])
        t_target = "-" if row["time_to_target_s"] is None else f"{row['time_to_target_s']:.0f}"
        print(
            f"{label:<13}{row['trials']:>7}{row['stopped_early']:>9}{row['errored']:>9}{row['epochs']:>8}"
            f"{to_target:>11}{t_target:>13}{row['wall_s']:>8.0f}{row['best_val_auc']:>10.3f}"
            f"{row['best_val_loss']:>11.4f}"
        )
    ratio, total = s["ratio_epochs_to_target"], s["ratio_total_epochs"]
    print(
        f"ASHA+TPE / random: epochs to target {'-' if ratio is None else f'{ratio:.2f}'}, "
        f"total epochs {'-' if total is None else f'{total:.2f}'}"
    )
    print(
        f"One seeded sample of {args.trials} trials per search: noisy. Repeat with other --seed values "
        "before reading much into the ratio."
    )


# --- members: a 1-worker ensemble member in process against a TorchTrainer --------------------------

MEMBER_PATHS = (("in process", True), ("TorchTrainer", False))
MEMBER_FLAGS = {True: "in-process", False: "torchtrainer"}  # --member-paths of each


def member_overrides(args: argparse.Namespace, in_process: bool) -> list[str]:
    return [
        *TINY_TRAIN,
        f"data.synth_patients={args.patients}",
        f"train.epochs={args.member_epochs}",
        f"train.cpus_per_worker={args.member_cpus:g}",
        f"train.in_process={str(in_process).lower()}",
        "train.keep_checkpoints=1",
        "train.eval_bootstrap=0",
        "train.experiment=bench-members",
        f"ensemble.members={args.members}",
        f"ensemble.max_concurrent_trials={args.member_concurrency}",
        "ensemble.split=val",
        f"ensemble.registered_model=bench-members-{'in-process' if in_process else 'torchtrainer'}",
    ]


def epoch_seconds(experiment_dir: str | Path) -> list[list[float]]:
    """Per trial of a Tune experiment, the ``epoch_seconds`` of each epoch it reported."""
    trials = []
    for result_file in sorted(Path(experiment_dir).glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        trials.append([float(r["epoch_seconds"]) for r in rows if "epoch_seconds" in r])
    return trials


def member_stages(
    summary: dict[str, Any], fit_start: float, fit_end: float, per_trial: list[list[float]], slots: int
) -> dict[str, float]:
    """Where the members' fit() went, from the members' MLflow runs (their start and end times):
    ``start_s`` from fit() to the first member's run, ``end_s`` from the last run's end to fit()'s
    return, ``in_run_s`` per member its run's time beyond its epochs (data and model set-up, per-epoch
    checkpoints and logging, final evaluation, model logging), ``between_s`` per member the slot time
    outside any run (Tune's hand-over to the next trial, the trial's own start)."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    runs = [client.get_run(m["run_id"]).info for m in summary["member_runs"] if m["run_id"]]
    if not runs:
        return {}
    first, last = min(r.start_time for r in runs) / 1000, max(r.end_time for r in runs) / 1000
    in_runs = sum((r.end_time - r.start_time) / 1000 for r in runs)
    work = sum(sum(t) for t in per_trial)
    return {
        "start_s": round(first - fit_start, 2),
        "span_s": round(last - first, 2),
        "end_s": round(fit_end - last, 2),
        "in_run_s_per_member": round((in_runs - work) / len(runs), 3),
        "between_s_per_member": round(((last - first) * slots - in_runs) / len(runs), 3),
    }


def run_members(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import mammo_ray.search.members as members
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared

    member_dir = workdir / "tune-members"
    configs = {label: load_config(None, member_overrides(args, flag)) for label, flag in MEMBER_PATHS}
    prepared = ensure_prepared(next(iter(configs.values())), member_dir, progress=False)  # before timing
    print(f"[members] data ready: {prepared.entries} crops, {args.patients} patients", flush=True)
    fit_s: dict[str, float] = {}
    build_tuner = members.build_tuner

    def timed_build_tuner(plan: Any, config: Any, *, progress: bool) -> Any:
        """The ensemble's own tuner, its fit() timed: the members' phase alone, without the
        evaluation and registration run_ensemble does afterwards."""
        tuner = build_tuner(plan, config, progress=progress)
        fit = tuner.fit

        def timed_fit() -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            fit_s["start_epoch_s"] = time.time()
            try:
                return fit()
            finally:
                fit_s["last"] = time.perf_counter() - start
                fit_s["end_epoch_s"] = time.time()
                fit_s["driver_cpu_s"] = time.process_time() - cpu

        tuner.fit = timed_fit
        return tuner

    members.build_tuner = timed_build_tuner
    rows: dict[str, dict[str, Any]] = {}
    chosen = [label for label, flag in MEMBER_PATHS if args.member_paths in ("both", MEMBER_FLAGS[flag])]
    try:
        for label in chosen:
            print(f"[members] {label}: {args.members} members x {args.member_epochs} epochs", flush=True)
            start = time.perf_counter()
            summary = members.run_ensemble(configs[label], member_dir, progress=False)
            total = time.perf_counter() - start
            per_trial = epoch_seconds(summary["experiment_dir"])
            work = sum(sum(t) for t in per_trial)
            wall = fit_s.pop("last")
            ideal = work / args.member_concurrency
            rows[label] = {
                "members_finished": summary["members"],
                "members_failed": len(summary["members_failed"]),
                "epochs": sum(len(t) for t in per_trial),
                "fit_wall_s": round(wall, 2),
                "work_s": round(work, 2),
                "ideal_s": round(ideal, 2),
                "wall_over_ideal": round(wall / ideal, 3) if ideal else None,
                "fixed_s_per_member": round((wall * args.member_concurrency - work) / args.members, 2),
                "run_ensemble_s": round(total, 1),
                "driver_cpu_s": round(fit_s.pop("driver_cpu_s"), 2),
                "stages": member_stages(
                    summary, fit_s.pop("start_epoch_s"), fit_s.pop("end_epoch_s"), per_trial, args.member_concurrency
                ),
                "experiment_dir": summary["experiment_dir"],
            }
            print(f"[members] {label}: fit {wall:.1f} s, work {work:.1f} s", flush=True)
    finally:
        members.build_tuner = build_tuner
    if len(rows) < 2:
        return {"paths": rows, "fixed_cost_ratio": None, "fit_wall_ratio": None}
    a, b = rows["in process"], rows["TorchTrainer"]
    return {
        "paths": rows,
        "fixed_cost_ratio": round(b["fixed_s_per_member"] / a["fixed_s_per_member"], 2)
        if a["fixed_s_per_member"] > 0
        else None,
        "fit_wall_ratio": round(b["fit_wall_s"] / a["fit_wall_s"], 2),
    }


def print_members(m: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nMembers: {args.members} levynet members x {args.member_epochs} epochs, {args.member_concurrency} at once, "
        f"{args.member_cpus:g} CPU each, {args.patients} synthetic patients"
    )
    print(
        f"{'path':<14}{'members':>8}{'fit wall s':>12}{'work s':>9}{'ideal s':>9}{'wall/ideal':>12}"
        f"{'fixed s/member':>16}{'run_ensemble s':>16}"
    )
    for label, row in m["paths"].items():
        print(
            f"{label:<14}{row['members_finished']:>8}{row['fit_wall_s']:>12.1f}{row['work_s']:>9.1f}"
            f"{row['ideal_s']:>9.1f}{row['wall_over_ideal']:>12.2f}{row['fixed_s_per_member']:>16.2f}"
            f"{row['run_ensemble_s']:>16.1f}"
        )
    print("Where the fit went (from the members' MLflow runs):")
    print(
        f"{'path':<14}{'start s':>9}{'members s':>11}{'end s':>8}{'in-run s/member':>17}"
        f"{'between s/member':>18}{'driver CPU s':>14}"
    )
    for label, row in m["paths"].items():
        st = row["stages"]
        if st:
            print(
                f"{label:<14}{st['start_s']:>9.1f}{st['span_s']:>11.1f}{st['end_s']:>8.1f}"
                f"{st['in_run_s_per_member']:>17.2f}{st['between_s_per_member']:>18.2f}{row['driver_cpu_s']:>14.1f}"
            )
    if m["fixed_cost_ratio"] is not None:
        print(
            f"TorchTrainer / in process: fixed cost per member {m['fixed_cost_ratio']}x, "
            f"members' wall {m['fit_wall_ratio']}x"
        )


# --- main ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import optuna
    import ray
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part",
        choices=("overhead", "search", "members", "both", "all"),
        default="both",
        help="both: overhead and search",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray this script starts")
    overhead = parser.add_argument_group("overhead")
    overhead.add_argument("--trials-overhead", type=int, default=200, help="number of tiny trials")
    overhead.add_argument("--work-s", type=float, default=0.5, help="seconds of work (sleep) per trial")
    overhead.add_argument("--reports", type=int, default=5, help="tune.report calls per trial")
    overhead.add_argument("--concurrency", type=int, default=8, help="trials at once")
    overhead.add_argument("--reuse-actors", action="store_true", help="TuneConfig(reuse_actors=True)")
    search = parser.add_argument_group("search")
    search.add_argument("--trials", type=int, default=8, help="trials per search (tune.num_samples)")
    search.add_argument("--epochs", type=int, default=6, help="train.epochs: the most a trial runs")
    search.add_argument("--patients", type=int, default=120, help="synthetic patients")
    search.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="train.cpus_per_worker; with 2 CPUs, 1 leaves no room for a second Train run beside "
        "the trials' 0.01 CPU each, so trials train one at a time (0.99 lets two)",
    )
    search.add_argument("--seed", type=int, default=0, help="tune.seed (the same for both searches)")
    search.add_argument(
        "--metric",
        choices=("val_auc", "val_loss"),
        default="val_auc",
        help="tune.metric: what TPE and ASHA optimise (the target is a val AUC either way)",
    )
    search.add_argument("--target-auc", type=float, help="default: the lower of the two searches' best val AUC")
    members = parser.add_argument_group("members")
    members.add_argument("--members", type=int, default=6, help="ensemble members per path")
    members.add_argument("--member-epochs", type=int, default=2, help="train.epochs of each member")
    members.add_argument("--member-concurrency", type=int, default=2, help="ensemble.max_concurrent_trials")
    members.add_argument("--member-cpus", type=float, default=0.99, help="train.cpus_per_worker of each member")
    members.add_argument(
        "--member-paths",
        choices=("both", "in-process", "torchtrainer"),
        default="both",
        help="which paths to run (one alone: e.g. 100 members in process, where the TorchTrainer half takes an hour)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="overhead 20 trials x 0.2 s; search 2 trials x 2 epochs, 40 patients; members 2 x 1 epoch",
    )
    parser.add_argument("--keep", action="store_true", help="keep the overhead experiment folder")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.smoke:
        args.trials_overhead, args.work_s = 20, 0.2
        args.trials, args.epochs, args.patients = 2, 2, 40
        args.members, args.member_epochs = 2, 1
    if args.reports < 1 or args.concurrency < 1 or args.trials_overhead < 1 or args.work_s <= 0:
        parser.error("--reports, --concurrency and --trials-overhead must be >= 1, --work-s > 0")

    workdir = resolve_workdir(args.workdir) / "benchmarks"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "settings": {**vars(args), "workdir": str(workdir)}}
    if args.part in ("overhead", "both", "all"):
        info = start_ray(args.num_cpus, dashboard=False)
        try:
            result["overhead"] = run_overhead(args, workdir)
        finally:
            stop_ray(info)
    if args.part in ("search", "both", "all"):
        info = start_ray(args.num_cpus, dashboard=True)
        try:
            result["search"] = run_searches(args, workdir)
        finally:
            stop_ray(info)
    if args.part in ("members", "all"):
        info = start_ray(args.num_cpus, dashboard=True)
        try:
            result["members"] = run_members(args, workdir)
        finally:
            stop_ray(info)
    result["total_s"] = round(time.perf_counter() - started, 1)

    out = workdir / "tune.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    if "overhead" in result:
        print_overhead(result["overhead"])
    if "search" in result:
        print_search(result["search"], args)
    if "members" in result:
        print_members(result["members"], args)
    print(f"\ntotal {result['total_s']:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
