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


def decisions_lines(result: dict[str, Any]) -> list[str]:
    """Calibration, operating points and referral of a result with ``decisions.report`` fields, as text."""
    if not result.get("operating_points"):
        skipped = (result.get("policy") or {}).get("skipped") or (result.get("decisions") or {}).get("skipped")
        return [f"  decisions        none: {skipped}"] if skipped else []
    policy, image = result["policy"], result["calibration"]["image"]
    calibration = policy["calibration"]
    how = calibration["method"] + (
        f", T={calibration['temperature']:.2f}" if calibration["method"] == "temperature" else ""
    )
    lines = [
        f"  calibration      ECE {image['ece']:.3f} -> {image['ece_calibrated']:.3f}, Brier {image['brier']:.3f} -> "
        f"{image['brier_calibrated']:.3f} ({how}, fitted on val; {image['ece_bins']} equal-mass bins, per image)",
    ]
    for point in result["operating_points"]:
        measured = "sensitivity" if point["kind"] == "specificity" else "specificity"
        low, high = point[f"{measured}_ci"]
        lines.append(
            f"  {measured:<16} {point[measured]:.3f} [{low:.3f}, {high:.3f}] at {point['kind']} {point['target']:.2f} "
            f"(threshold {point['threshold']:.3f} from val; {point['kind']} here {point[point['kind']]:.3f})"
        )
    referral = result["referral"]
    rate = referral["target_rate"]
    kept = []
    for curve in referral["curves"].values():
        at = [a for r, a in zip(curve["rates"], curve["auc"], strict=True) if abs(r - rate) < 1e-9]
        if at:
            kept.append(f"{at[0]:.3f} {curve['label']}")
    lines.append(f"  referral {rate:.0%}     AUC of the kept cases: " + "; ".join(kept))
    return lines
