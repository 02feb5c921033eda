"""cluster/kuberay/networkpolicies.yaml: valid NetworkPolicies that admit exactly who should reach the Ray pods.

Offline, no Kubernetes:

* Each document is validated with jsonschema against the ``networking.k8s.io/v1`` NetworkPolicy
  schema of the oldest and the newest Kubernetes release that ``kubernetes-validate`` ships (its
  "strict" variant: unknown fields are errors, as with ``kubectl apply --validate=strict``). The
  schemas come from ``tests/fixtures/k8s-networkpolicy/``, a trimmed copy (the NetworkPolicy and
  the definitions it references, descriptions removed) that records the wheel it was made from.
* The rest checks what the schemas cannot, by evaluating the policies the way Kubernetes does
  (policies add up; a selected pod takes only what some rule admits) against the pods the
  manifests make: their template labels plus the ones KubeRay adds. The ports are exactly the ones
  the containers declare; the selectors match the Ray pods of all four manifests; the head's ports
  admit only the Ray pods, the operator and the RayJobs' submitters; Serve admits only the Ray pods
  and the labelled client namespaces; no other port admits anything from outside the Ray pods.

Regenerate the vendored schemas (deterministic bytes) from the kubernetes-validate wheel::

    .venv/bin/pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    .venv/bin/python tests/cluster/test_network_policies.py --vendor /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from kuberay_manifests import cluster_spec, manifest

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
POLICIES = KUBERAY / "networkpolicies.yaml"
README = REPO / "cluster" / "README.md"
VENDORED = REPO / "tests" / "fixtures" / "k8s-networkpolicy" / "networkpolicy-v1-schemas.json"
SCHEMA_VERSIONS = ["1.25.0", "1.37.0"]  # the oldest and the newest release kubernetes-validate 1.37.0 ships
ROOT = "io.k8s.api.networking.v1.NetworkPolicy"

RAY_MANIFESTS = ["raycluster", "rayjob-tune", "rayjob-ensemble", "rayservice"]
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
SERVE_PORT = 8000
OPERATOR_NAMESPACE = "default"  # what the file ships; its header says how to change it
CLIENT_NAMESPACE_LABEL = ("mammo-ray/serve-client", "true")
OUTSIDE_PORTS = [8080, 8076, 52365, 10002, 20000]  # metrics, object manager, dashboard agent, workers

# ---------------------------------------------------------------- the vendored schema


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("description", "$id", "$schema")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _relink(node):
    """``/api/_definitions.json#/$defs/X`` (kubernetes-validate's layout) -> ``#/$defs/X``."""
    if isinstance(node, dict):
        return {k: (re.sub(r"^.*#/\$defs/", "#/$defs/", v) if k == "$ref" else _relink(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_relink(v) for v in node]
    return node


def _trimmed(definitions: dict) -> dict:
    """A self-contained schema: NetworkPolicy at the root, what it references under $defs."""
    wanted, todo = {}, [ROOT]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted[name] = _strip(_relink(definitions[name]))
        todo += [ref.split("/")[-1] for ref in _refs(wanted[name])]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **wanted.pop(ROOT),
        "$defs": dict(sorted(wanted.items())),
    }


def vendor(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        version = re.search(r"kubernetes_validate-([^-]+)-", wheel.name).group(1)
        schemas = {}
        for k8s in SCHEMA_VERSIONS:
            folder = f"kubernetes_validate/kubernetes-json-schema/v{k8s}-local-strict"
            schemas[k8s] = _trimmed(json.loads(z.read(f"{folder}/_definitions.json"))["$defs"])
    payload = {
        "source": f"kubernetes-validate {version} (PyPI, Apache-2.0): kubernetes-json-schema/v<version>-local-strict/"
        f"_definitions.json, {ROOT} and the definitions it references, descriptions removed",
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "schemas": schemas,
    }
    VENDORED.parent.mkdir(parents=True, exist_ok=True)
    VENDORED.write_text(_vendored_text(payload))


def _vendored_text(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, indent=1) + "\n"


def _vendored() -> dict:
    return json.loads(VENDORED.read_text())


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft202012Validator]:
    return {k8s: jsonschema.Draft202012Validator(schema) for k8s, schema in _vendored()["schemas"].items()}


def _schema_errors(validator, doc: dict) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


def _policies() -> list[dict]:
    return list(yaml.safe_load_all(POLICIES.read_text()))


def _by_name() -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in _policies()}


def test_vendored_schemas_are_what_vendor_writes():
    vendored = _vendored()
    assert VENDORED.read_text() == _vendored_text(vendored)  # not edited by hand
    assert set(vendored["schemas"]) == set(SCHEMA_VERSIONS)
    assert re.fullmatch(r"[0-9a-f]{64}", vendored["wheel_sha256"])
    for schema in vendored["schemas"].values():
        assert schema["x-kubernetes-group-version-kind"] == [
            {"group": "networking.k8s.io", "kind": "NetworkPolicy", "version": "v1"}
        ]
        assert schema["additionalProperties"] is False  # the strict variant
        assert {r.split("/")[-1] for r in _refs(schema)} <= set(schema["$defs"])  # self-contained
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("k8s", SCHEMA_VERSIONS)
def test_every_document_is_a_valid_networkpolicy(k8s, validators):
    docs = _policies()
    assert len(docs) == 3
    for doc in docs:
        assert doc["apiVersion"] == "networking.k8s.io/v1" and doc["kind"] == "NetworkPolicy"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert "namespace" not in doc["metadata"]  # applied to the namespace of the clusters
        assert _schema_errors(validators[k8s], doc) == [], doc["metadata"]["name"]


def test_the_schema_check_catches_typos_and_wrong_types(validators):
    doc = _by_name()["mammo-ray-head"]
    typo = copy.deepcopy(doc)
    typo["spec"]["podSelecter"] = typo["spec"].pop("podSelector")
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["ingress"][0]["ports"][0]["port"] = [8265]
    nested = copy.deepcopy(doc)
    nested["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabel"] = {"a": "b"}
    for validator in validators.values():
        assert "'podSelecter' was unexpected" in " ".join(_schema_errors(validator, typo))
        assert any("ingress/0/ports/0/port" in e for e in _schema_errors(validator, wrong_type))
        assert "'matchLabel' was unexpected" in " ".join(_schema_errors(validator, nested))


def test_what_the_schema_leaves_open_is_well_formed():
    """Enumerations and ranges that the API server checks but the OpenAPI schema does not state."""
    for doc in _policies():
        spec = doc["spec"]
        assert spec["policyTypes"] == ["Ingress"], doc["metadata"]["name"]  # egress is not restricted
        assert "egress" not in spec
        for rule in spec["ingress"]:
            assert rule["from"], doc["metadata"]["name"]  # an empty `from` would admit everyone
            for peer in rule["from"]:
                assert "ipBlock" not in peer and set(peer) <= {"podSelector", "namespaceSelector"}
                for selector in peer.values():
                    _check_selector(selector)
            for port in rule.get("ports", []):
                assert port["protocol"] == "TCP" and isinstance(port["port"], int) and 0 < port["port"] < 65536
                assert "endPort" not in port
        _check_selector(spec["podSelector"])
        assert spec["podSelector"], doc["metadata"]["name"]  # never every pod of the namespace


def _check_selector(selector: dict) -> None:
    assert selector.get("matchLabels") or selector.get("matchExpressions")  # {} would select everything
    for key, value in selector.get("matchLabels", {}).items():
        assert isinstance(key, str) and isinstance(value, str), (key, value)  # "yes"/"true", never a YAML bool
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] in {"In", "NotIn", "Exists", "DoesNotExist"}
        assert bool(expression.get("values")) == (expression["operator"] in {"In", "NotIn"})


# ---------------------------------------------------------------- the pods the manifests make


def _cluster_name(doc: dict) -> str:
    """The RayCluster's name: the manifest's, or the one KubeRay generates for a RayJob or RayService."""
    name = doc["metadata"]["name"]
    return {"RayCluster": name, "RayJob": f"{name}-x7k2q", "RayService": f"{name}-raycluster-x7k2q"}[doc["kind"]]


class Pod:
    def __init__(self, namespace: str, labels: dict[str, str], ports=(), origin: str = ""):
        self.namespace, self.labels, self.ports, self.origin = namespace, labels, set(ports), origin

    def __repr__(self):
        return f"Pod({self.origin or self.labels}@{self.namespace})"


APP_NAMESPACE = "research"  # the namespace the manifests and the policies are applied in
NAMESPACES = {
    APP_NAMESPACE: {},
    OPERATOR_NAMESPACE: {},
    "clients": {CLIENT_NAMESPACE_LABEL[0]: CLIENT_NAMESPACE_LABEL[1]},
    "elsewhere": {},
}


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace, **NAMESPACES[namespace]}  # Kubernetes sets the first


def _ray_pods(name: str) -> list[Pod]:
    """The pods of a manifest's cluster: the template's labels, then KubeRay's where the template has none
    (ray-operator/controllers/ray/common/pod.go, labelPod)."""
    doc = manifest(name)
    spec = cluster_spec(doc)
    pods = []
    groups = [("head", "headgroup", spec["headGroupSpec"])]
    groups += [("worker", g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for node_type, group_name, group in groups:
        labels = dict(group["template"]["metadata"].get("labels", {}))
        for key, value in {
            "ray.io/is-ray-node": "yes",
            "ray.io/cluster": _cluster_name(doc),
            "ray.io/node-type": node_type,
            "ray.io/group": group_name,
            "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }.items():
            labels.setdefault(key, value)
        ports = {p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}
        pods.append(Pod(APP_NAMESPACE, labels, ports, f"{name}/{group_name}"))
    return pods


def _all_ray_pods() -> list[Pod]:
    return [pod for name in RAY_MANIFESTS for pod in _ray_pods(name)]


def _submitter(rayjob: str) -> Pod:
    """The K8sJobMode submitter pod KubeRay creates for a RayJob (plus the Job controller's labels)."""
    labels = {
        "ray.io/originated-from-crd": "RayJob",
        "ray.io/originated-from-cr-name": rayjob,
        "app.kubernetes.io/created-by": "kuberay-operator",
        "batch.kubernetes.io/job-name": rayjob,
    }
    return Pod(APP_NAMESPACE, labels, origin=f"submitter of {rayjob}")


OPERATORS = [  # the Helm chart's and the kustomize manifests' labels
    Pod(
        OPERATOR_NAMESPACE,
        {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"},
        origin="operator (Helm)",
    ),
    Pod(
        OPERATOR_NAMESPACE,
        {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
        origin="operator (kustomize)",
    ),
]
CLIENT = Pod("clients", {"app": "viewer"}, origin="client")
STRANGERS = [
    Pod(APP_NAMESPACE, {"app": "notebook"}, origin="another pod of the namespace"),
    Pod("elsewhere", {"app": "viewer"}, origin="a pod of an unlabelled namespace"),
    Pod("elsewhere", {"app.kubernetes.io/component": "kuberay-operator"}, origin="an operator look-alike elsewhere"),
    Pod(APP_NAMESPACE, {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": "other-job"}),
    Pod("elsewhere", {"app.kubernetes.io/name": "mammo-ray", "ray.io/is-ray-node": "yes"}, origin="Ray look-alike"),
]


# ---------------------------------------------------------------- NetworkPolicy semantics


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, source: Pod, policy_namespace: str) -> bool:
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], _namespace_labels(source.namespace)):
            return False
    elif source.namespace != policy_namespace:  # a podSelector alone: the policy's namespace
        return False
    return _selects(peer.get("podSelector", {}), source.labels)


def _selecting(policies: list[dict], target: Pod) -> list[dict]:
    return [
        p
        for p in policies
        if target.namespace == APP_NAMESPACE
        and "Ingress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], target.labels)
    ]


def _admits(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Whether Kubernetes lets ``source`` open a TCP connection to ``target:port``."""
    selecting = _selecting(policies, target)
    if not selecting:
        return True  # a pod no policy selects takes everything
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
                continue
            if "from" not in rule or any(_peer_admits(peer, source, APP_NAMESPACE) for peer in rule["from"]):
                return True
    return False


def test_the_evaluator_follows_kubernetes_semantics():
    allow_web = {
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}], "ports": [{"port": 80}]}],
        }
    }
    web, db = Pod(APP_NAMESPACE, {"app": "web"}), Pod(APP_NAMESPACE, {"app": "db"})
    NAMESPACES["team-a"] = {"team": "a"}
    try:
        a, here = Pod("team-a", {}), Pod(APP_NAMESPACE, {})
        assert _admits([allow_web], a, web, 80) and not _admits([allow_web], a, web, 81)
        assert not _admits([allow_web], here, web, 80)  # a namespaceSelector: other namespaces' labels
        assert _admits([allow_web], here, db, 5432)  # not selected: open
        deny = {"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}
        assert not _admits([deny], a, web, 80) and _admits([deny, allow_web], a, web, 80)  # policies add up
    finally:
        del NAMESPACES["team-a"]


# ---------------------------------------------------------------- what the policies admit


def _head(pods: list[Pod]) -> Pod:
    (head,) = [p for p in pods if p.labels["ray.io/node-type"] == "head"]
    return head


def test_the_ports_are_the_ones_the_containers_declare():
    """The head's ports in the policies are the ones every head container declares (6379, 8265, 10001);
    Serve's is the one rayservice.yaml's containers declare and no other manifest's."""
    policies = _by_name()
    head_ports = {p["port"] for rule in policies["mammo-ray-head"]["spec"]["ingress"] for p in rule["ports"]}
    serve_ports = {p["port"] for rule in policies["mammo-ray-serve"]["spec"]["ingress"] for p in rule["ports"]}
    for name in RAY_MANIFESTS:
        head = _head(_ray_pods(name))
        declared = {
            p["name"]: p["containerPort"]
            for c in cluster_spec(manifest(name))["headGroupSpec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert {k: v for k, v in declared.items() if k != "serve"} == HEAD_PORTS, name
        assert head.ports - {SERVE_PORT} == set(HEAD_PORTS.values()), name
    # The operator reaches the dashboard and the client port; GCS only from the Ray pods (policy 1).
    assert head_ports == {HEAD_PORTS["dashboard"], HEAD_PORTS["client"]}
    assert serve_ports == {SERVE_PORT}
    serve_config = yaml.safe_load(manifest("rayservice")["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == SERVE_PORT
    for pod in _ray_pods("rayservice"):
        assert SERVE_PORT in pod.ports, pod  # a proxy on every node (proxy_location: EveryNode)
    for name in ("raycluster", "rayjob-tune", "rayjob-ensemble"):
        assert all(SERVE_PORT not in pod.ports for pod in _ray_pods(name)), name


def test_the_selectors_match_the_pods_the_manifests_make():
    policies = _by_name()
    pods = _all_ray_pods()
    assert len(pods) == 4 + 2 + 2 + 2 + 1  # the heads, the gpu-1 and gpu-8 groups, Serve's gpu-1
    for pod in pods:
        assert pod.labels["app.kubernetes.io/name"] == "mammo-ray", pod  # the template's label, kept by KubeRay
        assert _selects(policies["mammo-ray-ray-pods"]["spec"]["podSelector"], pod.labels), pod
        assert _selects(policies["mammo-ray-serve"]["spec"]["podSelector"], pod.labels), pod
        is_head = pod.labels["ray.io/node-type"] == "head"
        assert _selects(policies["mammo-ray-head"]["spec"]["podSelector"], pod.labels) == is_head, pod
    # The peers that stand for "the cluster's own pods" are the same selector as the pods selected.
    own = policies["mammo-ray-ray-pods"]["spec"]["podSelector"]
    assert policies["mammo-ray-ray-pods"]["spec"]["ingress"] == [{"from": [{"podSelector": own}]}]
    # No policy selects the submitters, the operator or anyone else: they are not restricted here.
    for pod in [*OPERATORS, CLIENT, *STRANGERS, _submitter("mammo-ray-tune")]:
        if pod.origin == "Ray look-alike":
            continue
        assert not _selecting(_policies(), Pod(APP_NAMESPACE, pod.labels)), pod


def test_the_submitters_are_the_rayjobs():
    (rule,) = [r for r in _by_name()["mammo-ray-head"]["spec"]["ingress"] if "RayJob" in json.dumps(r)]
    (peer,) = rule["from"]
    (expression,) = peer["podSelector"]["matchExpressions"]
    rayjobs = [manifest(n) for n in RAY_MANIFESTS if manifest(n)["kind"] == "RayJob"]
    assert sorted(expression["values"]) == sorted(doc["metadata"]["name"] for doc in rayjobs)
    assert all(doc["spec"]["submissionMode"] == "K8sJobMode" for doc in rayjobs)  # a submitter pod


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_the_heads_ports_admit_only_the_ray_pods_the_operator_and_the_submitters(name):
    policies = _policies()
    head = _head(_ray_pods(name))
    ray_pods = _all_ray_pods()
    submitters = [_submitter(n) for n in ("mammo-ray-tune", "mammo-ray-ensemble")]
    for port_name, port in HEAD_PORTS.items():
        for pod in ray_pods:
            assert _admits(policies, pod, head, port), (pod, port_name)
        for operator in OPERATORS:
            assert _admits(policies, operator, head, port) == (port_name in ("dashboard", "client")), (
                operator,
                port_name,
            )
        for submitter in submitters:
            assert _admits(policies, submitter, head, port) == (port_name == "dashboard"), (submitter, port_name)
        for stranger in [CLIENT, *STRANGERS]:
            assert not _admits(policies, stranger, head, port), (stranger, port_name)


def test_serve_admits_only_the_ray_pods_and_the_labelled_client_namespaces():
    policies = _policies()
    for target in _ray_pods("rayservice"):
        assert _admits(policies, CLIENT, target, SERVE_PORT), target
        for pod in _all_ray_pods():
            assert _admits(policies, pod, target, SERVE_PORT), (pod, target)
        for pod in [*OPERATORS, *STRANGERS, _submitter("mammo-ray-tune")]:
            assert not _admits(policies, pod, target, SERVE_PORT), (pod, target)
        # The client namespace reaches Serve and nothing else.
        for port in [*HEAD_PORTS.values(), *OUTSIDE_PORTS]:
            assert not _admits(policies, CLIENT, target, port), (target, port)


def test_every_other_port_of_every_ray_pod_admits_only_the_ray_pods():
    policies = _policies()
    ray_pods = _all_ray_pods()
    outsiders = [*OPERATORS, CLIENT, *STRANGERS, _submitter("mammo-ray-tune"), _submitter("mammo-ray-ensemble")]
    for target in ray_pods:
        for port in OUTSIDE_PORTS:
            assert all(_admits(policies, pod, target, port) for pod in ray_pods), (target, port)
            for pod in outsiders:
                assert not _admits(policies, pod, target, port), (pod, target, port)


def test_the_file_names_the_operator_namespace_and_the_readme_says_how_to_use_it():
    head = _by_name()["mammo-ray-head"]
    [operator_rule] = [r for r in head["spec"]["ingress"] if "namespaceSelector" in r["from"][0]]
    [peer] = operator_rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}
    text = POLICIES.read_text()
    assert "For research use only. Not for use in diagnostic procedures." in text
    assert "kubectl apply -f cluster/kuberay/networkpolicies.yaml" in text
    readme = README.read_text()
    section = readme[readme.index("## Network policies") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    for needed in (
        "kubectl apply -f cluster/kuberay/networkpolicies.yaml",
        "kubectl label namespace",
        "mammo-ray/serve-client=true",
        "Calico",
        "Cilium",
        "kubernetes.io/metadata.name",
    ):
        assert needed in section, needed


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--vendor":
        vendor(Path(sys.argv[2]))
        print(f"wrote {VENDORED} ({VENDORED.stat().st_size} bytes)")
    else:
        sys.exit("usage: python tests/cluster/test_network_policies.py --vendor KUBERNETES_VALIDATE_WHEEL")
