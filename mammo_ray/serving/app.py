"""The Ray Serve app: the ensemble behind a FastAPI ingress (predict, localize, health, model).

    serve run serve.app:build_app model=models:/mammo-ray-ensemble@champion        # or: serve run serve/config.yaml
    (serve/app.py re-exports this module's build_app for `serve run` from the repository root)
    mammo-ray serve --model models:/mammo-ray-ensemble@champion [--host 127.0.0.1] [--port 8000]

Two deployments. ``EnsembleModel`` loads the members once per replica in ``__init__`` (from a
checkpoint, a run or a registered version), measures loop against stacked execution on its own
device, warms up, and answers ``@serve.batch``-ed predictions and localizations (dense maps of
patch classifiers, CAM or Grad-CAM of crop classifiers).
``Ingress`` parses and checks uploads (``mammo_ray.serving.api``) and calls the model through
its handle. ``max_ongoing_requests`` and ``max_queued_requests`` bound both, so overload
answers 503 instead of piling up. HTTP binds 127.0.0.1 unless told otherwise.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from ray import serve
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle

from mammo_ray.serving.api import build_api
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import UploadError

STATUS_TIMEOUT_S = 3.0


@serve.deployment
class EnsembleModel:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.runtime = ModelRuntime(settings)  # loads, chooses loop/stacked, warms: once per replica
        s = self.runtime.settings
        # @serve.batch's wrapper has these setters; its type annotation does not say so
        self.predict.set_max_batch_size(s.max_batch_size)  # type: ignore[attr-defined]
        self.predict.set_batch_wait_timeout_s(s.batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[PredictItem]) -> list[dict[str, Any] | UploadError]:
        return await asyncio.to_thread(self.runtime.predict_items, items)

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self.runtime.localize, name, data, threshold=threshold, heatmap=heatmap, method=method
        )

    def status(self) -> dict[str, Any]:
        return self.runtime.status()

    def info(self) -> dict[str, Any]:
        return self.runtime.info()

    def check_health(self) -> None:  # Serve's replica health check
        if not self.runtime.ready:
            raise RuntimeError("model not loaded")


class HandleBackend:
    """``api.Backend`` over the model deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError:
        return await self.handle.predict.remote(item)

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await self.handle.localize.remote(name, data, threshold, heatmap, method)

    async def status(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.handle.status.remote(), STATUS_TIMEOUT_S)

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.backend = HandleBackend(model)
        self.settings = ServeSettings(**settings)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.backend, self.settings)


def build_app(args: dict[str, Any]) -> Any:
    """The app builder (``serve run serve.app:build_app model=...``): typed ``ServeSettings``."""
    settings = ServeSettings(**args)
    data = settings.model_dump(mode="json")
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": max(settings.max_ongoing_requests, settings.max_batch_size),
        "max_queued_requests": settings.max_queued_requests,
        "health_check_period_s": settings.health_check_period_s,
    }
    if settings.autoscaling:
        model_options["autoscaling_config"] = settings.autoscaling
    else:
        model_options["num_replicas"] = settings.num_replicas
    # @serve.deployment made both classes Deployments; type checkers still see the classes
    model = cast(Deployment, EnsembleModel).options(**model_options).bind(data)
    ingress = cast(Deployment, Ingress).options(
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=4 * settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
    )
    return ingress.bind(model, data)
