"""A console a person can read: the libraries' chatter goes to a log file under the work directory.

Ray, MLflow and Optuna log at INFO to the console (a new Ray instance, its token, database
migrations, "wrote the experiment state", Serve's replica events, artifact download bars), and the
Ray processes that run trials forward everything they print. ``quiet_libraries`` sends those
loggers' records (and Python warnings) to ``<workdir>/logs/<command>-<time>.log`` and keeps only
their errors on the console; ``start_ray`` starts Ray without forwarding its workers' output (it
stays in Ray's session log folder) and says where both are. What mammo-ray itself reports (a line
per trial and epoch, the results) and every error stay on the console. ``restore_libraries`` undoes
every change when the command ends (``cli.app.main``), so a command run in-process (a test, a
notebook) leaves the caller's logging as it found it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

LIBRARIES = ("ray", "mlflow", "optuna", "alembic", "py.warnings", "filelock", "urllib3")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handlers: dict[Path, logging.FileHandler] = {}
_undo: list[Callable[[], None]] = []  # how to put back what quiet_libraries changed, newest last


def _set_env(name: str, value: str) -> None:
    previous = os.environ.get(name)
    if previous == value:
        return
    os.environ[name] = value

    def undo() -> None:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous

    _undo.append(undo)


def restore_libraries() -> None:
    """Undo ``quiet_libraries`` and ``start_ray``'s changes to loggers, warnings and the environment."""
    while _undo:
        _undo.pop()()
    for handler in _handlers.values():
        handler.close()
    _handlers.clear()


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
    if getattr(logging, "_warnings_showwarning", None) is None:  # not captured yet
        logging.captureWarnings(True)
        _undo.append(functools.partial(logging.captureWarnings, False))
    _set_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its download bars, in every process
    names = set(LIBRARIES) | {
        name for name in logging.root.manager.loggerDict if name.split(".")[0] in {n.split(".")[0] for n in LIBRARIES}
    }
    for name in sorted(names):
        logger = logging.getLogger(name)
        for other in logger.handlers:
            if _is_console(other) and other.level < logging.ERROR:
                _undo.append(functools.partial(other.setLevel, other.level))
                other.setLevel(logging.ERROR)
        if name in LIBRARIES:
            if handler not in logger.handlers:
                logger.addHandler(handler)
                _undo.append(functools.partial(logger.removeHandler, handler))
            if logger.propagate:  # the root logger's handlers (pytest's, a user's) get nothing twice
                logger.propagate = False
                _undo.append(functools.partial(setattr, logger, "propagate", True))
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                _undo.append(functools.partial(logger.setLevel, logger.level))
                logger.setLevel(logging.INFO)


def start_ray(address: str | None, path: Path) -> None:
    """``init_ray`` with the workers' output kept out of the console, and a line that says where the logs are."""
    import ray

    from mammo_ray.ray_session import init_ray, ray_log_dir

    quiet_libraries(path)
    # Tune's default output engine prints a configuration table per run even at verbose=0; the legacy one
    # prints nothing at verbose=0, and mammo-ray prints its own line per trial event (search.progress).
    if "RAY_AIR_NEW_OUTPUT" not in os.environ:
        _set_env("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    init_ray(address, log_to_driver=False)
    quiet_libraries(path)  # Ray set up its loggers in init
    print(f"logs: Ray, MLflow and Optuna in {path}; Ray's workers in {ray_log_dir()}", file=sys.stderr, flush=True)
