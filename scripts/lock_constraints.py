"""Write ``constraints.txt``: every package of a tested environment, pinned to the version it had.

One constraints file serves every install of mammo-ray: ``make`` (the venv the tests pass in), the
container image (``cluster/Dockerfile``) and the cluster launcher's setup commands
(``cluster/{aws,gcp,local}.yaml``). Every node of a cluster, and every machine a test ran on, then
resolves the same versions, Ray's patch release included (Ray refuses to join nodes that differ).

Run it with the venv that `make test` just passed in, after changing a dependency in pyproject.toml:

    .venv/bin/python scripts/lock_constraints.py            # rewrite constraints.txt
    .venv/bin/python scripts/lock_constraints.py --check    # exit 1 when the file and the venv differ

``tests/test_constraints.py`` checks that the file covers every dependency pyproject.toml names,
that each pin satisfies pyproject's range, that the venv has exactly the pinned versions, and that
the Makefile, the Dockerfile and the launcher profiles all install with it.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# Every package of the environment mammo-ray's tests pass in, at the version it had there.
# Written by scripts/lock_constraints.py; do not edit by hand (tests/test_constraints.py checks it).
# Used by `make` (pip install -c constraints.txt), cluster/Dockerfile and the launcher profiles
# cluster/{aws,gcp,local}.yaml, so every machine and every node of a cluster runs the same versions.
# Constraints only bound what gets installed: a package listed here is installed only when
# something requires it.
"""
# Never pinned: the project itself, and the installer's own tools, which each environment brings.
SKIP = {"mammo-ray", "pip", "setuptools", "wheel"}


def installed() -> dict[str, str]:
    """The packages installed in the running interpreter's environment, by canonical name: its
    site-packages only, not whatever else is on sys.path (Ray puts its vendored packages there)."""
    found = {}
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    for dist in distributions(path=paths):
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) not in SKIP:
            found[canonicalize_name(name)] = dist.version
    return found


def render(packages: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(packages.items()))


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on a difference")
    args = parser.parse_args(argv)
    text = render(installed())
    if not args.check:
        CONSTRAINTS.write_text(text)
        print(f"wrote {CONSTRAINTS} ({text.count('==')} packages)")
        return 0
    pins, have = read_pins(), installed()
    differ = sorted(n for n in pins.keys() | have.keys() if pins.get(n) != have.get(n))
    for name in differ:
        print(f"{name}: constraints.txt {pins.get(name, '-')}, this environment {have.get(name, '-')}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
