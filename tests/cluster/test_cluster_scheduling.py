"""cluster/kuberay/: pods that fit their nodes, GPU affinity, an opt-in 8-GPU group, jobs that end, and the load Job.

Offline, no Kubernetes. The node shapes and the kubelet's reservation are the ones cluster/README.md
("Node shapes") documents: GKE's published reservation formula (larger than EKS's defaults) plus
the eviction threshold and an allowance for the DaemonSets. Every pod of every manifest must fit
each instance type its affinity admits (the head and the load Job: the CPU node shape).
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from kuberay_manifests import cluster_spec, manifest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
README = CLUSTER / "README.md"
RAY_MANIFESTS = ["raycluster", "rayjob-tune", "rayjob-ensemble", "rayservice"]
RAYJOBS = ["rayjob-tune", "rayjob-ensemble"]
LOAD_JOB = KUBERAY / "job-load-cbis.yaml"
VENDORED_CRDS = REPO / "tests" / "fixtures" / "kuberay-crds" / "kuberay-v1-schemas.json.gz"
SHARED_CLAIM = "mammo-ray-shared"

# (vCPUs, memory GiB, GPUs, the GPU's nvidia.com/gpu.product) as the clouds publish the instance types.
NODE_SHAPES = {
    "m5.2xlarge": (8, 32, 0, None),
    "n2-standard-8": (8, 32, 0, None),
    "g5.2xlarge": (8, 32, 1, "NVIDIA-A10G"),
    "g2-standard-8": (8, 32, 1, "NVIDIA-L4"),
    "a2-highgpu-1g": (12, 85, 1, "NVIDIA-A100-SXM4-40GB"),
    "p4d.24xlarge": (96, 1152, 8, "NVIDIA-A100-SXM4-40GB"),
    "a2-highgpu-8g": (96, 680, 8, "NVIDIA-A100-SXM4-40GB"),
}
CPU_NODES = ["m5.2xlarge", "n2-standard-8"]  # where the heads and the load Job run
DAEMONSETS = (0.5, 1.0)  # CPU, GiB: kube-proxy, CNI, CSI, device plugin, GPU feature discovery, logging
EVICTION_GIB = 100 / 1024
GPU_TERM_KEYS = ["nvidia.com/gpu.product", "node.kubernetes.io/instance-type"]


def _groups(name: str) -> list[tuple[str, dict]]:
    spec = cluster_spec(manifest(name))
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _tiered(amount: float, tiers: list[tuple[float, float]], rest: float) -> float:
    """``sum(rate * part)`` over consecutive tiers of ``amount``, then ``rest`` per unit beyond them."""
    reserved, start = 0.0, 0.0
    for size, rate in tiers:
        reserved += rate * max(0.0, min(amount, start + size) - start)
        start += size
    return reserved + rest * max(0.0, amount - start)


def kubelet_reserved(vcpus: float, memory_gib: float) -> tuple[float, float]:
    """GKE's system reservation (CPU cores, GiB): 6 % of the first core, 1 % of the second, 0.5 % of the
    next two, 0.25 % above; 25 % of the first 4 GiB, 20 % of the next 4, 10 % of the next 8, 6 % of the
    next 112, 2 % above 128."""
    cpu = _tiered(vcpus, [(1, 0.06), (1, 0.01), (2, 0.005)], 0.0025)
    memory = _tiered(memory_gib, [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06)], 0.02)
    return cpu, memory


def room_for_a_pod(instance_type: str) -> tuple[float, float]:
    """CPU cores and GiB a pod may request on an otherwise empty node of this type."""
    vcpus, memory, _, _ = NODE_SHAPES[instance_type]
    cpu, mem = kubelet_reserved(vcpus, memory)
    return vcpus - cpu - DAEMONSETS[0], memory - mem - EVICTION_GIB - DAEMONSETS[1]


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", str(quantity)).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


def _affinity_terms(pod: dict) -> dict[str, list[str]]:
    """key -> values of each term of the pod's required node affinity (one expression per term)."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    out = {}
    for term in terms:
        (expression,) = term["matchExpressions"]
        assert expression["operator"] == "In"
        out[expression["key"]] = expression["values"]
    return out


def _pods() -> list[tuple[str, dict, list[str]]]:
    """(where, pod spec, the instance types it may land on) for every pod the manifests make."""
    pods = []
    for name in RAY_MANIFESTS:
        for group_name, group in _groups(name):
            pod = group["template"]["spec"]
            types = CPU_NODES if group_name == "head" else _affinity_terms(pod)["node.kubernetes.io/instance-type"]
            pods.append((f"{name}/{group_name}", pod, types))
    pods.append(("job-load-cbis", yaml.safe_load(LOAD_JOB.read_text())["spec"]["template"]["spec"], CPU_NODES))
    return pods


# ---------------------------------------------------------------- requests that fit


def test_the_reservation_arithmetic_on_the_documented_shape():
    cpu, memory = kubelet_reserved(8, 32)
    assert cpu == pytest.approx(0.09) and memory == pytest.approx(3.56)
    assert kubelet_reserved(96, 680) == (pytest.approx(0.31), pytest.approx(20.36))
    pod_cpu, pod_memory = room_for_a_pod("g5.2xlarge")
    assert pod_cpu == pytest.approx(7.41) and pod_memory == pytest.approx(27.34, abs=0.01)
    assert not (8 <= pod_cpu and 32 <= pod_memory)  # the former 8 CPU / 32Gi could never be scheduled
    section = README.read_text().split("## Node shapes (Kubernetes)")[1].split("\n## ")[0]
    for figure in ("0.09 CPU", "3.56 GiB", "100 MiB", "0.5 CPU and 1 GiB", "7.41 CPU and 27.3 GiB", "7 CPU, 26 GiB"):
        assert figure in section, figure


@pytest.mark.parametrize("where, pod, types", _pods(), ids=[p[0] for p in _pods()])
def test_every_pod_fits_each_node_shape_it_may_land_on(where, pod, types):
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        resources = container["resources"]
        assert resources["requests"].items() <= resources["limits"].items(), where  # requests = limits (CPU, memory)
    (main,) = [c for c in pod["containers"]]  # one container per pod; init containers run before it
    requests, limits = main["resources"]["requests"], main["resources"]["limits"]
    gpus = limits.get("nvidia.com/gpu", 0)
    readme = README.read_text()
    for instance_type in types:
        assert instance_type in NODE_SHAPES and instance_type in readme, (where, instance_type)
        cpu_room, memory_room = room_for_a_pod(instance_type)
        assert _cpus(requests["cpu"]) <= cpu_room, (where, instance_type, requests, cpu_room)
        assert _gib(requests["memory"]) <= memory_room, (where, instance_type, requests, memory_room)
        assert gpus == NODE_SHAPES[instance_type][2], (where, instance_type)  # the whole node's GPUs, no more


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_gpu_groups_ask_for_their_gpu_type_and_cpu_pods_for_none(name):
    for group_name, group in _groups(name):
        pod = group["template"]["spec"]
        if group_name == "head":
            assert "affinity" not in pod and "tolerations" not in pod  # GPU nodes are tainted: never there
            continue
        terms = _affinity_terms(pod)
        assert list(terms) == GPU_TERM_KEYS, group_name  # GPU feature discovery's label, or the instance type
        products = {NODE_SHAPES[t][3] for t in terms["node.kubernetes.io/instance-type"]}
        assert products == set(terms["nvidia.com/gpu.product"]), group_name  # the two terms admit the same GPUs
    load = yaml.safe_load(LOAD_JOB.read_text())["spec"]["template"]["spec"]
    assert "affinity" not in load and "nvidia.com/gpu" not in load["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_the_8_gpu_group_is_opt_in(name):
    groups = dict(_groups(name))
    for group_name, group in groups.items():
        if group_name == "head":
            continue
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        if gpus == 8:
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 0, (name, group_name)
        else:
            assert group["maxReplicas"] >= 1, (name, group_name)
    readme = README.read_text()
    assert "The 8-GPU group is opt-in." in readme and "`maxReplicas: 2`" in readme
    assert '"path": "/spec/workerGroupSpecs/1/maxReplicas", "value": 2' in readme
    assert [g["groupName"] for g in cluster_spec(manifest("raycluster"))["workerGroupSpecs"]][1] == "gpu-8"


# ---------------------------------------------------------------- jobs that end


def _rayjob_schema() -> dict:
    with gzip.open(VENDORED_CRDS, "rt") as f:
        return json.load(f)["schemas"]["RayJob"]["properties"]["spec"]["properties"]


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_rayjob_has_a_deadline_and_an_end(name):
    spec = manifest(name)["spec"]
    schema = _rayjob_schema()
    for field in ("activeDeadlineSeconds", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit"):
        assert field in schema, field  # in the vendored CRD (the strict schema test validates the values)
    assert isinstance(spec["activeDeadlineSeconds"], int) and 3600 <= spec["activeDeadlineSeconds"] <= 86400
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] == 0
    assert "deletionStrategy" not in spec  # needs the operator's alpha RayJobDeletionPolicy feature gate
    hours = spec["activeDeadlineSeconds"] // 3600
    assert f"deadline: {hours} h" in README.read_text(), hours  # the walkthrough says it


# ---------------------------------------------------------------- the load Job

# batch/v1 JobSpec fields (Kubernetes 1.25-1.34); the pod template is checked against the CRDs' own copy
# of the core/v1 PodTemplateSpec schema.
JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "backoffLimitPerIndex",
    "completionMode",
    "completions",
    "managedBy",
    "manualSelector",
    "maxFailedIndexes",
    "parallelism",
    "podFailurePolicy",
    "podReplacementPolicy",
    "selector",
    "successPolicy",
    "suspend",
    "template",
    "ttlSecondsAfterFinished",
}


def _strict(node):
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def test_the_load_job_is_a_valid_job_that_ends():
    job = yaml.safe_load(LOAD_JOB.read_text())
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("batch/v1", "Job", "mammo-ray-load-cbis")
    spec = job["spec"]
    assert set(spec) <= JOB_SPEC_FIELDS, set(spec) - JOB_SPEC_FIELDS
    assert (
        spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 12 * 3600 and spec["ttlSecondsAfterFinished"] > 0
    )
    with gzip.open(VENDORED_CRDS, "rt") as f:
        cluster = json.load(f)["schemas"]["RayCluster"]["properties"]["spec"]["properties"]
    template_schema = _strict(cluster["headGroupSpec"]["properties"]["template"])
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(template_schema).iter_errors(spec["template"])
    ]
    assert errors == []
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    for container in [*pod["initContainers"], *pod["containers"]]:
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == "/shared" and claims[mount["name"]] == SHARED_CLAIM, container["name"]
    (wait,) = pod["initContainers"]
    assert wait["name"] == "wait-for-download" and "/shared/CBIS-DDSM/.download-complete" in " ".join(wait["command"])
    (load,) = pod["containers"]
    assert load["command"] == ["bash", "cluster/load_cbis.sh"] and (REPO / "cluster" / "load_cbis.sh").is_file()
    env = {e["name"]: e["value"] for e in load["env"]}
    assert env["MAMMO_RAY_WORKDIR"] == "/shared/mammo-ray"
    assert int(env["LOAD_WORKERS"]) == _cpus(load["resources"]["limits"]["cpu"])  # one process per CPU


def test_the_load_script_prepares_what_the_cbis_jobs_look_up():
    from mammo_ray.cli import build_parser
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import dataset_key
    from mammo_ray.data.shard_worker import CROP_FIELDS

    script = CLUSTER / "load_cbis.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid bash
    text = script.read_text()
    search = load_config(REPO / "tune_configs" / "cbis_search.yaml")
    ensemble = load_config(REPO / "tune_configs" / "cbis_ensemble.yaml")
    assert f"root={search.data.root}\n" in text and f"csvs={search.data.csv_dir}\n" in text
    # The ensemble trains on the search's crops: the same dataset, split and crop settings.
    assert dataset_key(search.data) == dataset_key(ensemble.data)
    for field in (*CROP_FIELDS, "abnormality", "split_fractions", "split", "split_seed"):
        assert getattr(search.data, field) == getattr(ensemble.data, field), field
    # Each mammo-ray command parses, with the variables filled in as the script fills them.
    values = {"root": search.data.root, "csvs": search.data.csv_dir, "work": "/shared/mammo-ray", "workers": "7"}
    joined = text.replace("\\\n", " ")
    commands = [line.strip() for line in joined.splitlines() if line.strip().startswith("mammo-ray ")]
    assert [c.split()[1] for c in commands] == ["index", "demo", "demo"]
    parsed = []
    for command in commands:
        for name in sorted(values, key=len, reverse=True):  # $workers before $work
            command = command.replace(f'"${name}"', values[name]).replace(f"${name}", values[name])
        parsed.append(build_parser().parse_args(shlex.split(command)[1:]))
    index, first, inception = parsed
    assert index.no_boxes and index.root == search.data.root and index.csv == search.data.csv_dir
    assert first.data_only and first.config == "tune_configs/cbis_search.yaml"
    assert inception.data_only and inception.config == "tune_configs/cbis_search.yaml"
    # The second prepare is the search's inception_v3 cells' own cache.
    overrides = dict(o.split("=", 1) for o in inception.overrides if not o.startswith("data.num_workers"))
    assert {k: int(v) for k, v in overrides.items()} == search.tune.backbone_overrides["inception_v3"]
