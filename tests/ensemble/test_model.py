"""The ensemble as one torch module and one registered MLflow model (paper 000: members differ by seed);
the model's inputs and outputs are tested in test_pyfunc.py."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from mammo_ray.data.datasets import CropCache
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.ensemble.model import Ensemble, register_ensemble
from mammo_ray.train.checkpoint import checkpoint_payload, load_checkpoint, restore_model, save_checkpoint
from mammo_ray.train.loop import build_training, fit
from mammo_ray.train.tracking import TrackedRun, ensure_experiment

pytestmark = pytest.mark.slow  # every test uses trained (or built and saved) members


@pytest.fixture(scope="module")
def make_member(tiny_workdir, tiny_config, tmp_path_factory):
    """``make_member(*overrides, train=False) -> checkpoint path``. Untrained, a member's weights are
    its seed's initialisation: training one epoch changes nothing of what is tested but the time."""

    def make(*overrides: str, train: bool = False):
        config = tiny_config("train.epochs=1", *overrides)
        cache_dir = ensure_prepared(config, tiny_workdir, progress=False).cache_dir
        training = build_training(config, cache_dir)
        if train:
            fit(training)
        payload = checkpoint_payload(
            model=training.model, config=config, spec=training.spec, epoch=0, history=training.history
        )
        return save_checkpoint(payload, tmp_path_factory.mktemp("member"))

    return make


@pytest.fixture(scope="module")
def members(make_member):
    return [make_member(f"train.seed={seed}", train=seed == 0) for seed in range(3)]


def batch(ensemble: Ensemble, tiny_workdir, tiny_config, n: int = 6) -> torch.Tensor:
    cache = CropCache(ensure_prepared(tiny_config(), tiny_workdir, progress=False).cache_dir)
    transform = build_eval_transform(ensemble.spec)  # the preprocessing stored with the members
    return torch.stack([transform(cache.image(i)) for i in range(n)])


def member_probs(path, x) -> torch.Tensor:
    model, _, _ = restore_model(load_checkpoint(path))
    with torch.no_grad():
        return torch.softmax(model(*x) if isinstance(x, tuple) else model(x), dim=1)[:, 1]


def test_ensemble_returns_every_members_probability(members, tiny_workdir, tiny_config):
    ensemble = Ensemble.from_checkpoints(members)
    assert len(ensemble.members) == 3 and ensemble.view_mode == "single"
    assert ensemble.config.train.seed == 0 and ensemble.spec.input_px == 32
    x = batch(ensemble, tiny_workdir, tiny_config)
    probs = ensemble(x)
    assert probs.shape == (6, 3) and ((probs >= 0) & (probs <= 1)).all()
    for m, path in enumerate(members):
        torch.testing.assert_close(probs[:, m], member_probs(path, x))
    assert not torch.allclose(probs[:, 0], probs[:, 1])  # different seeds, different members


def test_multimodal_ensemble_takes_pairs(make_member, tiny_workdir, tiny_config):
    paths = [make_member("model.view_mode=multimodal", f"train.seed={seed}") for seed in (0, 1)]
    ensemble = Ensemble.from_checkpoints(paths)
    x = batch(ensemble, tiny_workdir, tiny_config, n=8)
    cc, mlo = x[:4], x[4:]
    probs = ensemble((cc, mlo))
    assert probs.shape == (4, 2)
    torch.testing.assert_close(ensemble(torch.stack([cc, mlo], dim=1)), probs)  # one stacked tensor
    for m, path in enumerate(paths):
        torch.testing.assert_close(probs[:, m], member_probs(path, (cc, mlo)))
    with pytest.raises(ValueError, match="multimodal ensemble takes"):
        ensemble(cc)


@pytest.mark.parametrize(
    "override, field", [("data.input_px=36", "eval_transform.input_px"), ("model.view_mode=parallel", "view_mode")]
)
def test_mismatched_member_is_named(members, make_member, override, field):
    odd = make_member(override)
    with pytest.raises(ValueError, match=field) as info:
        Ensemble.from_checkpoints([*members[:2], odd])
    assert str(odd) in str(info.value) and str(members[0]) in str(info.value)


def test_register_logs_a_model_and_registers_it(members, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    ensure_experiment(client, "ensembles", (tmp_path / "artifacts").as_uri())
    member_runs = []
    for seed in range(3):
        with TrackedRun(uri, "ensembles", f"member-{seed}") as run:
            member_runs.append(run.run_id)
    with TrackedRun(uri, "ensembles", "ensemble") as parent:
        result = register_ensemble(uri, parent.run_id, members, member_runs, "mass-ensemble", description="test")
    assert result == {
        "model_uri": "models:/mass-ensemble/1",
        "name": "mass-ensemble",
        "version": 1,
        "run_id": parent.run_id,
        "alias": None,
        "alias_uri": "models:/mass-ensemble/1",
        "model_id": result["model_id"],
    }
    version = client.get_model_version("mass-ensemble", "1")
    assert version.tags["mammo_ray.member_run_ids"] == ",".join(member_runs)
    assert version.tags["mammo_ray.members"] == "3" and version.run_id == parent.run_id
    assert all(rid in version.description for rid in member_runs) and version.description.startswith("test")

    # A logged model of the ensemble's run (MLflow 3's Models tab and the run's outputs), holding the
    # saved model, and linked to the version it became.
    logged = client.get_logged_model(result["model_id"])
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == parent.run_id
    assert logged.name == "mass-ensemble" and logged.tags["mammo_ray.member_run_ids"] == ",".join(member_runs)
    assert json.loads(logged.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": "mass-ensemble", "version": version.version}]
    assert [o.model_id for o in client.get_run(parent.run_id).outputs.model_outputs] == [logged.model_id]
    assert version.source == logged.artifact_location
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert files >= {"MLmodel", "pyfunc_model.py", "code", "artifacts", "input_example.json", "requirements.txt"}

    again = register_ensemble(uri, parent.run_id, members[:2], member_runs[:2], "mass-ensemble")
    assert again["version"] == 2 and again["model_id"] != result["model_id"]  # one new version per call
    assert client.get_model_version("mass-ensemble", "2").tags["mammo_ray.members"] == "2"


def test_register_checks_its_inputs(members, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="3 checkpoints but 2 member run ids"):
        register_ensemble(uri, "0" * 32, members, ["a", "b"], "x")
