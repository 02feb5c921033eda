"""The KubeRay manifests of cluster/kuberay/ as the cluster tests read them: one document per file, and the
RayCluster spec inside each of the three kinds."""

from __future__ import annotations

from pathlib import Path

import yaml

KUBERAY = Path(__file__).resolve().parents[1] / "cluster" / "kuberay"


def manifest(name: str) -> dict:
    """``cluster/kuberay/<name>.yaml``, which holds exactly one document."""
    (doc,) = yaml.safe_load_all((KUBERAY / f"{name}.yaml").read_text())
    return doc


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    return doc["spec"][{"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]]
