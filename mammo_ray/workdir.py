"""The one work directory every command writes under (outputs, caches, the MLflow store)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MAMMO_RAY_WORKDIR"
DEFAULT = "work"


def resolve_workdir(arg: str | None = None) -> Path:
    """``--workdir`` if given, else ``$MAMMO_RAY_WORKDIR``, else ``./work``; absolute, created."""
    path = Path(arg or os.environ.get(ENV_VAR) or DEFAULT).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
