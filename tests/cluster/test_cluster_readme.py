"""cluster/README.md: walkthroughs whose commands the CLIs take, in an order that works on the first try.

Offline. Every `ray ...` command of the walkthroughs is parsed by Ray's own click CLI (options and
arguments, nothing run), every `mammo-ray ...` command (also as a `ray job submit` entrypoint) by
mammo-ray's argparse parser. The order checks say what must come before what: the cluster before
its use, the data before the search, the search before the pilot, the pilot before the 100 members.
The pilot's `sed` is run on the ensemble RayJob and its entrypoint parsed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from ray.scripts.scripts import cli as ray_cli

REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"
PARENT_RUN_ID = "1835eaa3133540169cb7db54464f1ee9"  # what `mammo-ray tune` prints, for <parent-run-id>


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _bash_blocks(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def _commands(block: str) -> list[list[str]]:
    """Each simple command of a bash block as argv: continuations joined, comments, leading variable
    assignments, redirections and `&` dropped, pipelines and lists split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        segment: list[str] = []
        tokens = iter([*shlex.split(line, comments=True), ";"])
        for token in tokens:
            if token in ("|", "&&", "||", ";", "&"):
                while segment and re.fullmatch(r"[A-Z_]+=.*", segment[0]):
                    segment.pop(0)
                if segment:
                    out.append(segment)
                segment = []
            elif re.fullmatch(r"\d?>>?", token):
                next(tokens)  # the redirection's target
            elif not re.fullmatch(r"\d?>>?\S+", token):
                segment.append(token)
    return out


def _parse_ray(argv: list[str]) -> tuple[str, dict]:
    """The path of the ray command ("job submit") and its parsed parameters; click raises on anything
    the CLI would refuse."""
    assert argv[0] == "ray"
    group, rest, path, parent = ray_cli, argv[1:], [], None
    while True:
        name = rest.pop(0)
        command = group.get_command(click.Context(group), name)
        assert command is not None, f"ray has no command {' '.join([*path, name])!r}"
        path.append(name)
        if isinstance(command, click.Group):
            group = command
            continue
        context = command.make_context(" ".join(["ray", *path]), list(rest), parent=parent)
        return " ".join(path), context.params


def _parse_mammo_ray(argv: list[str]):
    from mammo_ray.cli import build_parser

    assert argv[0] == "mammo-ray"
    return build_parser().parse_args([a.replace("<parent-run-id>", PARENT_RUN_ID) for a in argv[1:]])


def _walkthrough(title: str) -> list[list[str]]:
    (block,) = _bash_blocks(_section(title))[:1]
    return _commands(block)


def _index(commands: list[list[str]], predicate) -> int:
    hits = [i for i, c in enumerate(commands) if predicate(" ".join(c))]
    assert hits, "no such command"
    return hits[0]


@pytest.mark.parametrize(
    "title", ["Walkthrough: AWS and GCP (`ray up`)", "Walkthrough: Kubernetes (KubeRay)", "One image", "AMI (AWS)"]
)
def test_every_ray_and_mammo_ray_command_parses(title):
    parsed = 0
    for block in _bash_blocks(_section(title)):
        for argv in _commands(block):
            if argv[0] == "ray":
                path, params = _parse_ray(argv)
                parsed += 1
                if path == "job submit" and params["entrypoint"][0] == "mammo-ray":
                    _parse_mammo_ray(list(params["entrypoint"]))
                elif path == "job submit":
                    assert params["entrypoint"][:1] == ("bash",) and (REPO / params["entrypoint"][1]).is_file()
            elif argv[0] == "mammo-ray":
                _parse_mammo_ray(argv)
                parsed += 1
    assert parsed or title in ("One image", "AMI (AWS)")


def test_the_launcher_walkthrough_runs_in_order_with_the_tracking_uri():
    commands = _walkthrough("Walkthrough: AWS and GCP (`ray up`)")
    text = [" ".join(c) for c in commands]
    order = [
        _index(commands, lambda c: c.startswith("docker push")),
        _index(commands, lambda c: c.startswith("ray get-auth-token --generate")),
        _index(commands, lambda c: c.startswith("export MLFLOW_TRACKING_URI=http://<mlflow-host>")),
        _index(commands, lambda c: c.startswith("ray up cluster/")),
        _index(commands, lambda c: c.startswith("ray dashboard cluster/")),
        _index(commands, lambda c: c.startswith("ray job submit") and "load_cbis.sh" in c),
        _index(commands, lambda c: "mammo-ray tune --config tune_configs/cbis_search.yaml" in c),
        _index(commands, lambda c: "ensemble.members=8" in c),
        _index(commands, lambda c: "cbis_ensemble.yaml --from-search" in c and "members=8" not in c),
        _index(commands, lambda c: c.startswith("ray down cluster/")),
    ]
    assert order == sorted(order), [text[i] for i in order]
    for argv in commands:
        if argv[:3] == ["ray", "job", "submit"] and "mammo-ray" in argv:
            _, params = _parse_ray(argv)
            env = json.loads(params["runtime_env_json"])["env_vars"]
            assert env == {"MLFLOW_TRACKING_URI": "$MLFLOW_TRACKING_URI"}, argv  # the server, to every run


def test_the_kubernetes_walkthrough_runs_in_order_and_checks_status():
    commands = _walkthrough("Walkthrough: Kubernetes (KubeRay)")
    order = [
        _index(commands, lambda c: c.startswith("docker push")),
        _index(commands, lambda c: "create secret generic mammo-ray-auth-token" in c),
        _index(commands, lambda c: "create secret generic mammo-ray-mlflow" in c),
        _index(commands, lambda c: c.startswith("kubectl apply -f cluster/kuberay/shared-pvc.yaml")),
        _index(commands, lambda c: c.startswith("kubectl apply -f cluster/kuberay/job-load-cbis.yaml")),
        _index(commands, lambda c: c.startswith("kubectl wait") and "job/mammo-ray-load-cbis" in c),
        _index(commands, lambda c: c.startswith("kubectl apply -f cluster/kuberay/rayjob-tune.yaml")),
        _index(commands, lambda c: c.startswith("kubectl get rayjob mammo-ray-tune -o jsonpath=")),
        _index(commands, lambda c: c.startswith("sed") and "ensemble.members=8" in c),
        _index(commands, lambda c: c.startswith("kubectl delete rayjob mammo-ray-ensemble")),
        _index(commands, lambda c: c.startswith("sed") and "members=8" not in c),
    ]
    assert order == sorted(order), order
    # The status fields the walkthrough reads are the RayJob's (the vendored CRD schema).
    import gzip

    with gzip.open(REPO / "tests" / "fixtures" / "kuberay-crds" / "kuberay-v1-schemas.json.gz", "rt") as f:
        status = json.load(f)["schemas"]["RayJob"]["properties"]["status"]["properties"]
    used = set(re.findall(r"\.status\.(\w+)", _section("Walkthrough: Kubernetes (KubeRay)")))
    assert {"jobDeploymentStatus", "jobStatus", "reason", "message"} <= used and used <= set(status), used


def _sed_scripts() -> list[str]:
    scripts = []
    for argv in _walkthrough("Walkthrough: Kubernetes (KubeRay)"):
        if argv[0] == "sed":
            assert argv[2] == "cluster/kuberay/rayjob-ensemble.yaml", argv
            scripts.append(argv[1])
    return scripts


@pytest.mark.parametrize("pilot", [True, False], ids=["pilot", "full"])
def test_the_ensemble_rayjobs_the_walkthrough_applies(pilot):
    from mammo_ray.config import load_config

    (script,) = [s for s in _sed_scripts() if ("ensemble.members=8" in s) == pilot]
    script = script.replace("<parent-run-id>", PARENT_RUN_ID)
    manifest = REPO / "cluster" / "kuberay" / "rayjob-ensemble.yaml"
    out = subprocess.run(["sed", script, str(manifest)], check=True, capture_output=True, text=True).stdout
    doc = yaml.safe_load(out)
    assert doc["metadata"]["name"] == "mammo-ray-ensemble"  # the name the network policies admit
    original = yaml.safe_load(manifest.read_text())
    assert {k: v for k, v in doc["spec"].items() if k != "entrypoint"} == {
        k: v for k, v in original["spec"].items() if k != "entrypoint"
    }
    args = _parse_mammo_ray(shlex.split(doc["spec"]["entrypoint"]))
    assert args.command == "ensemble" and args.from_search == PARENT_RUN_ID
    ensemble = load_config(REPO / args.config, args.overrides).ensemble
    if pilot:
        assert (ensemble.members, ensemble.registered_model, ensemble.alias) == (8, "mammo-ray-ensemble-pilot", None)
    else:
        assert (ensemble.members, ensemble.registered_model, ensemble.alias) == (100, "mammo-ray-ensemble", "champion")


def test_placeholders_look_like_placeholders():
    text = README.read_text()
    for stale in (r"\bPARENT_RUN_ID\b", r"\bCLIENT_NAMESPACE\b", r"YOUR-BUCKET", r"@HOST\b", r"\bREGISTRY/"):
        assert not re.search(stale, text), stale
    for placeholder in ("<mlflow-host>", "<parent-run-id>", "<registry>", "<ami-id>", "<client-namespace>"):
        assert placeholder in text, placeholder
    # In files, placeholders read REPLACE_WITH_...; every one the README tells the user to replace.
    files = [*REPO.joinpath("cluster").glob("*.yaml"), *REPO.joinpath("cluster", "kuberay").glob("*.yaml")]
    names = {m for path in files for m in re.findall(r"REPLACE_WITH_[A-Z_]+", path.read_text())}
    assert names and all(name in text for name in names), names - {n for n in names if n in text}


def test_prerequisites_name_the_driver_and_the_gpu_quotas():
    section = _section("Prerequisites")
    for needed in (
        "driver 580 or newer",
        "CUDA 13",
        "Running On-Demand G and VT instances",
        "Running On-Demand P instances",
        "GPUS_ALL_REGIONS",
        "NVIDIA_L4_GPUS",
        "NVIDIA_A100_GPUS",
        "NVIDIA Container Toolkit",
    ):
        assert needed in section, needed


def test_a_quoted_speed_states_its_data_workers():
    paragraphs = re.split(r"\n\s*\n", README.read_text())
    speeds = [p for p in paragraphs if re.search(r"images?(?:\s+decoded)?\s+(?:per\s+second|/s)|img/s", p)]
    assert speeds, "the load step quotes its rate"
    for paragraph in speeds:
        assert re.search(r"data\.num_workers=\d+", paragraph), paragraph
