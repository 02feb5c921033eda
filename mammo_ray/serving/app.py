"""The Ray Serve app: the ensemble behind a FastAPI ingress (predict, localize, health, model).

    serve run serve/config.yaml              # from the repository root (serve/app.py re-exports build_app)
    mammo-ray serve --model models:/mammo-ray-demo-ensemble@champion [--host 127.0.0.1] [--port 8000]

Two deployments, named as ``serve/config.yaml``'s ``deployments:`` list names them (the shape ``serve
build`` writes), where Serve's users change replicas, autoscaling, ``ray_actor_options`` and
``max_ongoing_requests``:

- ``EnsembleModel`` loads the members once per replica in ``__init__`` (from a checkpoint, a run or
  a registered version), measures loop against stacked execution on its own device, warms up, and
  answers batched predictions (``serving/batching.py``) and localizations (dense maps of patch
  classifiers, CAM or Grad-CAM of crop classifiers). Its ``user_config`` (``ReplicaOptions``: thresholds, ROI default,
  localization tiling, batching) is applied by ``reconfigure()``, so a ``serve deploy`` that changes
  only the threshold updates the running replicas without reloading their members.
- ``Ingress`` serves the FastAPI app of ``mammo_ray.serving.api``, built on the replica by the
  builder function handed to ``serve.ingress`` (Serve's documented way to build an app at replica
  start), and calls the model through its deployment handle.

``max_ongoing_requests`` and ``max_queued_requests`` bound both, so overload answers 503 instead of
piling up. HTTP binds 127.0.0.1 unless told otherwise.

With ``topology: combined`` (``mammo-ray serve --haproxy``) one deployment, ``EnsembleApp`` named
``EnsembleModel``, holds both: the FastAPI app over the members in the same replica (``LocalBackend``), so an
upload crosses one process boundary instead of two. A replica that dies is then answered for by the proxy:
HAProxy with the page of ``serving/haproxy.py`` (503, Retry-After), Serve's Python proxy with a 500.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, Literal, cast

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle

from mammo_ray.serving.api import build_api
from mammo_ray.serving.auth import check_bind, load_keys
from mammo_ray.serving.batching import Batcher
from mammo_ray.serving.runtime import TIMING_KEY, ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import UploadError

STATUS_TIMEOUT_S = 3.0
MODEL_DEPLOYMENT = "EnsembleModel"
INGRESS_DEPLOYMENT = "Ingress"


class ReplicaOptions(BaseModel):
    """``EnsembleModel``'s ``user_config``: what a running replica can change without reloading its members.
    The defaults, and the values ``mammo-ray serve --set`` gives, come from ``ServeSettings``."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.5, ge=0, le=1)
    localize_threshold: float = Field(0.5, ge=0, le=1)
    localize_tile: int = Field(1024, ge=0)
    localize_long_side: int | None = Field(None, ge=8)
    roi_default: Literal["whole", "center"] = "whole"
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)

    @classmethod
    def of(cls, settings: ServeSettings) -> ReplicaOptions:
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


class EnsembleReplica:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.runtime = ModelRuntime(settings)  # loads, chooses loop/stacked, warms: once per replica
        self.loaded_at = time.time()
        self.updates = 0  # user_config updates applied since the members were loaded
        self.batcher: Batcher[PredictItem, dict[str, Any] | UploadError] = Batcher(self._predict_batch)
        self._apply(ReplicaOptions.of(self.runtime.settings))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for ``user_config``: at start, and at every ``serve deploy`` that changes only it.
        An unknown key or a bad value fails the deploy with pydantic's message naming the field."""
        self._apply(ReplicaOptions(**user_config))
        self.updates += 1

    def _apply(self, options: ReplicaOptions) -> None:
        self.runtime.settings = self.runtime.settings.model_copy(update=options.model_dump())
        self.batcher.max_batch_size = options.max_batch_size
        self.batcher.wait_s = options.batch_wait_timeout_s

    def _replica(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "loaded_at": self.loaded_at,
            "load_seconds": self.runtime.load_seconds,
            "user_config_updates": self.updates,
            "batches": {"run": self.batcher.batches, "requests": self.batcher.requests},
            "options": ReplicaOptions.of(self.runtime.settings).model_dump(),
        }

    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError:
        return await self.batcher.submit(item)

    async def _predict_batch(self, items: list[PredictItem]) -> list[dict[str, Any] | UploadError]:
        started = time.time()
        results = await asyncio.to_thread(self.runtime.predict_items, items)
        done = time.time()
        for item, result in zip(items, results, strict=True):
            if isinstance(result, dict) and item.sent_at:
                result[TIMING_KEY] = {
                    "queue": started - item.sent_at, "model": done - started, "batch": len(items), "done_at": done
                }  # fmt: skip
        return results

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self.runtime.localize, name, data, threshold=threshold, heatmap=heatmap, method=method
        )

    async def localize_dicom(self, name: str, data: bytes, threshold: float | None, method: str | None) -> bytes:
        return await asyncio.to_thread(self.runtime.localize_dicom, name, data, threshold=threshold, method=method)

    async def preview(self, name: str, data: bytes) -> dict[str, Any]:
        return await asyncio.to_thread(self.runtime.preview, name, data)

    def status(self) -> dict[str, Any]:
        return self.runtime.status()

    def info(self) -> dict[str, Any]:
        return {**self.runtime.info(), "replica": self._replica()}

    def check_health(self) -> None:  # Serve's replica health check
        if not self.runtime.ready:
            raise RuntimeError("model not loaded")


EnsembleModel = serve.deployment(name=MODEL_DEPLOYMENT)(EnsembleReplica)


@serve.ingress()
class EnsembleApp(EnsembleReplica):
    """The whole app in one deployment (``topology="combined"``): the FastAPI app and the members in one replica,
    so an upload crosses one process boundary (proxy to replica) instead of two. Named ``EnsembleModel`` like the
    model deployment of the split topology, so a config file's entry for it (``user_config``, replicas,
    resources) applies to either."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.settings_data = settings

    def __serve_build_asgi_app__(self) -> FastAPI:  # Serve calls it after __init__, on the replica
        return _api(self.settings_data, lambda: LocalBackend(self))


MODEL_DEPLOYMENT_KEYS = ("max_ongoing_requests", "max_queued_requests", "health_check_period_s")


def place_setting(app: dict[str, Any], key: str, value: Any) -> None:
    """Put one ``ServeSettings`` value where a Serve config file keeps it (``app``: one entry of its
    ``applications``): a ``ReplicaOptions`` field in ``EnsembleModel``'s ``user_config``, resources in its
    ``ray_actor_options``, replicas and queue bounds on the deployment, anything else in ``args``."""
    deployments = app.setdefault("deployments", [])
    model = next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT), None)
    if model is None:
        model = {"name": MODEL_DEPLOYMENT}
        deployments.insert(0, model)
    if key in ReplicaOptions.model_fields:
        model.setdefault("user_config", {})[key] = value
    elif key in ("num_cpus", "num_gpus"):
        model.setdefault("ray_actor_options", {})[key] = value
    elif key == "num_replicas":
        model.pop("autoscaling_config", None)
        model["num_replicas"] = value
    elif key == "autoscaling":
        model.pop("num_replicas", None)
        model["autoscaling_config"] = value
    elif key in MODEL_DEPLOYMENT_KEYS:
        model[key] = value
    else:
        app.setdefault("args", {})[key] = value


def check_app_config(app: dict[str, Any]) -> None:
    """Raise (pydantic's message names the key) unless ``app``'s ``args`` are ``ServeSettings`` fields and
    ``EnsembleModel``'s ``user_config`` is ``ReplicaOptions``: the checks a replica would make, made early."""
    ServeSettings(**app.get("args", {}))
    for deployment in app.get("deployments", []):
        if deployment.get("name") == MODEL_DEPLOYMENT and "user_config" in deployment:
            ReplicaOptions(**deployment["user_config"])


class LocalBackend:
    """``api.Backend`` over the model held by this very replica (``topology="combined"``): no handle, no hop."""

    def __init__(self, model: EnsembleReplica) -> None:
        self.model = model

    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError:
        return await self.model.predict(dataclasses.replace(item, sent_at=time.time()))

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await self.model.localize(name, data, threshold, heatmap, method)

    async def localize_dicom(self, name: str, data: bytes, threshold: float | None, method: str | None) -> bytes:
        return await self.model.localize_dicom(name, data, threshold, method)

    async def preview(self, name: str, data: bytes) -> dict[str, Any]:
        return await self.model.preview(name, data)

    async def status(self) -> dict[str, Any]:
        return self.model.status()

    async def info(self) -> dict[str, Any]:
        return self.model.info()


class HandleBackend:
    """``api.Backend`` over the model deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError:
        return await self.handle.predict.remote(dataclasses.replace(item, sent_at=time.time()))

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await self.handle.localize.remote(name, data, threshold, heatmap, method)

    async def localize_dicom(self, name: str, data: bytes, threshold: float | None, method: str | None) -> bytes:
        return await self.handle.localize_dicom.remote(name, data, threshold, method)

    async def preview(self, name: str, data: bytes) -> dict[str, Any]:
        return await self.handle.preview.remote(name, data)

    async def status(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.handle.status.remote(), STATUS_TIMEOUT_S)

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


def asgi_builder(settings: dict[str, Any]) -> Callable[[], FastAPI]:
    """The ingress app's builder for ``serve.ingress``: run on each ingress replica at start, it builds the
    FastAPI app over the handle of this application's model deployment."""

    def build() -> FastAPI:
        return _api(settings, lambda: HandleBackend(serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=_app())))

    return build


def _app() -> str:
    return serve.get_replica_context().app_name


def _api(settings: dict[str, Any], backend: Callable[[], Any]) -> FastAPI:
    """The FastAPI app over ``backend()``, once the bind has been checked against the keys."""
    typed = ServeSettings(**settings)
    keys = load_keys(typed.api_keys_file)  # the file, or $MAMMO_RAY_API_KEYS_FILE on this replica's node
    check_bind(_http_host(), keys, typed.insecure_no_auth)  # beyond loopback without keys: refused
    return build_api(backend(), typed, keys)


def _http_host() -> str:
    """The address Serve's HTTP proxies bind (``http_options.host``), as the controller has it; "0.0.0.0"
    (anywhere: the safe assumption) when it cannot be asked."""
    import ray

    if not ray.is_initialized():  # not in a replica: asking would start a Ray of its own
        return "0.0.0.0"
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
    except Exception:  # noqa: BLE001 - no controller to ask: assume the widest bind
        return "0.0.0.0"
    return str(client.http_config.host) if client is not None else "0.0.0.0"


def build_app(args: dict[str, Any]) -> Any:
    """The app builder (``serve run serve/config.yaml``, ``mammo-ray serve``): typed ``ServeSettings``. The
    deployment options here are the defaults; a config file's ``deployments:`` entries override them."""
    settings = ServeSettings(**args)
    data = settings.model_dump(mode="json")
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": max(settings.max_ongoing_requests, settings.max_batch_size),
        "max_queued_requests": settings.max_queued_requests,
        "health_check_period_s": settings.health_check_period_s,
        "user_config": ReplicaOptions.of(settings).model_dump(),
    }
    if settings.autoscaling:
        model_options["autoscaling_config"] = settings.autoscaling
    else:
        model_options["num_replicas"] = settings.num_replicas
    if settings.topology == "combined":
        return (
            cast(Deployment, serve.deployment(EnsembleApp, name=MODEL_DEPLOYMENT)).options(**model_options).bind(data)
        )
    model = EnsembleModel.options(**model_options).bind(data)
    ingress = cast(Deployment, serve.deployment(serve.ingress(asgi_builder(data))(), name=INGRESS_DEPLOYMENT))
    return ingress.options(
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=4 * settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
    ).bind(model)
