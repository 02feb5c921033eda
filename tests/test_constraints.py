"""constraints.txt: one set of pins for `make`, the container image and the cluster launcher.

It must name every dependency pyproject.toml declares, within pyproject's ranges, and it must be the
environment the suite passes in: `make` installs with it, so on a fresh clone the two are equal, and
a dependency changed without re-locking fails here (cluster/test_cluster_configs.py checks that every
install command uses the file).
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _lock():
    spec = importlib.util.spec_from_file_location("lock_constraints", REPO / "scripts" / "lock_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    return [r for r in map(Requirement, declared) if canonicalize_name(r.name) != "mammo-ray"]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _lock().read_pins()
    assert len(pins) > 100  # the whole closure, not only the direct dependencies
    assert all(v and v[0].isdigit() for v in pins.values()), pins
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned: run scripts/lock_constraints.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])


def test_the_environment_the_suite_runs_in_is_the_pinned_one(capsys):
    differences = _lock().main(["--check"])
    assert differences == 0, (
        f"{sys.prefix} differs from constraints.txt (after changing a dependency, run "
        f"`.venv/bin/python scripts/lock_constraints.py`):\n{capsys.readouterr().out}"
    )


def test_the_check_reports_a_difference(tmp_path, monkeypatch, capsys):
    lock = _lock()
    pins = lock.read_pins()
    stale = tmp_path / "constraints.txt"
    stale.write_text(lock.render({**pins, "numpy": "0.0.1", "not-a-package": "1.0"}))
    monkeypatch.setattr(lock, "CONSTRAINTS", stale)
    monkeypatch.setattr(lock.read_pins, "__defaults__", (stale,))
    assert lock.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "numpy: constraints.txt 0.0.1, this environment" in out and "not-a-package: constraints.txt 1.0" in out
