"""`mammo-ray --help` answers at once: the CLI package imports nothing heavy until a command runs."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("numpy", "pandas", "torch", "ray", "mlflow", "pydicom", "PIL")


def test_building_the_parser_imports_no_heavy_package():
    code = (
        "import sys\n"
        "from mammo_ray.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_command_is_in_the_help_in_its_order():
    out = subprocess.run([sys.executable, "-m", "mammo_ray.cli", "--help"], capture_output=True, text=True, check=True)
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == [
        "synth",
        "index",
        "split",
        "prepare",
        "train",
        "evaluate",
        "demo",
        "tune",
        "ensemble",
        "localize",
        "froc",
        "explain",
        "dream",
        "serve",
        "api-key",
    ]
