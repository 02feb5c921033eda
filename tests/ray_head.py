"""A `ray start --head` cluster on 127.0.0.1 for the job tests, and `ray job submit` / `ray job logs` against it.

The clients are the CLI commands docs/walkthrough.md shows, with the environment it exports
(``RAY_AUTH_MODE=token``, ``RAY_API_SERVER_ADDRESS``). Other Ray instances may run on the same
machine (a demo, other tests), so the head keeps to itself: its own temp dir (``ray.init()``
elsewhere does not find it through ``/tmp/ray/ray_current_cluster``), its own ports, and it is
stopped by signalling its own ``ray start --block`` process, never with ``ray stop`` (which stops
every Ray process of the user).
"""

from __future__ import annotations

import json
import os
import re
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    env: dict[str, str]  # the clients' environment: RAY_AUTH_MODE=token, RAY_API_SERVER_ADDRESS
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


@contextmanager
def ray_head(num_cpus: int = 2, timeout_s: float = 180.0) -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))  # short: Unix socket paths are limited
    dashboard = free_port()
    # Nothing of the caller's Ray or MLflow: each job names its tracking URI in its runtime_env.
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
        }
    )
    # A SIGTERM'd head first drains for 30 s (for Kubernetes pod deletion); here nothing is left to drain.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # The token: ~/.ray/auth_token, made only when missing (`ray start` does not make one).
    subprocess.run(
        [RAY, "get-auth-token", "--generate"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
            env=head_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = Head(env, env["RAY_API_SERVER_ADDRESS"], temp_dir, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # ready when the jobs API answers an authenticated client
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if subprocess.run([RAY, "job", "list"], env=env, capture_output=True, timeout=60).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the jobs API did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield head
    finally:
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
    head: Head, submission_id: str, entrypoint: list[str], env_vars: dict[str, str], timeout_s: float = 540
) -> str:
    """``ray job submit --working-dir . --runtime-env-json ... -- ENTRYPOINT`` from the repository root;
    returns what the client printed (the job's output), asserting that the job succeeded."""
    runtime_env = json.dumps({"env_vars": env_vars})
    command = [
        RAY,
        "job",
        "submit",
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        runtime_env,
        "--",
        *entrypoint,
    ]
    proc = subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout_s)
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
