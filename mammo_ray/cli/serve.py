"""The serving command: ``mammo-ray serve``, the Ray Serve app on a local Ray (or ``$RAY_ADDRESS``) until
Ctrl-C / SIGTERM; ``start_app`` and ``wait_ready`` also serve ``mammo-ray demo``, the tests and the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from mammo_ray.cli.console import log_path, quiet_libraries, start_ray
from mammo_ray.cli.output import AddCommand, CommandResult

APP_NAME = "mammo-ray"


def _settings(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import yaml

    from mammo_ray.serving.runtime import ServeSettings

    values: dict[str, Any] = {"model": args.model, "workdir": str(workdir)}
    if args.tracking_uri:
        values["tracking_uri"] = args.tracking_uri
    for item in args.options:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (a ServeSettings field)")
        values[key.strip()] = yaml.safe_load(text)
    try:
        return ServeSettings(**values).model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - pydantic names the field
        raise ValueError(f"serve settings: {exc}") from None


def wait_ready(url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Poll ``/v1/health`` until it answers 200 (the proxy answers 404 until the app is up)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=5) as reply:
                if reply.status == 200:
                    return json.loads(reply.read())
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise TimeoutError(f"{url}/v1/health not ready after {timeout_s:.0f} s ({last})")


def start_app(
    settings: dict[str, Any], host: str, port: int, address: str | None = None, *, logs: Path | None = None
) -> str:
    """Start Serve on ``host:port`` with the app and wait until it is healthy; returns the base URL.
    With ``logs``, Ray's and Serve's own log records go to that file (``console.start_ray``)."""
    from ray import serve

    from mammo_ray.ray_session import init_ray
    from mammo_ray.serving.app import build_app

    if logs is not None:
        start_ray(address, logs)
    else:
        init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    if logs is not None:
        quiet_libraries(logs)  # Serve's driver-side logger is set up by serve.start
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    wait_ready(url)
    return url


def cmd_serve(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from ray import serve

    settings = _settings(args, workdir)
    url = start_app(settings, args.host, args.port, args.address, logs=log_path(workdir, "serve"))
    with urllib.request.urlopen(f"{url}/v1/model", timeout=30) as reply:
        info = json.loads(reply.read())
    print(
        f"serving {info['version']} ({info['members']} members, {info['execution']['chosen']} execution on "
        f"{info['device']}) at {url}  (docs: {url}/docs); Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.for_seconds:
        stop.wait(args.for_seconds)
    else:
        while not stop.wait(1.0):
            pass
    serve.delete(APP_NAME)
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # This command's own Ray goes down with it: stopping it takes Serve along, without the
        # controller's "graceful_shutdown" actor-died line that serve.shutdown() prints.
        import ray

        ray.shutdown()
    # On a cluster only this app goes: serve.shutdown() there would stop every other app too.
    result = {"url": url, "model": info["version"], "members": info["members"], "stopped": True}
    return result, f"stopped serving {info['version']}"


def add_serve_command(add: AddCommand) -> None:
    p = add(
        "serve",
        cmd_serve,
        "Serve the ensemble over HTTP with Ray Serve (FastAPI: POST /v1/predict, "
        "POST /v1/localize, GET /v1/health, GET /v1/model, docs at /docs) until Ctrl-C.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a checkpoint (file or folder), an MLflow run id, or a registered ensemble "
        "(models:/<name>/<version> or models:/<name>@<alias>)",
    )
    p.add_argument("--tracking-uri", help="MLflow store of --model (default: as `train` uses)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ServeSettings value (repeatable; the override flag of every command), "
        "e.g. --set max_batch_size=16 --set num_gpus=0.25",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--for-seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
