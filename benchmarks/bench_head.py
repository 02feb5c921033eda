"""Head-node benchmark: processes and memory each concurrent ensemble member puts on the node that runs its trial.

    python benchmarks/bench_head.py                                  # 32 members at once, in process
    python benchmarks/bench_head.py --members 8 --torchtrainer       # the multi-worker path, 8 at once
    python benchmarks/bench_head.py --smoke                          # 4 members: a check that it runs

A cluster's head runs every Tune trial of a search or an ensemble (the trials are placed where the driver
is unless resources say otherwise), so the head must hold ``ensemble.max_concurrent_trials`` of them at
once. This runs ``mammo_ray.search.members.run_ensemble`` on tiny synthetic data with ``--members`` members,
all at once, each asking for ``--member-cpus`` CPUs (fractional: 32 x 1/16 fit 2 cores), on a local Ray,
and samples every Ray process once a second: its title (``ray::ImplicitFunc`` for a trial,
``ray::TrainController`` and ``ray::RayTrainWorker`` for a TorchTrainer), RSS and USS (the memory only
that process holds: what one more process adds). The baseline is taken after Ray has started and
the data is prepared, before the first trial. Per member = (peak - baseline) / members running at the
peak, for the process count and for USS. ``--torchtrainer`` runs the members with
``train.in_process=false``: each drives a TorchTrainer, as multi-worker members do; on a cluster its
worker would go to a GPU node while its controller stays beside the trial.
Results are printed and written to WORKDIR/benchmarks/head.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_tune import member_overrides, start_ray

from mammo_ray.workdir import resolve_workdir

TRIAL = "ray::ImplicitFunc.train"  # the title of a function trial's actor while it trains


def own_ray_pids() -> set[int]:
    """The processes of this driver's Ray: the ones it started (raylet, GCS, ...) and all their descendants,
    so another Ray on the machine does not count."""
    import ray

    node = ray._private.worker._global_node  # the local node this driver started
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    pids = set(roots)
    for pid in roots:
        try:
            pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return pids


def ray_processes() -> dict[str, dict[str, float]]:
    """Per process title (``ray::...``, else the executable's name) of this Ray's processes and the driver:
    count, RSS and USS in MiB."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "rss_mib": 0.0, "uss_mib": 0.0})
    for pid in own_ray_pids() | {os.getpid()}:
        try:
            proc = psutil.Process(pid)
            cmd = proc.cmdline()
            title = cmd[0].split(" ")[0] if cmd and cmd[0].startswith("ray::") else proc.name()
            title = "driver" if pid == os.getpid() else title
            memory = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        row = out[title]
        row["count"] += 1
        row["rss_mib"] += memory.rss / 2**20
        row["uss_mib"] += memory.uss / 2**20
    return dict(out)


def totals(sample: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: sum(row[k] for row in sample.values()) for k in ("count", "rss_mib", "uss_mib")}


class Sampler(threading.Thread):
    """``ray_processes()`` every ``period`` seconds until stopped; keeps the sample with the most trials running
    (the largest USS among those)."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.stopped = period, threading.Event()
        self.peak: dict[str, dict[str, float]] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            sample = ray_processes()
            self.samples += 1
            key = (sample.get(TRIAL, {}).get("count", 0), totals(sample)["uss_mib"])
            best = (self.peak.get(TRIAL, {}).get("count", 0), totals(self.peak)["uss_mib"] if self.peak else 0.0)
            if key > best:
                self.peak = sample
            self.stopped.wait(self.period)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=32, help="members, all running at once")
    parser.add_argument("--member-cpus", type=float, help="CPUs per member (default: 2 / members)")
    parser.add_argument("--member-epochs", type=int, default=1)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--torchtrainer", action="store_true", help="members drive a TorchTrainer (multi-worker path)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.smoke:
        args.members = 4
    member_cpus = args.member_cpus or args.num_cpus / args.members
    if args.torchtrainer:  # the trial holds 0.01 CPU besides its worker's share
        member_cpus = max(0.01, member_cpus - 0.01)
    out = resolve_workdir(args.workdir) / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    bench = argparse.Namespace(
        patients=args.patients,
        member_epochs=args.member_epochs,
        member_cpus=member_cpus,
        members=args.members,
        member_concurrency=args.members,
    )

    import mammo_ray.search.members as members
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared

    config = load_config(None, member_overrides(bench, in_process=not args.torchtrainer))
    info = start_ray(args.num_cpus, dashboard=False)
    try:
        ensure_prepared(config, out / "head", progress=False)
        time.sleep(2)  # Ray's idle workers settle
        baseline = ray_processes()
        sampler = Sampler()
        sampler.start()
        start = time.perf_counter()
        summary = members.run_ensemble(config, out / "head", progress=False)
        wall = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
    finally:
        import ray

        ray.shutdown()
    peak, base = totals(sampler.peak), totals(baseline)
    running = sampler.peak.get(TRIAL, {}).get("count", 0)
    per_member = {k: round((peak[k] - base[k]) / running, 2) if running else None for k in peak}
    record = {
        "path": "TorchTrainer" if args.torchtrainer else "in process",
        "members": args.members,
        "members_finished": summary["members"],
        "member_cpus": member_cpus,
        "trials_running_at_peak": running,
        "baseline": {"totals": base, "by_title": baseline},
        "peak": {"totals": peak, "by_title": sampler.peak},
        "per_member": per_member,
        "samples": sampler.samples,
        "run_ensemble_s": round(wall, 1),
        "ray": info,
        "load_average": os.getloadavg(),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30,
        },
    }
    print(f"{record['path']}: {args.members} members at once ({member_cpus:g} CPU each), {running} running at the peak")
    print("| process | baseline count | peak count | peak RSS MiB | peak USS MiB |")
    print("|---|---|---|---|---|")
    for title in sorted(set(baseline) | set(sampler.peak)):
        b, p = baseline.get(title, {}), sampler.peak.get(title, {})
        print(
            f"| {title} | {b.get('count', 0):.0f} | {p.get('count', 0):.0f} | "
            f"{p.get('rss_mib', 0):.0f} | {p.get('uss_mib', 0):.0f} |"
        )
    print(
        f"per member on the head: {per_member['count']} processes, {per_member['uss_mib']} MiB USS "
        f"({per_member['rss_mib']} MiB RSS); peak total USS {peak['uss_mib']:.0f} MiB; load average "
        f"{record['load_average'][0]:.1f}"
    )
    (out / "head.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"written {out / 'head.json'}")


if __name__ == "__main__":
    main()
