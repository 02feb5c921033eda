"""A console a person can read: the libraries' chatter goes to a log file under the work directory.

Ray, MLflow and Optuna log at INFO to the console (a new Ray instance, its token, database
migrations, "wrote the experiment state", Serve's replica events, artifact download bars), and the
Ray processes that run trials forward everything they print. ``quiet_libraries`` sends those
loggers' records (and Python warnings) to ``<workdir>/logs/<command>-<time>.log`` and keeps only
their errors on the console; ``start_ray`` starts Ray without forwarding its workers' output (it
stays in Ray's session log folder) and says where both are. What mammo-ray itself reports (a line
per trial and epoch, the results) and every error stay on the console.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LIBRARIES = ("ray", "mlflow", "optuna", "alembic", "py.warnings", "filelock", "urllib3")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handlers: dict[Path, logging.FileHandler] = {}


def log_path(workdir: Path, command: str) -> Path:
    """``<workdir>/logs/<command>-<YYYYmmdd-HHMMSS>-<pid>.log``; the folder is created."""
    folder = workdir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def quiet_libraries(path: Path) -> None:
    """Route the libraries' log records (INFO and up) and Python warnings to ``path``; their console
    handlers keep only errors. Idempotent: call it again after a library added its own handlers
    (``ray.init``, ``serve.start``)."""
    handler = _handlers.get(path)
    if handler is None:
        handler = _handlers[path] = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.setLevel(logging.INFO)
    logging.captureWarnings(True)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # its download bars, in every process
    names = set(LIBRARIES) | {
        name for name in logging.root.manager.loggerDict if name.split(".")[0] in {n.split(".")[0] for n in LIBRARIES}
    }
    for name in sorted(names):
        logger = logging.getLogger(name)
        for other in logger.handlers:
            if _is_console(other):
                other.setLevel(max(other.level, logging.ERROR))
        if name in LIBRARIES:
            if handler not in logger.handlers:
                logger.addHandler(handler)
            logger.propagate = False  # the root logger's handlers (pytest's, a user's) get nothing twice
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)


def start_ray(address: str | None, path: Path) -> None:
    """``init_ray`` with the workers' output kept out of the console, and a line that says where the logs are."""
    import ray

    from mammo_ray.ray_session import init_ray, ray_log_dir

    quiet_libraries(path)
    # Tune's default output engine prints a configuration table per run even at verbose=0; the legacy one
    # prints nothing at verbose=0, and mammo-ray prints its own line per trial event (search.progress).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    init_ray(address, log_to_driver=False)
    quiet_libraries(path)  # Ray set up its loggers in init
    print(f"logs: Ray, MLflow and Optuna in {path}; Ray's workers in {ray_log_dir()}", file=sys.stderr, flush=True)
