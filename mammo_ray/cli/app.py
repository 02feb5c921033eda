"""The ``mammo-ray`` parser and ``main``: shared options, the command groups, and the exit codes.

Exit codes: 0 success; 2 a usage error (argparse's, or a ``--config`` / ``--set`` value the config
rejects); 1 a failure the command explains in one line naming the input (a missing file, a bad
DICOM, a model that cannot be found). Anything else is a bug and ends with a traceback (1).
"""

from __future__ import annotations

import argparse
import sys

from mammo_ray import __version__
from mammo_ray.cli.data import add_data_commands
from mammo_ray.cli.demo import add_demo_command
from mammo_ray.cli.localize import add_localize_commands
from mammo_ray.cli.output import Command, JsonOutput
from mammo_ray.cli.search import add_search_commands
from mammo_ray.cli.serve import add_serve_command
from mammo_ray.cli.train import add_train_commands
from mammo_ray.constants import DISCLAIMER
from mammo_ray.workdir import resolve_workdir

EPILOG = DISCLAIMER


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workdir",
        help="work directory for outputs, caches and the MLflow store (default: $MAMMO_RAY_WORKDIR or ./work)",
    )
    common.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return common


def _configurable() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", help="YAML config (see tune_configs/); default: built-in defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set data.crop=fixed",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammo-ray",
        description="Train, search, ensemble, track and serve mammogram lesion CNNs on Ray. " + DISCLAIMER,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"mammo-ray {__version__}. {DISCLAIMER}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, configurable = _common(), _configurable()

    def add(name: str, func: Command, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=f"{help_text} {DISCLAIMER}", epilog=EPILOG, parents=[common, *parents]
        )
        p.set_defaults(func=func)
        return p

    add_data_commands(add, configurable)  # synth, index, split, prepare
    add_train_commands(add, configurable)  # train, evaluate
    add_demo_command(add, configurable)  # demo
    add_search_commands(add, configurable)  # tune, ensemble
    add_localize_commands(add)  # localize, froc, explain, dream
    add_serve_command(add)  # serve
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that name the bad input: reported in one line with exit code 1 (2 for a ``ConfigError``), not
    as a traceback."""
    from mammo_ray.config import ConfigError
    from mammo_ray.data.cache import CacheError
    from mammo_ray.data.dicom import DicomReadError
    from mammo_ray.data.manifest import ManifestError
    from mammo_ray.data.splits import SplitLeakError
    from mammo_ray.models import PretrainedWeightsError
    from mammo_ray.train.checkpoint import CheckpointError

    return (
        ConfigError,
        CacheError,
        DicomReadError,
        ManifestError,
        SplitLeakError,
        PretrainedWeightsError,
        CheckpointError,
        FileNotFoundError,
        ValueError,
    )


USAGE_ERROR, FAILURE = 2, 1


def _exit_code(exc: BaseException) -> int:
    from mammo_ray.config import ConfigError

    return USAGE_ERROR if isinstance(exc, ConfigError) else FAILURE


def main(argv: list[str] | None = None) -> int:
    from mammo_ray.cli.console import restore_libraries

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        restore_libraries()  # a command run in-process leaves the caller's logging as it found it


def _run(args: argparse.Namespace) -> int:
    if not args.json:
        try:
            _, text = args.func(args, resolve_workdir(args.workdir))
        except _known_errors() as exc:
            print(f"mammo-ray {args.command}: error: {exc}", file=sys.stderr)
            return _exit_code(exc)
        print(text)
        print(DISCLAIMER)
        return 0
    with JsonOutput() as output:
        try:
            result, _ = args.func(args, resolve_workdir(args.workdir))
        except _known_errors() as exc:
            print(f"mammo-ray {args.command}: error: {exc}", file=sys.stderr)
            output.emit({"error": str(exc), "command": args.command})
            return _exit_code(exc)
        output.emit({**result, "disclaimer": DISCLAIMER})
    return 0
