"""Connecting to Ray: an existing cluster when one is named, else a local one on this machine."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A free loopback port, bound and released (for servers that cannot share one)."""
    # Bound and released: Ray's dashboard cannot share a port (no SO_REUSEPORT), so it cannot be held
    # as ``reserved_port`` holds one. The kernel hands out ephemeral ports in turn, so the gap matters
    # only against a process that picks this very number itself.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def reserved_port() -> Iterator[int]:
    """A free loopback port, held for a server that binds it with SO_REUSEPORT until the block ends.

    Picking a port by binding port 0, closing the socket and passing the number on leaves a gap in
    which another process can take it. Here the socket stays bound (not listening) with SO_REUSEPORT
    and without SO_REUSEADDR: no other process can bind the port meanwhile, except one of this user
    that sets SO_REUSEPORT too, as gRPC servers (Ray's client server) and Ray Serve's HTTP proxy do
    (Serve's default, ``SERVE_SOCKET_REUSE_PORT_ENABLED=1``). Connections go to the server's
    listening socket, never to this one. Hold it until the server listens; where a server can bind
    port 0 and report its port, that is used instead.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``), or
    start a local Ray with its dashboard on 127.0.0.1. Does nothing when Ray is already up.

    Either way the MLflow runs that trials and tasks create name this command as their source
    (``tracking.driver_source``): its description is put in this process's environment, which a
    local Ray's processes inherit, and in the job's ``runtime_env`` on a cluster, whose processes
    do not inherit it (Ray merges it with the ``runtime_env`` of ``ray job submit``).

    ``log_to_driver=False`` keeps what the workers print out of this console: it stays in Ray's
    session log folder (``ray_log_dir``)."""
    import ray

    from mammo_ray.train.tracking import share_driver_source

    if ray.is_initialized():
        return
    source = share_driver_source()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": source}, log_to_driver=log_to_driver)
        return
    # The dashboard serves Ray's state API. Train's placement-group cleaner polls it to free the
    # resources of a trial that ASHA stops (without it they stay reserved and a search stalls).
    # Its address is pinned in the environment, which Ray's workers inherit: with a second Ray on
    # the same machine, an unpinned state-API call fails with "multiple active Ray instances".
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=log_to_driver,
    )


def ray_log_dir() -> str:
    """The log folder of the Ray session this process is connected to (its workers' stdout and stderr)."""
    import ray

    if not ray.is_initialized():
        return "-"
    context = ray.get_runtime_context()
    return str(Path(context.get_temp_dir()) / context.get_session_name() / "logs")
