"""Commands run as a user runs them: the console script in a subprocess with a Ray of its own, and the
processes it leaves behind. (A helper module of the tests, as ray_head.py and setups.py are.)"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAMMO_RAY = str(Path(sys.executable).parent / "mammo-ray")  # the console script pyproject declares


@contextmanager
def own_ray_environment() -> Iterator[tuple[dict[str, str], str]]:
    """(environment, marker) for a command that starts its own Ray: a short temp dir of its own
    (Unix socket paths are limited), a home of its own, none of the caller's Ray or MLflow settings.
    On exit every process still carrying the marker is killed and the folder removed."""
    root = Path(tempfile.mkdtemp(prefix="mr-first-", dir="/tmp"))
    (root / "home").mkdir()
    marker = f"MAMMO_RAY_TEST_RUN={uuid.uuid4().hex}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH")
    }
    env.update(
        {
            "RAY_TMPDIR": str(root),
            "HOME": str(root / "home"),
            "MAMMO_RAY_TEST_RUN": marker.split("=", 1)[1],
            "SERVE_SOCKET_REUSE_PORT_ENABLED": "1",  # Serve's proxy may bind the port reserved_port holds
            "PYTHONUNBUFFERED": "1",
        }
    )
    try:
        yield env, marker
    finally:
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


def processes_with(marker: str) -> list[int]:
    """The processes (not this one) whose environment holds ``marker``: the command and all it started."""
    found, needle = [], marker.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for_exit_of_all(marker: str) -> None:
    """Return once no process carries ``marker`` (Ray's workers end a moment after their driver).
    No deadline here: an orphan that never ends is the test timeout's to report."""
    while processes_with(marker):
        time.sleep(0.5)
