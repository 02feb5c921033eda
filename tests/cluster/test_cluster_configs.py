"""cluster/: the launcher YAMLs pass Ray's own config validation, the KubeRay manifests the CRD schemas.

Offline, no cloud and no Kubernetes:

* ``cluster/{aws,gcp,local}.yaml`` go through what ``ray up`` does before it talks to a cloud:
  ``ray.autoscaler._private.util.prepare_config`` (merges the provider's defaults.yaml, the
  setup commands, per-type worker limits) and ``validate_config`` (jsonschema against
  ``ray/autoscaler/ray-schema.json`` plus Ray's cross-checks: head_node_type among the node
  types, the sum of min_workers within max_workers). The local profile goes through all of
  ``ray up``'s config bootstrap (``commands._bootstrap_config``), since the local provider needs
  no cloud. The AWS and GCP providers' own bootstrap (IAM, key pairs, subnets, instance-type
  lookups) needs their APIs and is not run.
* ``cluster/kuberay/*.yaml`` are validated with jsonschema against the ``openAPIV3Schema`` of
  the KubeRay CRDs in ``../shared/data/kuberay-crds/``, made strict the way ``kubectl apply
  --validate=strict`` is: unknown fields are errors. CEL rules (``x-kubernetes-validations``) are
  not evaluated. The schemas come from ``tests/fixtures/kuberay-crds/``, a trimmed copy (29 KB,
  fast to load, there in every checkout) that records the SHA-256 of the CRD files it was made
  from; where ``../shared`` lies beside the repository a test checks those files still match.

The rest checks what the schemas cannot: one image (by an immutable reference) and one Ray
version everywhere, the cloud profiles running that image with nothing installed at boot and an
AMI pinned by ID, entrypoints that the CLI parses with configs that exist, GPU requests that fit
the configs' trials, token auth, shared storage, and no literal secrets in any file under cluster/.
Scheduling and job ends: test_cluster_scheduling.py; the cluster-run tracking rule:
test_cluster_tracking.py; the README's walkthroughs: test_cluster_readme.py.

``python tests/cluster/test_cluster_configs.py --vendor`` rewrites the vendored CRD schemas from
``../shared/data/kuberay-crds/``.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHERS = ["aws", "gcp", "local"]
CLOUDS = ["aws", "gcp"]
RAY_MANIFESTS = ["raycluster", "rayjob-tune", "rayjob-ensemble", "rayservice"]
SHARED_CRDS = REPO.parent / "shared" / "data" / "kuberay-crds"
VENDORED_CRDS = REPO / "tests" / "fixtures" / "kuberay-crds" / "kuberay-v1-schemas.json.gz"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
REGISTRY = "REPLACE_WITH_REGISTRY"  # the placeholder every image reference starts with (cluster/README.md)
IMAGE = f"{REGISTRY}/mammo-ray:{VERSION}"
AUTH_SECRET = "mammo-ray-auth-token"
SHARED_CLAIM = "mammo-ray-shared"
WORKDIR = "/shared/mammo-ray"
IMAGE_REPO_DIR = "/home/ray/mammo-ray"  # where cluster/Dockerfile puts the repository

# (vCPUs, GPUs) of the instance types the launcher profiles use, as the clouds publish them.
SHAPES = {
    "m5.2xlarge": (8, 0),
    "g5.xlarge": (4, 1),
    "p4d.24xlarge": (96, 8),
    "n2-standard-8": (8, 0),
    "g2-standard-8": (8, 1),
    "a2-highgpu-1g": (12, 1),
}
GPU_TYPES = {"aws": {"g5.xlarge", "p4d.24xlarge"}, "gcp": {"g2-standard-8", "a2-highgpu-1g"}}
OPT_IN_TYPES = {"p4d.24xlarge"}  # 8-GPU node types: max_workers 0 until opted in (cluster/README.md)
GPU_CONFIGS = ["search", "ensemble", "cbis_search", "cbis_ensemble"]  # the GPU-sized configs the clusters are for

_load = yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader  # the CRDs are 3 MB


def _yaml(path: Path):
    return yaml.load(path.read_text(), Loader=_load)


def _launcher(name: str) -> dict:
    return _yaml(CLUSTER / f"{name}.yaml")


def _manifest(name: str) -> dict:
    return _yaml(KUBERAY / f"{name}.yaml")


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    return {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayService": lambda d: d["spec"]["rayClusterConfig"],
    }[doc["kind"]](doc)


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head ("head") and each worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's convention: Ray runs in the first


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------- CRD schemas

_SUBSCHEMA_MAPS = ("properties", "patternProperties")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def _map_schema(node, fn):
    """Apply ``fn`` to every schema node, innermost first (names inside ``properties`` are not nodes)."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _map_schema(sub, fn) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = _map_schema(out[key], fn)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_map_schema(sub, fn) for sub in out[key]]
    return fn(out)


def _without_descriptions(schema: dict) -> dict:
    return _map_schema(schema, lambda n: {k: v for k, v in n.items() if k != "description"})


def _strict(schema: dict) -> dict:
    """Unknown fields become errors, as with ``kubectl apply --validate=strict`` (the API server
    would otherwise drop them silently, so a misspelt field would just not take effect)."""

    def close(node):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            return {**node, "additionalProperties": False}
        return node

    return _map_schema(schema, close)


def _schemas_from_crds(folder: Path) -> dict[str, dict]:
    """kind -> the served ray.io/v1 openAPIV3Schema, descriptions dropped (they are 10% of the size)."""
    schemas = {}
    for kind, file in CRD_FILES.items():
        crd = _yaml(folder / file)
        assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1["served"] and v1["storage"]
        schemas[kind] = _without_descriptions(v1["schema"]["openAPIV3Schema"])
    return schemas


def _shared_crds_present() -> bool:
    return all((SHARED_CRDS / file).is_file() for file in CRD_FILES.values())


def _sha256s(folder: Path) -> dict[str, str]:
    return {file: hashlib.sha256((folder / file).read_bytes()).hexdigest() for file in CRD_FILES.values()}


def _vendored() -> dict:
    with gzip.open(VENDORED_CRDS, "rt") as f:
        return json.load(f)


def vendor_crds() -> None:
    """Rewrite the vendored schemas from ../shared (deterministic bytes: sorted keys, gzip mtime 0)."""
    payload = {
        "source": "KubeRay CRDs from ../shared/data/kuberay-crds (see README.md beside this file): "
        "spec.versions[v1].schema.openAPIV3Schema, descriptions removed",
        "sha256": _sha256s(SHARED_CRDS),
        "schemas": _schemas_from_crds(SHARED_CRDS),
    }
    VENDORED_CRDS.parent.mkdir(parents=True, exist_ok=True)
    VENDORED_CRDS.write_bytes(_vendored_bytes(payload))


def _vendored_bytes(payload: dict) -> bytes:
    """The file's exact bytes for ``payload``: sorted keys, no spaces, gzip with mtime 0 and no name."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as f:
        f.write(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    return out.getvalue()


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    return {kind: jsonschema.Draft7Validator(_strict(schema)) for kind, schema in _vendored()["schemas"].items()}


def _schema_errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


# ---------------------------------------------------------------- launcher profiles


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_profile_passes_rays_config_validation(name):
    raw = _launcher(name)
    validate_config(copy.deepcopy(raw))  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # as `ray up` sees it, provider defaults merged in
    validate_config(prepared)
    assert prepared["cluster_name"] == raw["cluster_name"]
    assert prepared["setup_commands"] == raw["setup_commands"]  # ours, not the provider's defaults
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]


def test_rays_validator_rejects_a_misspelt_key_a_fractional_gpu_and_a_missing_head_type():
    raw = _launcher("aws")
    typo = {**copy.deepcopy(raw), "head_start_ray_command": raw["head_start_ray_commands"]}
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["gpu_a10g"]["resources"]["GPU"] = 0.5
    headless = copy.deepcopy(raw)
    headless["head_node_type"] = "cpu"
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        validate_config(prepare_config(typo))
    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        validate_config(prepare_config(fractional))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(headless))


def test_local_profile_bootstraps_as_ray_up_does():
    config = _bootstrap_config(copy.deepcopy(_launcher("local")), no_config_cache=True)
    assert config["provider"]["head_ip"] == "127.0.0.1" and config["provider"]["worker_ips"] == []
    assert config["head_node_type"] == "local.cluster.node"
    assert config["available_node_types"]["local.cluster.node"]["max_workers"] == 0
    assert config["max_workers"] == 0


@pytest.mark.parametrize("name", CLOUDS)
def test_cloud_node_types_match_their_instances(name):
    config = _launcher(name)
    types = config["available_node_types"]
    type_key = "InstanceType" if name == "aws" else "machineType"
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": SHAPES[head["node_config"][type_key]][0], "GPU": 0}
    assert head.get("max_workers", 0) == 0
    workers = {key: t for key, t in types.items() if key != config["head_node_type"]}
    assert {t["node_config"][type_key] for t in workers.values()} == GPU_TYPES[name]
    for key, node_type in workers.items():
        cpus, gpus = SHAPES[node_type["node_config"][type_key]]
        assert node_type["resources"] == {"CPU": cpus, "GPU": gpus}, key
        assert node_type["min_workers"] == 0, key  # autoscaled from zero
        opt_in = node_type["node_config"][type_key] in OPT_IN_TYPES
        assert (node_type["max_workers"] == 0) == opt_in, key
        if name == "gcp":
            (accelerator,) = node_type["node_config"]["guestAccelerators"]
            assert accelerator["acceleratorCount"] == gpus, key
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", key
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_starts_ray_with_token_auth_and_a_loopback_dashboard(name):
    config = _launcher(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        for command in commands:
            if "ray start" in command:
                assert "RAY_AUTH_MODE=token" in command, command
                assert "MAMMO_RAY_WORKDIR=" in command, command
                assert "PYTHONPATH=$HOME/mammo-ray" in command, command  # serve.app:build_app imports
                # A cloud cluster declares itself (SQLite tracking refused: test_cluster_tracking.py); one
                # machine does not.
                assert ("MAMMO_RAY_CLUSTER=1" in command) == (name in CLOUDS), command
    if name == "local":
        assert "--node-ip-address=127.0.0.1" in head
        assert "ray get-auth-token --generate > /dev/null" in head  # one machine: the head may make it, quietly
    else:
        # Real clusters: the workers must reach the head, and every node needs the clients' token.
        assert "--node-ip-address=127.0.0.1" not in head and "--num-gpus=0" in head
        assert "get-auth-token" not in " ".join(config["setup_commands"] + config["head_start_ray_commands"])
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
        assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
        assert f"MAMMO_RAY_WORKDIR={WORKDIR}" in head


def test_the_local_profile_installs_the_mounted_sources():
    config = _launcher("local")
    mounts = {remote: local for remote, local in config["file_mounts"].items() if not local.startswith("~")}
    # Exactly what `pip install -e` needs, each a path of this repository; never the root (Ray
    # hashes every mounted file on each `ray up`, and the root holds .venv/ and work/).
    assert {Path(local).as_posix() for local in mounts.values()} == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "mammo_ray",
        "tune_configs",
        "serve",
    }
    for remote, local in mounts.items():
        assert (REPO / local).exists(), local
        assert remote == f"~/mammo-ray/{Path(local).as_posix()}", remote
    assert "docker" not in config  # one machine, no container
    # last: after the venv and PyTorch
    assert config["setup_commands"][-1] == "pip install -q -c ~/mammo-ray/constraints.txt -e ~/mammo-ray"


@pytest.mark.parametrize("name", CLOUDS)
def test_cloud_profiles_run_the_image_and_install_nothing_at_boot(name):
    config = _launcher(name)
    docker = config["docker"]
    assert docker["image"] == IMAGE and docker["container_name"] == "mammo-ray"
    assert docker["pull_before_run"] is False  # an immutable tag: pulled once, when missing
    assert "-v /shared:/shared" in docker["run_options"]  # the host's mount of the shared file system
    assert docker["worker_run_options"] == ["--gpus all"]  # every worker type is a GPU type
    # The code and every package come with the image; only the token is copied.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    boot = [*config["initialization_commands"], *config["setup_commands"], *config["worker_setup_commands"]]
    assert not [c for c in boot if "pip install" in c or ("apt-get install" in c and "nfs-common" not in c)]
    # The autoscaler's cloud client: Ray's images carry it; installed on the head only if missing.
    (head_setup,) = config["head_setup_commands"]
    assert re.fullmatch(r'python -c "import \w+" 2> /dev/null \|\| pip install -q [\w">=.-]+', head_setup)
    # On the host, before the container: Docker checked, the file system mounted and made the image
    # user's (uid 1000, gid 100), the registry logged in where it is the cloud's own.
    init = config["initialization_commands"]
    assert init[0].startswith("docker info > /dev/null ||")
    assert "mount" in init[1] and " /shared;" in init[1]
    assert init[2] == "sudo mkdir -p /shared/mammo-ray && sudo chown 1000:100 /shared/mammo-ray"
    assert f"registry={REGISTRY};" in init[3] and ("docker login" in init[3] or "configure-docker" in init[3])
    # In the container: the variables `ray exec` / `ray attach` shells need.
    setup = " ".join(config["setup_commands"])
    for variable in ("RAY_AUTH_MODE=token", f"MAMMO_RAY_WORKDIR={WORKDIR}", "MAMMO_RAY_CLUSTER=1"):
        assert variable in setup, variable


def test_the_aws_ami_is_pinned_by_id_on_every_node_type():
    """An SSM alias (resolve:ssm:.../latest) moves with each release; one ID names one image. The ID
    itself is the user's to fill in (cluster/README.md, "AMI"): a placeholder until then."""
    text = (CLUSTER / "aws.yaml").read_text()
    assert "resolve:ssm" not in text.replace("resolve:ssm:.../latest", "")  # only the comment names it
    ids = {t["node_config"]["ImageId"] for t in _launcher("aws")["available_node_types"].values()}
    (ami,) = ids  # the same on every node type
    assert re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?|REPLACE_WITH_AMI_ID", ami)
    readme = (CLUSTER / "README.md").read_text()
    section = readme[readme.index("## AMI (AWS)") :]
    section = section[: section.index("\n## ", 1)]
    for needed in ("REPLACE_WITH_AMI_ID", "aws ssm get-parameter", "aws ec2 describe-images", "580", "To update"):
        assert needed in section, needed


def test_every_install_uses_the_one_constraints_file():
    """The image, the local profile and `make` install every package with constraints.txt (the pins the
    suite passed with: tests/test_constraints.py), so no node resolves versions of its own; the cloud
    profiles install nothing (test_cloud_profiles_run_the_image_and_install_nothing_at_boot)."""
    dockerfile = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert len(dockerfile) == 2 and all("-c constraints.txt" in line for line in dockerfile), dockerfile
    assert "COPY --chown=ray:users constraints.txt" in (CLUSTER / "Dockerfile").read_text()
    installs = [c for c in _launcher("local")["setup_commands"] if "pip install" in c and "-U pip" not in c]
    assert len(installs) == 2 and all("-c ~/mammo-ray/constraints.txt" in c for c in installs), installs
    assert not re.search(r"==|>=|<", " ".join(installs)), installs  # no version of its own
    makefile = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line and "-e" in line]
    assert makefile and all("-c constraints.txt" in line for line in makefile), makefile


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifest_matches_its_crd_schema(name, crd_validators):
    docs = list(yaml.safe_load_all((KUBERAY / f"{name}.yaml").read_text()))
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in CRD_FILES
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", doc["metadata"]["name"])  # room for suffixes
    assert _schema_errors(crd_validators[doc["kind"]], doc) == []


def test_the_strict_schema_check_catches_typos_and_wrong_types(crd_validators):
    doc = _manifest("raycluster")
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    missing = copy.deepcopy(doc)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    bad_mode = copy.deepcopy(doc)
    bad_mode["spec"]["authOptions"]["mode"] = "tokens"
    validator = crd_validators["RayCluster"]
    assert "Additional properties are not allowed ('rayStartParam' was unexpected)" in " ".join(
        _schema_errors(validator, typo)
    )
    assert any("minReplicas" in e and "is not of type 'integer'" in e for e in _schema_errors(validator, wrong_type))
    assert any("'groupName' is a required property" in e for e in _schema_errors(validator, missing))
    assert any("authOptions/mode" in e for e in _schema_errors(validator, bad_mode))


def test_vendored_crd_schemas_were_made_from_the_shared_crds():
    vendored = _vendored()
    # In every checkout: the file is exactly what --vendor writes (not edited by hand), for the three
    # CRDs, each a v1 openAPIV3Schema of an object with a spec, and with the hash of each source file.
    assert VENDORED_CRDS.read_bytes() == _vendored_bytes(vendored)
    assert set(vendored["schemas"]) == set(CRD_FILES) and set(vendored["sha256"]) == set(CRD_FILES.values())
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in vendored["sha256"].values())
    for schema in vendored["schemas"].values():
        assert schema["type"] == "object" and "spec" in schema["properties"]
    # Where ../shared lies beside the repository (a developer's checkout): made from those very files.
    if _shared_crds_present():
        assert vendored["sha256"] == _sha256s(SHARED_CRDS), (
            "the CRDs changed; regenerate with: python tests/cluster/test_cluster_configs.py --vendor"
        )


def _pod_images(pod: dict) -> set[str]:
    return {c["image"] for key in ("initContainers", "containers") for c in pod.get(key, [])}


def test_one_image_by_one_immutable_reference_everywhere():
    """The KubeRay manifests, the load Job, the cloud profiles' docker blocks and the Dockerfile's build
    command name one image, by a tag that is the package version (never `latest`) or by a digest."""
    images, ray_versions = {}, set()
    for name in RAY_MANIFESTS:
        doc = _manifest(name)
        spec = _cluster_spec(doc)
        ray_versions.add(spec["rayVersion"])
        for group_name, group in _groups(spec):
            images[f"{name}/{group_name}"] = _pod_images(group["template"]["spec"])
        if "submitterPodTemplate" in doc["spec"]:
            images[f"{name}/submitter"] = _pod_images(doc["spec"]["submitterPodTemplate"]["spec"])
    images["job-load-cbis"] = _pod_images(_yaml(KUBERAY / "job-load-cbis.yaml")["spec"]["template"]["spec"])
    for name in CLOUDS:
        images[name] = {_launcher(name)["docker"]["image"]}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    images["Dockerfile"] = set(re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile))
    assert all(images.values()), images
    assert set().union(*images.values()) == {IMAGE}, images
    assert re.fullmatch(rf"{REGISTRY}/mammo-ray(?::{re.escape(VERSION)}|@sha256:[0-9a-f]{{64}})", IMAGE)
    assert ray_versions == {ray.__version__}
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", dockerfile, re.M)
    assert f"WORKDIR {IMAGE_REPO_DIR}" in dockerfile and f"ENV PYTHONPATH={IMAGE_REPO_DIR}" in dockerfile
    assert Requirement(
        next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    ).specifier.contains(ray.__version__)


@pytest.mark.parametrize(
    "name,command,config",
    [
        ("rayjob-tune", "tune", "tune_configs/cbis_search.yaml"),
        ("rayjob-ensemble", "ensemble", "tune_configs/cbis_ensemble.yaml"),
    ],
)
def test_rayjob_entrypoints_parse_and_name_shipped_configs(name, command, config):
    from mammo_ray.cli import build_parser

    argv = shlex.split(_manifest(name)["spec"]["entrypoint"])
    assert argv == ["mammo-ray", command, "--config", config]
    args = build_parser().parse_args(argv[1:])
    assert args.command == command and args.config == config
    assert (REPO / config).is_file()  # relative to the image's WORKDIR, a copy of the repository
    from mammo_ray.config import load_config

    data = load_config(REPO / config).data  # CBIS-DDSM from the shared volume, not synthetic
    assert data.source == "cbis-ddsm" and data.root and data.root.startswith("/shared/"), data


def test_embedded_clusters_are_the_raycluster():
    base = _manifest("raycluster")["spec"]
    for name in ("rayjob-tune", "rayjob-ensemble"):
        assert _manifest(name)["spec"]["rayClusterSpec"] == base, name
    serving = _manifest("rayservice")["spec"]["rayClusterConfig"]
    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions"):
        assert serving[key] == base[key], key
    groups = dict(_groups(base))
    assert {name for name, _ in _groups(serving)} <= set(groups)  # Serve uses a subset: head and gpu-1
    for name, got in _groups(serving):
        got, want = copy.deepcopy(got), copy.deepcopy(groups[name])
        for group in (got, want):
            for key in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(key, None)
            _ray_container(group).pop("ports", None)
        _drop_api_keys(got)  # what serving adds: the API keys' Secret (test_the_rayservice_mounts_the_api_keys...)
        assert got == want


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_gpu_workers_request_gpus_and_the_head_none(name):
    spec = _cluster_spec(_manifest(name))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in _ray_container(head)["resources"].get("limits", {})
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        limits = _ray_container(group)["resources"]["limits"]
        assert isinstance(limits["nvidia.com/gpu"], int) and limits["nvidia.com/gpu"] >= 1, group["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
            "tolerations"
        ]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def _bundles() -> dict[str, tuple[float, float]]:
    """(CPUs, GPUs) one Ray Train worker of each GPU-sized config asks for."""
    from mammo_ray.config import load_config

    out = {}
    for stem in GPU_CONFIGS:
        train = load_config(REPO / "tune_configs" / f"{stem}.yaml").train
        assert train.use_gpu, stem
        out[stem] = (train.cpus_per_worker, train.gpus_per_worker)
    return out


def test_every_gpu_trial_fits_a_worker_of_every_cluster():
    """A trial whose bundle fits no worker type would wait forever on an autoscaling cluster."""
    capacities = {}
    for name in CLOUDS:
        config = _launcher(name)
        capacities[name] = [
            (t["resources"]["CPU"], t["resources"]["GPU"])
            for key, t in config["available_node_types"].items()
            if key != config["head_node_type"] and t["max_workers"] > 0  # not the opt-in types
        ]
    for name in ("raycluster", "rayjob-tune", "rayjob-ensemble"):
        spec = _cluster_spec(_manifest(name))
        capacities[name] = [
            (
                _cpus(_ray_container(g)["resources"]["limits"]["cpu"]),
                _ray_container(g)["resources"]["limits"]["nvidia.com/gpu"],
            )
            for g in spec["workerGroupSpecs"]
            if g["maxReplicas"] > 0  # not the opt-in gpu-8
        ]
    for stem, (cpus, gpus) in _bundles().items():
        for cluster, nodes in capacities.items():
            assert any(cpus <= c and gpus <= g for c, g in nodes), (stem, cluster, nodes)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_token_auth_and_in_cluster_only_services(name):
    spec = _cluster_spec(_manifest(name))
    assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    head = spec["headGroupSpec"]
    # In a pod the dashboard must listen on the pod IP: the operator and the submitter reach it
    # through the head Service. The Service itself stays inside the cluster.
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert not _manifest(name)["spec"].get("serveService")  # KubeRay's default: a ClusterIP Service


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_pod_mounts_the_shared_volume_and_takes_mlflow_from_a_secret(name):
    pvc = _yaml(KUBERAY / "shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == SHARED_CLAIM
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group_name, group in _groups(_cluster_spec(_manifest(name))):
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        container = _ray_container(group)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/shared"]] == SHARED_CLAIM, group_name
        assert "/dev/shm" in mounts, group_name
        env = {e["name"]: e for e in container["env"]}
        assert env["MAMMO_RAY_WORKDIR"]["value"] == WORKDIR, group_name
        assert env["MAMMO_RAY_CLUSTER"]["value"] == "1", group_name  # SQLite refused (test_cluster_tracking.py)
        # The tracking URI and the basic-auth credentials of the team server (cluster/README.md), all from
        # the one optional Secret: without it the runs go to SQLite on the shared volume.
        for var, key in [
            ("MLFLOW_TRACKING_URI", "tracking-uri"),
            ("MLFLOW_TRACKING_USERNAME", "username"),
            ("MLFLOW_TRACKING_PASSWORD", "password"),
        ]:
            assert "value" not in env[var], (group_name, var)
            ref = {"name": "mammo-ray-mlflow", "key": key, "optional": True}
            assert env[var]["valueFrom"] == {"secretKeyRef": ref}, (group_name, var)
        secret_mounts = {m["mountPath"] for m in container["volumeMounts"] if "secret" in _volume(pod, m["name"])}
        for var, entry in env.items():  # no credential-like variable carries a literal value
            if re.search(r"TOKEN|PASSWORD|SECRET|KEY|MLFLOW", var):
                if var.endswith("_FILE"):  # a path, which must lie in a mounted Secret
                    assert any(entry["value"].startswith(m + "/") for m in secret_mounts), (group_name, var)
                else:
                    assert "value" not in entry, (group_name, var)


def _drop_api_keys(group: dict) -> None:
    from mammo_ray.serving.auth import KEYS_ENV

    pod, container = group["template"]["spec"], _ray_container(group)
    container["env"] = [e for e in container["env"] if e["name"] != KEYS_ENV]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "api-keys"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "api-keys"]


def _volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


def test_the_rayservice_mounts_the_api_keys_secret_in_every_ray_container():
    """Serve listens on 0.0.0.0 in the pods, where the Ingress refuses to start without keys: every Ray
    container (an Ingress replica may land on any) has the Secret mammo-ray-api-keys as a read-only
    file, named by MAMMO_RAY_API_KEYS_FILE, which serving/auth.py reads."""
    from mammo_ray.serving.auth import KEYS_ENV

    manifest = _manifest("rayservice")
    for group_name, group in _groups(_cluster_spec(manifest)):
        pod = group["template"]["spec"]
        container = _ray_container(group)
        path = {e["name"]: e for e in container["env"]}[KEYS_ENV]["value"]
        [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert mount.get("readOnly") is True, group_name
        volume = _volume(pod, mount["name"])
        assert volume["secret"]["secretName"] == "mammo-ray-api-keys", group_name
        assert volume["secret"]["defaultMode"] == 0o400, group_name
    header = (KUBERAY / "rayservice.yaml").read_text()
    assert "kubectl create secret generic mammo-ray-api-keys --from-file=keys.txt" in header
    assert "mammo-ray api-key --append keys.txt" in header and "Authorization: Bearer" in header


def test_rayservice_serves_the_app_builder_with_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_manifest("rayservice")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own model of a config file
    assert [app.import_path for app in schema.applications] == ["serve.app:build_app"]
    # Inside a pod Serve listens on the pod IP (KubeRay's Serve Service reaches it there); on a
    # machine serve/config.yaml keeps it on 127.0.0.1.
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    head_ports = {
        p["name"]: p["containerPort"]
        for p in _ray_container(_manifest("rayservice")["spec"]["rayClusterConfig"]["headGroupSpec"])["ports"]
    }
    assert head_ports["serve"] == 8000


def test_rayservice_deploys_what_serve_config_yaml_deploys():
    path = REPO / "serve" / "config.yaml"
    local = yaml.safe_load(path.read_text())
    in_pod = yaml.safe_load(_manifest("rayservice")["spec"]["serveConfigV2"])
    assert [a["import_path"] for a in in_pod["applications"]] == [a["import_path"] for a in local["applications"]]
    assert local.get("http_options", {}).get("host") == "127.0.0.1"
    from mammo_ray.serving.app import ReplicaOptions, check_app_config

    for app in [*local["applications"], *in_pod["applications"]]:  # args are ServeSettings, user_config options
        check_app_config(app)
        deployments = {d["name"]: d for d in app["deployments"]}
        assert list(deployments) == ["EnsembleModel", "Ingress"]  # the names build_app gives them
        assert set(deployments["EnsembleModel"]["user_config"]) == set(ReplicaOptions.model_fields)
    (here,), (there,) = local["applications"], in_pod["applications"]
    assert here["deployments"][0]["user_config"] == there["deployments"][0]["user_config"]


# ---------------------------------------------------------------- no secrets in cluster/

_NOT_A_VALUE = r"(?!\$|REPLACE_WITH_|<|~|/|\.)"  # a variable, a placeholder, a path
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[0-9A-Za-z]{36,}\b"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.\-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"),
    "literal secret value": re.compile(
        r"(?i)(?<![a-z0-9])(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|auth_token)"
        rf"[ \t]*[:=][ \t]*['\"]?{_NOT_A_VALUE}[^\s'\"{{}}()]+"  # a value on the same line
    ),
}


def _secrets_in(text: str) -> list[str]:
    return [f"{label}: {m.group(0)}" for label, pattern in SECRET_PATTERNS.items() for m in pattern.finditer(text)]


def test_the_secret_scan_finds_planted_secrets_and_passes_references():
    planted = [
        "AKIA" + "Q" * 16,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "AIza" + "x" * 35,
        "ghp_" + "a" * 36,
        "https://alice:" + "hunter2@mlflow.example.org",
        "password: " + "hunter2",
        "token: " + "3f9c2a",
        "RAY_AUTH_TOKEN=" + "3f9c2a",
        "--from-literal=auth_token=" + "3f9c2a",
    ]
    for text in planted:
        assert _secrets_in(text), text
    references = [
        "secretName: mammo-ray-auth-token",
        "secretKeyRef:",
        "RAY_AUTH_MODE=token",
        'auth_token="$(openssl rand -hex 32)"',
        "~/.ray/auth_token: ~/.ray/auth_token",
        "RAY_AUTH_TOKEN=$(kubectl get secret mammo-ray-auth-token)",
        "token: ${RAY_AUTH_TOKEN}",
        "project_id: REPLACE_WITH_GCP_PROJECT_ID",
        "password: <from your secrets manager>",
    ]
    for text in references:
        assert not _secrets_in(text), text


def test_no_literal_secrets_in_cluster_files():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert len(files) >= 10  # the profiles, the manifests, the Dockerfile, the README
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := _secrets_in(p.read_text()))}
    assert found == {}


def test_every_cluster_file_says_research_use_only():
    paths = [*CLUSTER.glob("*.yaml"), *KUBERAY.glob("*.yaml"), *CLUSTER.glob("*.sh"), CLUSTER / "Dockerfile"]
    for path in [*paths, CLUSTER / "README.md"]:
        text = " ".join(path.read_text().replace("#", " ").split())
        assert "For research use only. Not for use in diagnostic procedures." in text, path


if __name__ == "__main__":
    if sys.argv[1:] == ["--vendor"]:
        vendor_crds()
        print(f"wrote {VENDORED_CRDS} ({VENDORED_CRDS.stat().st_size} bytes)")
    else:
        sys.exit("usage: python tests/cluster/test_cluster_configs.py --vendor")
