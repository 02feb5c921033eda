"""PostgreSQL and an `mlflow server` on it, on 127.0.0.1, for tests/test_mlflow_server.py.

PostgreSQL comes from ``scripts/start_postgres.sh`` (Debian's postgresql, installed when missing and
started on loopback; `.ci/run` calls it too), or from ``$MAMMO_RAY_TEST_PG_URI``. Without it the
tests fail with the script's message: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ray_head import BIN, REPO, free_port


def postgres_uri() -> str:
    """A role's URI on a running PostgreSQL (its database: ``mlflow``)."""
    if os.environ.get("MAMMO_RAY_TEST_PG_URI"):
        return os.environ["MAMMO_RAY_TEST_PG_URI"]
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "start_postgres.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(
            "PostgreSQL for the MLflow server tests could not be installed or started "
            f"(scripts/start_postgres.sh exited {proc.returncode}); set MAMMO_RAY_TEST_PG_URI or fix "
            f"the script:\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return Path(proc.stdout.strip().splitlines()[-1]).read_text().strip()


@contextmanager
def fresh_database(uri: str) -> Iterator[str]:
    """A new, empty database on ``uri``'s server (dropped afterwards): its URI."""
    import psycopg

    name = f"mlflow_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(uri)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def mlflow_server(
    backend_uri: str, artifacts: Path, log: Path, workers: int = 2, timeout_s: float = 300
) -> Iterator[Server]:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts (``--artifacts-destination``): clients upload
    through the server, so they need no access to the store. As docs/walkthrough.md runs it: the backend
    URI in ``MLFLOW_BACKEND_STORE_URI`` without its password, which libpq reads from ``PGPASSWORD``; neither
    is on the command line, where ``ps`` would show it."""
    port = free_port()
    parts = urlsplit(backend_uri)
    bare = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": bare,
        "PGPASSWORD": parts.password or "",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{server.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{server.log_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
