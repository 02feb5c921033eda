"""One model of many members: torch module, MLflow pyfunc, registry version (paper 000; see docs/papers.md).

Paper 000's ensemble is 100 networks that differ only in their random seed; its prediction is
the mean of their malignancy probabilities (and, per exam, the mean over CC and MLO, which is
left to the caller: see ``combine``). ``Ensemble`` runs the members one after the other under
``torch.inference_mode``: on these CPUs a plain loop is about 1.5x faster than ``vmap`` over
stacked weights, and it allows members of different architectures.

The members must agree on what they take and return: view mode, input channels, classes and
the evaluation transform (so one preprocessed batch feeds them all). ``register_ensemble``
saves the member checkpoints as one MLflow model that takes images (``pyfunc``), logs it as a
logged model of the ensemble's run and registers it as one model version whose tags name the
member runs (lineage).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from torch import Tensor, nn

from mammo_ray import tags
from mammo_ray.config import Config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.ensemble.pyfunc import save_ensemble_model
from mammo_ray.train.checkpoint import checkpoint_file, load_checkpoint, restore_model

__all__ = ["Ensemble", "check_members", "member_name", "register_ensemble"]


def member_name(index: int) -> str:
    """The artifact name (and output column) of member ``index``: ``member_000``, ``member_001``, ..."""
    return f"member_{index:03d}"


def _signature(payload: dict[str, Any]) -> dict[str, Any]:
    """What every member must share: the input and output contract and the eval preprocessing."""
    model = payload["config"]["model"]
    return {
        "view_mode": model["view_mode"],
        "in_chans": model["in_chans"],
        "num_classes": model["num_classes"],
        **{f"eval_transform.{k}": v for k, v in payload["eval_transform"].items()},
    }


def _first_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    for field in [*ours, *(k for k in theirs if k not in ours)]:  # in signature order: the first named
        a, b = ours.get(field), theirs.get(field)
        if isinstance(a, Tensor) or isinstance(b, Tensor):  # the mean image of mean-image subtraction
            same = isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
        else:
            same = a == b
        if not same:
            shown = (
                f"{a!r} vs {b!r}"
                if not isinstance(a, Tensor) and not isinstance(b, Tensor)
                else "the mean images differ"
            )
            return f"{field} ({shown})"
    return None


def check_members(payloads: Sequence[dict[str, Any]], paths: Sequence[str | Path]) -> None:
    """Raise ValueError naming the first checkpoint that does not match member 0, and the field."""
    if len(payloads) == 0:
        raise ValueError("an ensemble needs at least one member checkpoint")
    reference = _signature(payloads[0])
    for payload, path in zip(payloads[1:], paths[1:], strict=True):
        field = _first_difference(reference, _signature(payload))
        if field is not None:
            raise ValueError(f"{path}: ensemble member differs from the first member {paths[0]} in {field}")


class Ensemble(nn.Module):
    """Members whose forward returns ``(N, M)`` malignancy probabilities, member by member.

    Args:
        members: restored view models (eval mode), all of one view mode.
        spec: their shared evaluation preprocessing.
        config: member 0's config (data, model and training settings of the ensemble).
    """

    def __init__(self, members: Sequence[nn.Module], spec: TransformSpec, config: Config) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.spec, self.config = spec, config
        self.view_mode: str = config.model.view_mode

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: str | torch.device = "cpu") -> Ensemble:
        """Restore every member (``restore_model(load_checkpoint(path))``) and check they agree.

        Raises:
            ValueError: naming the checkpoint whose view mode, input channels, classes or eval
                transform differ from the first member's, and the field.
        """
        paths = list(paths)
        if not paths:
            raise ValueError("an ensemble needs at least one member checkpoint")
        members, first = [], None
        for path in paths:
            payload = load_checkpoint(path)
            contract = {"config": payload["config"], "eval_transform": payload["eval_transform"]}
            if first is None:
                first = contract
            else:
                check_members([first, contract], [paths[0], path])
            model, member_spec, member_config = restore_model(payload, device)
            members.append(model)
            if len(members) == 1:
                spec, config = member_spec, member_config
        return cls(members, spec, config).eval()

    def _inputs(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
        return member_inputs(self.view_mode, x)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Member probabilities of class 1 (malignant), ``(N, M)``.

        ``x`` is what each member's forward takes: a ``(N, C, H, W)`` batch for ``single`` and
        ``parallel`` (one view per row; the per-exam CC/MLO mean comes after), a ``(cc, mlo)``
        pair or a ``(N, 2, C, H, W)`` tensor for ``multimodal``.
        """
        inputs = self._inputs(x)
        with torch.inference_mode():
            probs = [torch.softmax(member(*inputs).float(), dim=1)[:, 1] for member in self.members]
        return torch.stack(probs, dim=1)


def member_inputs(view_mode: str, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The members' positional inputs: ``(x,)``, or ``(cc, mlo)`` for multimodal members.

    The one input contract of every way to run an ensemble (``Ensemble``, ``execution.StackedEnsemble``).
    """
    if view_mode != "multimodal":
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"{view_mode} ensemble takes one (N, C, H, W) tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        return (x,)
    if isinstance(x, Tensor):  # one stacked tensor: (N, 2, C, H, W), CC then MLO
        if x.dim() != 5 or x.shape[1] != 2:
            raise ValueError(f"multimodal ensemble takes (N, 2, C, H, W) or a (cc, mlo) pair, got {tuple(x.shape)}")
        return x[:, 0], x[:, 1]
    if len(x) != 2:
        raise ValueError(f"multimodal ensemble takes a (cc, mlo) pair, got {len(x)} tensors")
    return x[0], x[1]


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    try:
        client.create_registered_model(name, description="Seed ensembles (paper 000); see each version's tags.")
    except MlflowException as exc:  # another process registered it first
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def register_ensemble(
    uri: str,
    run_id: str,
    checkpoints: Sequence[str | Path],
    member_run_ids: Sequence[str],
    name: str,
    *,
    description: str = "",
    alias: str | None = None,
    decisions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the members as one MLflow model, log it as a logged model of run ``run_id``, register one version.

    The members are checked first (``check_members``). Nothing touches MLflow's global tracking
    URI or active run: a logged model is created in the run's experiment with ``MlflowClient(uri)``
    (named ``name``, the run's parameters, the member tags), the model is saved to a temporary folder
    (``pyfunc.save_ensemble_model``: signature, input example, the code, the member checkpoints)
    and uploaded as its artifacts, the run lists it among its outputs, and the version is registered
    from the logged model's artifact location; the logged model's ``mlflow.modelVersions`` tag names the
    version (the SQL registry does not keep a version's ``model_id``).

    Args:
        uri: tracking (and registry) URI, e.g. ``sqlite:////abs/mlflow.db``.
        run_id: an existing run (the ensemble's parent run) that the logged model comes from.
        checkpoints: the member checkpoint files or folders, in member order.
        member_run_ids: the MLflow run of each member, same order (lineage tags).
        name: the registered model; created when missing.
        description: prepended to the version description (which lists the member runs).
        alias: a registry alias (e.g. ``champion``) moved to the new version, so that
            ``models:/<name>@<alias>`` names it; None: no alias.
        decisions: the ensemble's decision policy (fitted on val), stored with the model.

    Returns:
        ``{"model_uri": "models:/<name>/<version>", "name", "version" (int), "run_id", "alias",
        "alias_uri", "model_id"}`` (``alias_uri`` is ``models:/<name>@<alias>``, or the version's URI
        without an alias; ``model_id`` is the logged model's, ``models:/<model_id>`` in MLflow).
    """
    files = [checkpoint_file(p) for p in checkpoints]
    if len(files) != len(member_run_ids):
        raise ValueError(f"register_ensemble: {len(files)} checkpoints but {len(member_run_ids)} member run ids")
    payloads = []
    for path in files:  # only the contract is kept, not the weights
        payload = load_checkpoint(path)
        payloads.append({"config": payload["config"], "eval_transform": payload["eval_transform"]})
    check_members(payloads, files)

    client = MlflowClient(uri)
    run = client.get_run(run_id)  # fails early, naming the run, when it does not exist
    view_mode = payloads[0]["config"]["model"]["view_mode"]
    lineage = {tags.MEMBER_RUN_IDS: ",".join(member_run_ids), tags.MEMBERS: str(len(files))}
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags={**lineage, tags.VIEW_MODE: view_mode},
        params=dict(run.data.params),
        model_type="mammo-ray ensemble",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model"
            save_ensemble_model(
                target,
                {member_name(i): path for i, path in enumerate(files)},
                view_mode,
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
                decisions=decisions,
            )
            client.log_model_artifacts(logged.model_id, str(target))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])

    _ensure_registered_model(client, name)
    members = "\n".join(f"- {member_name(i)}: run {rid}" for i, rid in enumerate(member_run_ids))
    text = f"{description}\n\n" if description else ""
    version = client.create_model_version(
        name,
        # Not models:/<model_id>: the SQL registry would resolve that through the process-wide tracking URI.
        source=logged.artifact_location,
        run_id=run_id,
        tags=lineage,
        description=f"{text}Average of {len(files)} members (paper 000):\n{members}",
        model_id=logged.model_id,
    )
    client.set_logged_model_tags(
        logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version.version}])}
    )
    model_uri = f"models:/{name}/{version.version}"
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {
        "model_uri": model_uri,
        "name": name,
        "version": int(version.version),
        "run_id": run_id,
        "alias": alias,
        "alias_uri": f"models:/{name}@{alias}" if alias else model_uri,
        "model_id": logged.model_id,
    }
