"""The layering as a rule: no import cycle inside `mammo_ray`, and no Ray below the wiring layer.

`data/`, `models/`, `localize/`, `explain/`, `ensemble/` and `baseline/` are plain torch/numpy:
they never import ray, directly or through another `mammo_ray` module. Ray belongs to the layer
that wires Train, Tune and Serve (`train/ray_train.py`, `search/`, `serving/`, the CLI).

Every import statement counts, also one inside a function: a cycle that only a function-level
import hides is still a cycle in the design. Imports under `if TYPE_CHECKING:` do not count.
On failure the test prints the package dependency graph, so the edge that points up is visible.
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "mammo_ray"
RAY_FREE = ("data", "models", "localize", "explain", "ensemble", "baseline", "decisions")


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, outside top-level packages each module imports)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {name: set() for name in files}
    external: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                if target.split(".")[0] != root.name:
                    external[name].add(target.split(".")[0])
                    continue
                while target not in files and "." in target:  # `import a.b.name` of a module's attribute
                    target = target.rpartition(".")[0]
                if target != name:
                    edges[name].add(target)
    return edges, external


def package_graph(edges: dict[str, set[str]]) -> str:
    """`pkg -> deps` per subpackage (second-level name), for the failure message."""

    def pkg(module: str) -> str:
        return ".".join(module.split(".")[:2])

    deps: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        deps[pkg(source)] |= {pkg(t) for t in targets if pkg(t) != pkg(source)}
    return "\n".join(f"  {p} -> {', '.join(sorted(d)) or '(nothing)'}" for p, d in sorted(deps.items()))


def layering_violations(root: Path, ray_free: tuple[str, ...] = RAY_FREE) -> list[str]:
    """Every import cycle (one per failure, found by graphlib) and every Ray import below the wiring layer."""
    edges, external = import_graph(root)
    problems = []
    remaining = {k: set(v) for k, v in edges.items()}
    while True:
        try:
            graphlib.TopologicalSorter(remaining).prepare()
            break
        except graphlib.CycleError as exc:
            cycle = exc.args[1]  # each node is imported by the next one
            problems.append("import cycle (a -> b: a imports b): " + " -> ".join(reversed(cycle)))
            remaining[cycle[1]].discard(cycle[0])  # break it and look for more
    # Modules that reach ray, directly or through other modules of the package.
    reaches_ray = {m for m, ext in external.items() if "ray" in ext}
    changed = True
    while changed:
        changed = False
        for module, targets in edges.items():
            if module not in reaches_ray and targets & reaches_ray:
                reaches_ray.add(module)
                changed = True
    for module in sorted(reaches_ray):
        if module.split(".")[1:2] and module.split(".")[1] in ray_free:
            why = (
                "imports ray"
                if "ray" in external[module]
                else "imports " + ", ".join(sorted(edges[module] & reaches_ray))
            )
            problems.append(f"{module} is in a Ray-free layer but {why}")
    return problems


def test_mammo_ray_has_no_cycles_and_no_ray_below_the_wiring_layer():
    problems = layering_violations(PACKAGE_ROOT)
    edges, _ = import_graph(PACKAGE_ROOT)
    assert not problems, "\n".join(problems) + "\n\npackage dependency graph:\n" + package_graph(edges)


def test_the_rule_sees_the_package():
    edges, external = import_graph(PACKAGE_ROOT)
    assert "mammo_ray.data.dicom" in edges and "mammo_ray.train.ray_train" in edges
    assert "ray" in external["mammo_ray.train.ray_train"]  # Ray Train wiring imports ray: the rule would see it
    assert "mammo_ray.data.masks" in edges["mammo_ray.data.cache"] or any(
        "mammo_ray.data" in t for t in edges["mammo_ray.data.cache"]
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "mammo_ray" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "mammo_ray"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a cycle through a function-level import
            {
                "__init__.py": "",
                "data/__init__.py": "",
                "data/a.py": "from . import b\n",
                "data/b.py": "def f():\n    from mammo_ray.data import a\n",
            },
            ["import cycle (a -> b: a imports b): "],
        ),
        (  # ray in data/
            {"__init__.py": "", "data/__init__.py": "", "data/a.py": "import ray.train\n"},
            ["mammo_ray.data.a is in a Ray-free layer but imports ray"],
        ),
        (  # ray reached through another module
            {
                "__init__.py": "",
                "models/__init__.py": "",
                "models/m.py": "from mammo_ray.serving.app import x\n",
                "serving/__init__.py": "",
                "serving/app.py": "from ray import serve\nx = 1\n",
            },
            ["mammo_ray.models.m is in a Ray-free layer but imports mammo_ray.serving.app"],
        ),
        (  # allowed: ray in serving, a TYPE_CHECKING-only import back
            {
                "__init__.py": "",
                "serving/__init__.py": "",
                "serving/app.py": "import ray\nfrom mammo_ray.data import a\n",
                "data/__init__.py": "",
                "data/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from mammo_ray.serving import app\n",
            },
            [],
        ),
    ],
)
def test_the_rule_fails_on_a_cycle_or_ray_import(tmp_path, files, expected):
    problems = layering_violations(_write(tmp_path, files))
    assert len(problems) == len(expected)
    for got, want in zip(problems, expected, strict=True):
        assert got.startswith(want), got
    if expected and expected[0].startswith("import cycle"):
        assert set(problems[0].split("): ", 1)[1].split(" -> ")) == {"mammo_ray.data.a", "mammo_ray.data.b"}
