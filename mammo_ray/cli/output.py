"""What every command module shares: the command signature, ``--json`` output, text helpers.

A command is ``cmd_x(args, workdir) -> (result, text)``: ``result`` is the JSON object printed with
``--json`` (typed results become dicts here, at the edge, with their ``to_dict``), ``text`` the
summary printed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

CommandResult = tuple[dict[str, Any], str]
Command = Callable[[argparse.Namespace, Path], CommandResult]


class AddCommand(Protocol):
    """``app.build_parser``'s ``add``: a subcommand with the shared options and ``func`` to run."""

    def __call__(
        self, name: str, func: Command, help_text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser: ...


def mlflow_ui_command(uri: str) -> str:
    """How to open the MLflow UI on ``uri``: the command for a local SQLite store, the URL otherwise."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"


def _reserve_stdout() -> int:
    """Point fd 1 at stderr while a command runs and return a handle on the real stdout.

    With ``--json`` stdout must carry exactly one JSON object, but Ray (raylet warnings, worker
    logs) and native libraries write to fd 1 directly; they land on stderr instead.
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    return real


class JsonOutput:
    """While a ``--json`` command runs, everything printed goes to stderr, at the Python and fd level."""

    def __enter__(self) -> JsonOutput:
        self.stdout = sys.stdout
        self.fd = _reserve_stdout()
        sys.stdout = sys.stderr
        return self

    def emit(self, obj: dict[str, Any]) -> None:
        """Print ``obj`` as the one line of JSON on the real stdout."""
        sys.stderr.flush()
        os.dup2(self.fd, 1)
        sys.stdout = self.stdout
        print(json.dumps(obj, default=str), flush=True)

    def __exit__(self, *exc: object) -> None:
        if sys.stdout is not self.stdout:  # not emitted (an unexpected exception): restore anyway
            os.dup2(self.fd, 1)
            sys.stdout = self.stdout
        os.close(self.fd)
