"""A `ray start --head` cluster on 127.0.0.1 for the job tests, and `ray job submit` / `ray job logs` against it.

The clients are the CLI commands docs/walkthrough.md shows, with the environment it exports
(``RAY_AUTH_MODE=token``, ``RAY_API_SERVER_ADDRESS``). Other Ray instances may run on the same
machine (a demo, other tests), so the head keeps to itself: its own temp dir (``ray.init()``
elsewhere does not find it through ``/tmp/ray/ray_current_cluster``), its own token there (not
``~/.ray/auth_token``: nothing is written to the user's home), its own ports, and it is stopped by
signalling its own ``ray start --block`` process, never with ``ray stop`` (which stops every Ray
process of the user). tests/conftest.py shares one head between the test files (fixture ``ray_cluster``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mammo_ray.ray_session import reserved_port  # re-exported: the job, serve and first-command tests use it

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# The jobs' data and training, shrunk for 2 cores: levynet on 32-px crops of 40 synthetic patients.
SHRINK = [
    "data.synth_patients=40",
    "data.synth_size=[384, 240]",
    "data.cache_px=40",
    "data.input_px=32",
    "train.epochs=2",
    "train.eval_bootstrap=50",
]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Head:
    env: dict[str, str]  # the clients' environment: RAY_AUTH_MODE=token, its token file, RAY_API_SERVER_ADDRESS
    address: str  # the dashboard / jobs API, http://127.0.0.1:<port>
    temp_dir: Path
    log: Path


def _own_leftovers(marker: str) -> list[int]:
    """PIDs of processes whose command line names this head's temp dir (Ray's processes and workers) or
    that run inside it (job drivers run in the job's working_dir copy there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") or os.readlink(
                    entry / "cwd"
                ).startswith(marker):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# `ray start` prints where the dashboard it started listens (the port it bound, from --dashboard-port=0):
# "To monitor and debug Ray, view the dashboard at" and, on the next line, "127.0.0.1:PORT".
_DASHBOARD = re.compile(r"view the dashboard at[^\n]*\n[^\n]*?(127\.0\.0\.1:\d+)")


@contextmanager
def ray_head(num_cpus: int = 2, timeout_s: float = 180.0) -> Iterator[Head]:
    """``ray start --head --block`` on 127.0.0.1, stopped on exit. Ports: GCS, dashboard and dashboard
    agent bind port 0 and Ray reports them; the Ray client server cannot (Ray rejects port 0 there),
    so its port is a ``reserved_port`` (gRPC binds with SO_REUSEPORT), held until it listens."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))  # short: Unix socket paths are limited
    # The token in the head's own temp dir, named by RAY_AUTH_TOKEN_PATH for the head and its clients:
    # `ray get-auth-token --generate` would write ~/.ray/auth_token, in the user's home.
    token = temp_dir / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    # Nothing of the caller's Ray or MLflow: each job names its tracking URI in its runtime_env. The
    # caller's own environment (os.environ) is left as it is; these are the subprocesses' copies.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN")
    }
    # HOME too is the head's own: what Ray, its jobs and their libraries keep under ~ (MLflow's telemetry id
    # in ~/.config, matplotlib's font cache in ~/.cache) goes there, not into the user's home.
    home = temp_dir / "home"
    home.mkdir()
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
    )
    # A SIGTERM'd head first drains for 30 s (for Kubernetes pod deletion); here nothing is left to drain.
    # Serve's proxy binds its port with SO_REUSEPORT (Serve's default, pinned here), which lets it take
    # a port the tests hold with reserved_port.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "SERVE_SOCKET_REUSE_PORT_ENABLED": "1"}
    log = temp_dir / "ray-start.log"
    with reserved_port() as client_port, log.open("w") as out:
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--port=0",
                "--dashboard-host=127.0.0.1",
                "--dashboard-port=0",
                "--dashboard-agent-listen-port=0",
                f"--ray-client-server-port={client_port}",
                f"--num-cpus={num_cpus}",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
            env=head_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            head = _wait_ready(proc, env, temp_dir, log, client_port, timeout_s)
        except BaseException:
            _stop(proc, temp_dir)
            raise
    try:
        yield head
    finally:
        _stop(proc, temp_dir)


def _wait_ready(
    proc: subprocess.Popen, env: dict[str, str], temp_dir: Path, log: Path, client_port: int, timeout_s: float
) -> Head:
    """Wait until the jobs API answers an authenticated client and the client server listens."""
    deadline = time.monotonic() + timeout_s
    address = None
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if address is None and (found := _DASHBOARD.search(log.read_text(errors="replace"))):
            address = f"http://{found.group(1)}"
            env["RAY_API_SERVER_ADDRESS"] = address
        if (
            address is not None
            and listening(client_port)
            and subprocess.run([RAY, "job", "list"], env=env, capture_output=True, timeout=60).returncode == 0
        ):
            return Head(env, address, temp_dir, log)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the jobs API did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(2)


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(1)
    for pid in _own_leftovers(str(temp_dir)):  # workers and job drivers that outlived their raylet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(
    head: Head,
    submission_id: str,
    entrypoint: list[str],
    env_vars: dict[str, str],
    timeout_s: float = 540,
    secret_env_vars: dict[str, str] | None = None,
) -> str:
    """``ray job submit --working-dir . --runtime-env-json ... -- ENTRYPOINT`` from the repository root;
    returns what the client printed (the job's output), asserting that the job succeeded. The job also
    gets the head's RAY_API_SERVER_ADDRESS (Ray's state API, which Train polls, finds this head by it).

    ``secret_env_vars`` (MLFLOW_TRACKING_PASSWORD and the like) join the job's ``env_vars`` too, but
    never the command line, where ``ps`` would show them: with them the runtime env goes in a file
    readable by the user alone (``--runtime-env FILE``), removed once the job is over. Ray itself still
    shows them in ``ray job list`` and writes them to the head's runtime_env_agent.log: for a test head only."""
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": head.address, **env_vars, **(secret_env_vars or {})}}
    env_file = None
    if secret_env_vars:
        fd, name = tempfile.mkstemp(prefix="runtime-env-", suffix=".yaml", dir=head.temp_dir)  # mode 600
        env_file = Path(name)
        with os.fdopen(fd, "w") as out:
            json.dump(runtime_env, out)  # JSON is YAML
        runtime_env_args = ["--runtime-env", str(env_file)]
    else:
        runtime_env_args = ["--runtime-env-json", json.dumps(runtime_env)]
    command = [
        RAY,
        "job",
        "submit",
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        *runtime_env_args,
        "--",
        *entrypoint,
    ]
    try:
        proc = subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout_s)
    finally:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"Job '{submission_id}' succeeded" in log, log[-6000:]
    return log


def job_logs(head: Head, submission_id: str) -> str:
    """``ray job logs SUBMISSION_ID``: the job's whole output, read back from the cluster."""
    proc = subprocess.run(
        [RAY, "job", "logs", submission_id], env=head.env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (what a `--json` command or script printed)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON line in:\n{text[-4000:]}")


def field(text: str, label: str) -> str:
    """The value after ``label`` in a CLI summary line, e.g. ``parent run      <id>``."""
    match = re.search(rf"^{re.escape(label)}\s+(\S+)", text, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{text[-4000:]}"
    return match.group(1)
