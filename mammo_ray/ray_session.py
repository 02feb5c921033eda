"""Connecting to Ray: an existing cluster when one is named, else a local one on this machine."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``), or
    start a local Ray with its dashboard on 127.0.0.1. Does nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard serves Ray's state API, which Train's placement-group cleaner polls
        # (without it, it logs a warning every few seconds). Loopback only.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1")
