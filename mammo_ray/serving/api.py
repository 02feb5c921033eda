"""The HTTP API of the served ensemble (FastAPI, with OpenAPI docs at /docs): predict, localize,
health and model lineage. No Ray here: ``build_api(backend)`` takes any object with the
``Backend`` methods, a Serve deployment handle in ``serve/app.py`` or a runtime in-process.

Every reply is JSON and carries the disclaimer. Bad input never answers 500: it gets the
``UploadError``'s 4xx (400 unreadable, 413 too large, 415 no decoder, 422 wrong fields or ROI),
naming the field and the reason, and the next request is served as usual. Overload answers 503.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, Literal, Protocol

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mammo_ray import __version__
from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import UploadError, check_fields, read_capped

log = logging.getLogger(__name__)

PREDICT_FILES = {"file", "cc", "mlo"}
PREDICT_ROIS = {"box", "seed", "cc_box", "cc_seed", "mlo_box", "mlo_seed"}
LOCALIZE_FIELDS = {"file", "threshold", "heatmap", "method"}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields on top of the upload cap


class Backend(Protocol):
    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError: ...
    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None
    ) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...
    async def info(self) -> dict[str, Any]: ...


class Overloaded(Exception):
    """The model deployment refused the request (its queue is full): 503."""


class MemberSummary(BaseModel):
    count: int
    mean: float
    std: float
    quantiles: dict[str, float]


class PredictReply(BaseModel):
    probability: float  # P(class 1): malignancy for the pathology task; mean over members (and CC, MLO)
    label: str  # the class at `threshold`: malignant / benign (mass / no_mass, calcification / mass)
    threshold: float
    task: str
    members: MemberSummary
    views: dict[str, float]  # per-view probabilities
    model_version: str
    disclaimer: str


class Box(BaseModel):
    x0: int  # left edge (inclusive), original pixels of the stored image
    y0: int  # top edge (inclusive)
    x1: int  # right edge (exclusive)
    y1: int  # bottom edge (exclusive)
    score: float  # the map's maximum inside the blob
    area: float  # blob size in original pixels


class LocalizeReply(BaseModel):
    method: Literal["dense", "cam", "gradcam"]  # how the map was made: the model's default or the `method` field
    map_values: str  # what the map's numbers are (a probability for dense, a relative activation for cam/gradcam)
    boxes: list[Box]  # blobs of the map >= `threshold`, highest score first
    image_score: float
    image_score_means: str  # dense: the map's maximum; cam/gradcam: the members' mean P(class 1) of the image
    threshold: float
    image_size: list[int]  # (H, W) of the upload
    map_shape: list[int]  # (h, w) of the map grid
    map_stride_px: float  # original pixels per map cell
    window_px: int | None  # dense: the patch side in original pixels; None for cam/gradcam
    max_spread: float  # largest member std of the map (0 for one member)
    heatmap_png_base64: str | None = None  # heatmap=png|both: the overlay with the boxes
    heatmap_array: list[list[float]] | None = None  # heatmap=array|both: the map grid, stored orientation
    heatmap_array_geometry: dict[str, Any] | None = None  # cell_px and offset_px of heatmap_array
    model_version: str
    disclaimer: str


class ErrorReply(BaseModel):
    error: str
    field: str | None = None
    reason: str
    status: int
    disclaimer: str = DISCLAIMER


def _error(status: int, reason: str, field: str | None = None, error: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": error or HTTPStatus(status).phrase,
            "field": field,
            "reason": reason,
            "status": status,
            "disclaimer": DISCLAIMER,
        },
    )


def _unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (``RayTaskError.cause``), if any."""
    for _ in range(5):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


def _is_backpressure(exc: BaseException) -> bool:
    return type(exc).__name__ in ("BackPressureError", "Overloaded") or isinstance(exc, Overloaded)


async def _read(upload: UploadFile, field: str, max_bytes: int) -> tuple[str, bytes]:
    return upload.filename or "<upload>", read_capped(
        upload.file, max_bytes=max_bytes, field=field, name=upload.filename or "<upload>"
    )


def build_api(backend: Backend, settings: ServeSettings) -> FastAPI:
    """The FastAPI app over ``backend``; ``settings`` gives the upload cap."""
    app = FastAPI(
        title="mammo-ray",
        version=__version__,
        description=f"Mammogram lesion classification and mass localization by a CNN ensemble. **{DISCLAIMER}**",
    )

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_bytes + FORM_OVERHEAD:
            return _error(
                413,
                f"request body of {int(length)} bytes exceeds the upload cap of "
                f"{settings.max_bytes} bytes ({settings.max_upload_mb:g} MB)",
            )
        return await call_next(request)

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(422, f"{first.get('msg', 'invalid request')}", field)

    async def _call(coro: Any) -> Any:
        try:
            return await coro
        except UploadError:
            raise
        except Exception as exc:
            inner = _unwrap(exc)
            if isinstance(inner, UploadError):
                raise inner from None
            if _is_backpressure(exc) or _is_backpressure(inner):
                return _error(503, "the model is at capacity; retry shortly", error="Service Unavailable")
            log.exception("backend call failed")
            return _error(500, f"{type(inner).__name__}: {inner}", error="Internal Server Error")

    @app.post(
        "/v1/predict",
        response_model=PredictReply,
        responses={
            400: {"model": ErrorReply},
            413: {"model": ErrorReply},
            415: {"model": ErrorReply},
            422: {"model": ErrorReply},
            503: {"model": ErrorReply},
        },
        summary="Malignancy probability of one image, or of a CC+MLO pair",
    )
    async def predict(
        request: Request,
        file: UploadFile | None = File(None, description="one DICOM, PNG or TIFF"),
        cc: UploadFile | None = File(None, description="the CC view of a pair"),
        mlo: UploadFile | None = File(None, description="the MLO view of a pair"),
        box: str | None = Form(None, description="ROI x0,y0,x1,y1 in pixels of `file`"),
        seed: str | None = Form(None, description="ROI seed point x,y in pixels of `file`"),
        cc_box: str | None = Form(None),
        cc_seed: str | None = Form(None),
        mlo_box: str | None = Form(None),
        mlo_seed: str | None = Form(None),
    ) -> Any:
        form = await request.form()
        given = list(form.keys())
        check_fields(given, PREDICT_FILES | PREDICT_ROIS, set())
        if file is not None and (cc is not None or mlo is not None):
            raise UploadError(422, "send either 'file' or the pair 'cc' and 'mlo', not both", "file")
        uploads: dict[str, UploadFile]
        if file is not None:
            uploads = {"file": file}
        elif cc is not None and mlo is not None:
            uploads = {"cc": cc, "mlo": mlo}
        else:
            missing = "file" if cc is None and mlo is None else ("mlo" if mlo is None else "cc")
            raise UploadError(422, f"missing required form field {missing!r} (send 'file', or 'cc' and 'mlo')", missing)
        files = {name: await _read(up, name, settings.max_bytes) for name, up in uploads.items()}
        rois = {
            k: v
            for k, v in {
                "box": box,
                "seed": seed,
                "cc_box": cc_box,
                "cc_seed": cc_seed,
                "mlo_box": mlo_box,
                "mlo_seed": mlo_seed,
            }.items()
            if v
        }
        result = await _call(backend.predict(PredictItem(files=files, rois=rois)))
        if isinstance(result, UploadError):
            raise result
        return result

    @app.post(
        "/v1/localize",
        response_model=LocalizeReply,
        response_model_exclude_unset=True,
        responses={
            400: {"model": ErrorReply},
            413: {"model": ErrorReply},
            422: {"model": ErrorReply},
            503: {"model": ErrorReply},
        },
        summary="Heatmap and boxes of a whole mammogram (original pixel coordinates): the dense map of a "
        "patch classifier, or the CAM / Grad-CAM of a crop classifier",
    )
    async def localize(
        request: Request,
        file: UploadFile = File(..., description="a whole mammogram"),
        threshold: float | None = Form(None, ge=0, le=1, description="box threshold"),
        heatmap: Literal["png", "array", "both", "none"] = Form("png"),
        method: Literal["dense", "cam", "gradcam"] | None = Form(
            None,
            description="dense (patch classifiers), cam (GAP+FC backbones) or gradcam (any); "
            "default: dense for patch classifiers, else cam, else gradcam. "
            "One the model cannot do answers 422 with the reason",
        ),
    ) -> Any:
        form = await request.form()
        check_fields(list(form.keys()), LOCALIZE_FIELDS, {"file"})
        name, data = await _read(file, "file", settings.max_bytes)
        return await _call(backend.localize(name, data, threshold, heatmap, method))

    @app.get("/v1/health", summary="ready (200) once the models are loaded and warmed, else 503")
    async def health() -> Any:
        try:
            status = await asyncio.wait_for(backend.status(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not up yet (or gone): not ready
            return JSONResponse(
                status_code=503, content={"status": "loading", "reason": type(exc).__name__, "disclaimer": DISCLAIMER}
            )
        ready = status.get("status") == "ready"
        return JSONResponse(status_code=200 if ready else 503, content={**status, "disclaimer": DISCLAIMER})

    @app.get("/v1/model", summary="Version, members with their MLflow runs, config, metrics, execution")
    async def model_info() -> Any:
        return await _call(backend.info())

    return app


class RuntimeBackend:
    """A ``Backend`` over a ``ModelRuntime`` in this process (tests, ``mammo-ray serve --no-ray``
    style use). ``load()`` builds the runtime in a thread; until it finishes, health says loading
    and the other routes answer 503."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.error: BaseException | None = None

    async def load(self) -> None:
        try:
            self.runtime = await asyncio.to_thread(ModelRuntime, self.settings)
        except Exception as exc:
            self.error = exc
            raise

    def _ready(self) -> Any:
        if self.runtime is None:
            raise Overloaded("the model is still loading")
        return self.runtime

    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError:
        return (await asyncio.to_thread(self._ready().predict_items, [item]))[0]

    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self._ready().localize, name, data, threshold=threshold, heatmap=heatmap, method=method
        )

    async def status(self) -> dict[str, Any]:
        if self.runtime is None:
            return {"status": "failed" if self.error else "loading", "reason": repr(self.error) if self.error else None}
        return self.runtime.status()

    async def info(self) -> dict[str, Any]:
        return self._ready().info()
