"""The one work directory every command writes under (outputs, caches, the MLflow store)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MAMMO_RAY_WORKDIR"
DEFAULT = "work"


def default_workdir() -> Path:
    """Where a command without ``--workdir`` writes: ``$MAMMO_RAY_WORKDIR``, else ``./work`` (absolute, not created)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT).expanduser().resolve()


def resolve_workdir(arg: str | None = None) -> Path:
    """``--workdir`` if given, else ``default_workdir()``; absolute, created."""
    path = Path(arg).expanduser().resolve() if arg else default_workdir()
    path.mkdir(parents=True, exist_ok=True)
    return path
