"""Serve benchmark: HTTP latency (p50/p95) against the same prediction called in-process, and
requests per second under concurrency, measured side by side in one run.

    python benchmarks/bench_serve.py                       # 4 levynet members at 64 px, 200 requests
    python benchmarks/bench_serve.py --model resnet18 --members 10 --px 224 --requests 300 --clients 32
    python benchmarks/bench_serve.py --smoke               # tiny: a check that it runs
    python benchmarks/bench_serve.py --haproxy             # Serve's high-throughput mode: HAProxy as the proxy

Members with random weights (speed does not depend on them) are saved as checkpoints and served
the way ``mammo-ray serve`` serves them (``mammo_ray.cli.serve.start_app`` on a local Ray, up to ``--max-batch-size``
requests batched by ``serving/batching.py``; ``--haproxy``: HAProxy and the combined topology, as ``mammo-ray
serve --haproxy`` serves). Each request uploads one 16-bit PNG mammogram with an ROI box. ``in-process``:
``ModelRuntime.predict_items([item])`` on the same input, one call at a time (decode, crop, transform, every
member's forward pass) on as many torch threads as the replica has CPUs: the work a request costs without HTTP,
Serve's proxy, the ingress or the handle. ``http sequential``: the same request over HTTP, one at a time, each in
turn with an in-process call, so both see the same moments of the host: p50(http) - p50(in-process) is Serve's
overhead per request. ``http concurrent``: ``--clients``
threads sending ``--requests`` requests: requests per second, with the batching the load allows.
Results go to WORKDIR/benchmarks/serve.json.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mammo_ray.config import load_config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.models import build_view_model
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint
from mammo_ray.workdir import resolve_workdir


def make_members(name: str, members: int, px: int, out: Path) -> list[Path]:
    config = load_config(None, [f"model.name={name}", f"data.cache_px={px}", f"data.input_px={px}"])
    spec = TransformSpec.from_config(config.data)
    paths = []
    for seed in range(members):
        torch.manual_seed(seed)
        model = build_view_model(config.model).eval()
        paths.append(
            save_checkpoint(
                checkpoint_payload(model=model, config=config, spec=spec, epoch=0), out / f"member_{seed:03d}"
            )
        )
    return paths


def register(members: list[Path], out: Path) -> tuple[str, str]:
    """The members as one registered ensemble version in a local SQLite store, as `mammo-ray ensemble` does."""
    from mlflow import MlflowClient

    from mammo_ray.ensemble.model import register_ensemble

    uri = f"sqlite:///{(out / 'serve-mlflow.db').resolve()}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-serve")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("bench-serve", artifact_location=str((out / "serve-artifacts").resolve()))
    )
    run = client.create_run(experiment_id)
    registered = register_ensemble(uri, run.info.run_id, members, [""] * len(members), "bench-serve")
    client.set_terminated(run.info.run_id)
    return registered["model_uri"], uri


def upload() -> tuple[bytes, str]:
    rng = np.random.default_rng(0)
    image = rng.normal(2000, 200, (640, 384)).clip(0, 65535)
    yy, xx = np.mgrid[:640, :384]
    image[(yy - 300) ** 2 + (xx - 150) ** 2 < 30**2] += 1500
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue(), "110,260,190,340"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``{"ingress": ms, ..., "batch": requests}`` from a ``Server-Timing`` header (other entries without ``dur``
    are left out)."""
    stages = {}
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                stages[name] = float(value)
            elif key.strip() == "desc" and name == "batch":
                stages[name] = float(value.strip('"').split()[0])
    return stages


def http_post(url: str, data: bytes, box: str, timings: list[dict[str, float]] | None = None) -> int:
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="scan.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="box"\r\n\r\n{box}\r\n--{boundary}--\r\n'
        ).encode()
    )
    request = urllib.request.Request(
        f"{url}/v1/predict",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            reply.read()
            if timings is not None:
                timings.append(parse_server_timing(reply.headers.get("Server-Timing")))
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


STAGES = {
    "proxy": "client to the app and back: HTTP, Serve's proxy (or HAProxy), the hop to the ingress (client - total)",
    "ingress": "the app before the model call: auth, multipart parsing, form checks",
    "queue": "the handle's hop to the model replica and the batch wait",
    "model": "the batch's work in the replica: decode, crop, transform, every member",
    "return": "the reply's hop back from the model replica",
    "total": "the app's time, arrival to reply",
    "client": "what the client measured",
}


def stage_profile(timings: list[dict[str, float]]) -> dict[str, float]:
    """The median of each stage over the sequential requests; ``proxy`` is the client's time beyond the app's."""
    for t in timings:
        t["proxy"] = t["client"] - t.get("total", 0.0)
    return {name: float(np.median([t[name] for t in timings if name in t])) for name in STAGES if timings}


def measure_serve(
    out: Path,
    *,
    model: str = "levynet",
    members: int = 4,
    px: int = 64,
    requests: int = 200,
    clients: int = 16,
    max_batch_size: int = 8,
    batch_wait_s: float | None = None,
    execution: str = "auto",
    device: str = "auto",
    num_gpus: float = 0.0,
    topology: str = "split",
) -> tuple[dict, dict]:
    """In-process, HTTP one-at-a-time and HTTP concurrent figures of one served ensemble, in one run.

    Members are saved and registered under ``out``; Serve runs on the local Ray (started by
    ``start_app`` unless one is up) and is shut down at the end. ``device`` and ``num_gpus`` are
    the ``ServeSettings`` of the replica (the in-process runtime uses ``device`` too).

    Returns:
        ``(record, execution)``: the figures (``in_process``, ``http_sequential``, ``http_concurrent``,
        ``in_process_requests_per_s``) and the in-process runtime's execution report.
    """
    paths = make_members(model, members, px, out / "serve-members")
    data, box = upload()
    model_uri, tracking = register(paths, out)
    settings = ServeSettings(
        model=model_uri,
        tracking_uri=tracking,
        workdir=str(out),
        device=device,
        execution=execution,
        max_batch_size=max_batch_size,
        **({} if batch_wait_s is None else {"batch_wait_timeout_s": batch_wait_s}),
        num_cpus=1,
        num_gpus=num_gpus,
        topology=topology,
        max_ongoing_requests=max(16, max_batch_size),
        max_queued_requests=4 * requests,
    )
    runtime = ModelRuntime(settings)
    item = PredictItem(files={"file": ("scan.png", data)}, rois={"box": box})

    def in_process() -> float:
        # The replica's torch runs on as many threads as it holds CPUs (Ray sets OMP_NUM_THREADS from num_cpus):
        # in-process runs on as many, so the difference is Serve's and not a second core's.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(settings.num_cpus)))
        try:
            start = time.perf_counter()
            runtime.predict_items([item])
            return time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)

    from ray import serve

    from mammo_ray.cli.serve import start_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    served = settings.model_dump(mode="json")
    try:
        url = start_app(served, "127.0.0.1", port)
        in_process()  # warm-up, both ways
        http_post(url, data, box)
        # One at a time, in-process and over HTTP in turn: both see the same moments of a noisy host.
        local, sequential, timings = [], [], []
        for _ in range(requests):
            local.append(in_process())
            start = time.perf_counter()
            status = http_post(url, data, box, timings)
            sequential.append(time.perf_counter() - start)
            assert status == 200, status
            timings[-1]["client"] = sequential[-1] * 1000
        start = time.perf_counter()
        loaded: list[dict[str, float]] = []
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda _: http_post(url, data, box, loaded), range(requests)))
        wall = time.perf_counter() - start
    finally:
        serve.shutdown()
    record = {
        "in_process": percentiles(local),
        "http_sequential": percentiles(sequential),
        "http_concurrent": {
            "clients": clients,
            "requests": requests,
            "wall_s": wall,
            "requests_per_s": requests / wall,
            "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            # what the replica did under this load: requests per batch, and each stage's median (ms)
            "mean_batch": float(np.mean([t["batch"] for t in loaded if "batch" in t])) if loaded else None,
            "stages_p50_ms": {
                name: float(np.median([t[name] for t in loaded if name in t]))
                for name in ("ingress", "queue", "model", "total")
                if any(name in t for t in loaded)
            },
        },
        "in_process_requests_per_s": 1 / statistics.mean(local),
        "in_process_threads": max(1, int(settings.num_cpus)),
        "stages_p50_ms": stage_profile(timings),
    }
    return record, runtime.execution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="levynet")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--px", type=int, default=64, help="input side of the members")
    parser.add_argument("--requests", type=int, default=200, help="requests of each measurement")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait", type=float, help="batch_wait_timeout_s of the replica (default: the app's)")
    parser.add_argument("--execution", default="auto", choices=["auto", "loop", "stacked"])
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="Ray Serve's high-throughput mode (`mammo-ray serve --haproxy`): HAProxy in place of the Python proxy",
    )
    parser.add_argument(
        "--topology",
        choices=["split", "combined"],
        help="split: an ingress deployment and a model deployment; combined: both in one deployment "
        "(default: combined with --haproxy, as `mammo-ray serve --haproxy` serves, else split)",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.smoke:
        args.members, args.requests, args.clients = 2, 20, 4
    out = resolve_workdir(args.workdir) / "benchmarks"
    if args.haproxy:  # before Ray and Serve start: they read the mode from the environment
        from mammo_ray.cli.serve import use_haproxy

        use_haproxy(out / "haproxy")
    args.topology = args.topology or ("combined" if args.haproxy else "split")
    figures, execution = measure_serve(
        out,
        model=args.model,
        members=args.members,
        px=args.px,
        requests=args.requests,
        clients=args.clients,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait,
        execution=args.execution,
        topology=args.topology,
    )
    record = {
        **figures,
        "execution": execution,
        "settings": vars(args),
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    lp, hp = record["in_process"], record["http_sequential"]
    print(
        f"{'HAProxy' if args.haproxy else 'Serve proxy'}, {args.topology} topology, "
        f"{args.members} x {args.model} at {args.px} px, {args.requests} requests, execution "
        f"{execution['chosen']} (loop {execution['loop_s']}, stacked {execution['stacked_s']})"
    )
    print("| path | p50 ms | p95 ms | requests/s |")
    print("|---|---|---|---|")
    rate = record["in_process_requests_per_s"]
    print(f"| in-process ModelRuntime | {lp['p50_ms']:.1f} | {lp['p95_ms']:.1f} | {rate:.1f} |")
    print(f"| HTTP, one at a time | {hp['p50_ms']:.1f} | {hp['p95_ms']:.1f} | {1000 / hp['mean_ms']:.1f} |")
    loaded = record["http_concurrent"]
    print(
        f"| HTTP, {args.clients} clients | | | {loaded['requests_per_s']:.1f} "
        f"({loaded['requests_per_s'] / rate:.2f}x in-process; {loaded['mean_batch'] or 0:.1f} requests a batch) |"
    )
    print("\n| stage (HTTP one at a time, Server-Timing) | p50 ms | what it is |")
    print("|---|---|---|")
    for name, ms in record["stages_p50_ms"].items():
        print(f"| {name} | {ms:.2f} | {STAGES[name]} |")
    print(
        f"Serve overhead per request (p50 http - p50 in-process): {hp['p50_ms'] - lp['p50_ms']:.1f} ms; "
        f"statuses {record['http_concurrent']['statuses']}"
    )
    (out / "serve.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"written {out / 'serve.json'}")


if __name__ == "__main__":
    main()
