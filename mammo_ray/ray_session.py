"""Connecting to Ray: an existing cluster when one is named, else a local one on this machine."""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``), or
    start a local Ray with its dashboard on 127.0.0.1. Does nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # The dashboard serves Ray's state API. Train's placement-group cleaner polls it to free the
    # resources of a trial that ASHA stops (without it they stay reserved and a search stalls).
    # Its address is pinned in the environment, which Ray's workers inherit: with a second Ray on
    # the same machine, an unpinned state-API call fails with "multiple active Ray instances".
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
    )
