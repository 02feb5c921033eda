"""The HTTP API of the served ensemble (FastAPI, with OpenAPI docs at /docs): predict, localize,
health and model lineage. No Ray here: ``build_api(backend)`` takes any object with the
``Backend`` methods, a Serve deployment handle in ``serve/app.py`` or a runtime in-process.

Every reply is JSON and carries the disclaimer. Bad input never answers 500: it gets the
``UploadError``'s 4xx (400 unreadable, 413 too large, 415 no decoder, 422 wrong fields or ROI),
naming the field and the reason, and the next request is served as usual. Overload answers 503.
Every error is an ``ErrorReply``, the framework's own included (404 no route, 405 wrong method, 400 a
body that does not parse, 415 a body that is no form, 422 a value its schema refuses). The OpenAPI
schema says what the server accepts (``serving.forms``); tests/serving/test_contract.py
holds the served app to it with every schemathesis check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser

from mammo_ray import __version__
from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.auth import OPEN_PATHS, ApiKeys, bearer, load_keys
from mammo_ray.serving.forms import check_form, document_forms, require_form_body
from mammo_ray.serving.replies import (
    ErrorReply,
    HealthReply,
    LocalizeReply,
    PredictReply,
    PreviewReply,
)
from mammo_ray.serving.runtime import TIMING_KEY, ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import (
    UploadError,
    parse_threshold,
    read_capped,
)

log = logging.getLogger(__name__)

PREDICT_FILES = {"file", "cc", "mlo"}
SINGLE_FIELDS = {"file", "box", "seed"}  # one image and its ROI
PAIR_FIELDS = {"cc", "mlo", "cc_box", "cc_seed", "mlo_box", "mlo_seed"}  # a CC+MLO pair and theirs
LOCALIZE_FIELDS = {"file", "threshold", "heatmap", "method"}
PAGE_DIR = Path(__file__).with_name("page")  # the page at / : plain HTML, CSS and JS, no build step, no CDN
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields on top of the upload cap


class Backend(Protocol):
    async def predict(self, item: PredictItem) -> dict[str, Any] | UploadError: ...
    async def localize(
        self, name: str, data: bytes, threshold: float | None, heatmap: str, method: str | None
    ) -> dict[str, Any]: ...
    async def localize_dicom(self, name: str, data: bytes, threshold: float | None, method: str | None) -> bytes: ...
    async def preview(self, name: str, data: bytes) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...
    async def info(self) -> dict[str, Any]: ...


class Overloaded(Exception):
    """The model deployment refused the request (its queue is full): 503."""


# The refusals of the upload routes (predict, localize), each an ErrorReply.
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorReply} for s in (400, 401, 413, 415, 422, 503)}


def _error(
    status: int,
    reason: str,
    field: str | None = None,
    error: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        headers=headers,
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


RETRY_AFTER_S = {"capacity": 1, "replica": 5}  # Retry-After of each 503: a queue drains fast, a replica reloads
# Ray's and Serve's errors for a model replica that died under a request, or cannot be reached: by class
# name (no Ray here), each with what it means for the client.
REPLICA_ERRORS = {
    "ActorDiedError": "died",
    "WorkerCrashedError": "died",
    "NodeDiedError": "died with its node",
    "ActorUnavailableError": "is unreachable",
    "ReplicaUnavailableError": "is unreachable",
    "DeploymentUnavailableError": "is unavailable",
    "RayActorError": "died",  # the base of ActorDiedError and ActorUnavailableError
}


def _replica_lost(exc: BaseException) -> str | None:
    """What happened to the model replica, if ``exc`` or an exception it wraps (Ray's ``cause``, Python's
    ``__cause__`` and ``__context__``) says it died or cannot be reached under the request; else None."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for base in type(current).__mro__:
            if base.__name__ in REPLICA_ERRORS:
                return f"{REPLICA_ERRORS[base.__name__]} ({type(current).__name__})"
        todo += [e for e in (getattr(current, "cause", None), current.__cause__, current.__context__) if e is not None]
    return None


async def _read(upload: UploadFile, field: str, max_bytes: int) -> tuple[str, bytes]:
    return upload.filename or "<upload>", read_capped(
        upload.file, max_bytes=max_bytes, field=field, name=upload.filename or "<upload>"
    )


def keep_uploads_in_memory(max_bytes: int) -> None:
    """Let no upload touch the disk: Starlette spools a form's files to a temporary file beyond
    ``MultiPartParser.spool_max_size`` (1 MB by default, smaller than most mammograms). Raised here to
    the largest body the app accepts (``cap_body`` refuses larger ones first), so an image stays in
    memory from the socket to the model. A class attribute: it only grows, for every app in the process."""
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, int(max_bytes))


def server_timing(arrived: float, called: float, replica: dict[str, float] | None) -> str:
    """The ``Server-Timing`` header of a prediction (milliseconds; browsers' developer tools show it):
    ``ingress`` from the request's arrival at the app to the model call (auth, multipart parsing, checks),
    ``backend`` the model call; from a model replica also ``queue`` (the handle's hop and the batch
    wait), ``model`` (the batch's work, shared by its ``batch`` requests) and ``return`` (the reply's hop
    back); ``total`` the app's time until the reply is built. The proxy's and the network's share is
    what a client measures beyond ``total``."""
    now = time.perf_counter()
    stages = {"ingress": called - arrived, "backend": now - called}
    if replica:
        stages |= {"queue": replica["queue"], "model": replica["model"], "return": time.time() - replica["done_at"]}
    stages["total"] = now - arrived
    parts = [f"{name};dur={max(0.0, seconds) * 1000:.2f}" for name, seconds in stages.items()]
    if replica:
        parts.append(f'batch;desc="{int(replica["batch"])} requests"')
    return ", ".join(parts)


class Gate:
    """The check every request passes first, as plain ASGI (Starlette's ``BaseHTTPMiddleware`` costs about
    0.5 ms a request in task groups and stream wrappers): the API key of a ``/v1/`` route (401), then the
    declared size of the body (413), before any of it is read. It stamps ``state.arrived``, the start of
    the ``Server-Timing`` of /v1/predict."""

    def __init__(self, app: Any, keys: ApiKeys | None, settings: ServeSettings) -> None:
        self.app, self.keys, self.settings = app, keys, settings

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrived"] = time.perf_counter()
        refusal = self.refusal(scope["path"], Headers(scope=scope))
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        if self.keys is not None and path.startswith("/v1/") and path not in OPEN_PATHS:
            if not self.keys.accepts(bearer(headers.get("authorization"))):
                given = (
                    "no Authorization: Bearer header" if not headers.get("authorization") else "a key it does not know"
                )
                return _error(
                    401,
                    f"this server needs an API key: send 'Authorization: Bearer <key>'; the request had {given}",
                    headers={"WWW-Authenticate": 'Bearer realm="mammo-ray"'},
                )
        length, cap = headers.get("content-length"), self.settings.max_bytes
        if length and length.isdigit() and int(length) > cap + FORM_OVERHEAD:
            return _error(
                413,
                f"request body of {int(length)} bytes exceeds the upload cap of {cap} bytes "
                f"({self.settings.max_upload_mb:g} MB)",
            )
        return None


def build_api(backend: Backend, settings: ServeSettings, keys: ApiKeys | None = None) -> FastAPI:
    """The FastAPI app over ``backend``; ``settings`` gives the upload cap and the API keys' file (or
    ``$MAMMO_RAY_API_KEYS_FILE``; ``keys`` given: these). With keys, every ``/v1/`` route but
    ``/v1/health`` answers 401 without ``Authorization: Bearer <key>``. The page's files (``/``,
    ``/page/``) hold no data and stay open: the page asks for a key and sends it with every call."""
    keys = keys if keys is not None else load_keys(settings.api_keys_file)
    keep_uploads_in_memory(settings.max_bytes + FORM_OVERHEAD)
    app = FastAPI(
        title="mammo-ray",
        version=__version__,
        description=f"Mammogram lesion classification and mass localization by a CNN ensemble. **{DISCLAIMER}**",
    )

    app.add_middleware(Gate, keys=keys, settings=settings)

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(422, f"{first.get('msg', 'invalid request')}", field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # The framework's own refusals (FastAPI's HTTPException is this one's subclass).
        path = request.url.path
        if exc.status_code == 404:
            reason = f"{path} is not a route of this API (see /docs)"
        elif exc.status_code == 405:
            reason = f"{request.method} is not allowed on {path}; allowed: {(exc.headers or {}).get('Allow', '')}"
        elif exc.status_code == 400:
            reason = f"the request body cannot be read as its Content-Type says: {exc.detail}"
        else:
            reason = str(exc.detail)
        return _error(exc.status_code, reason, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A fault of the server, never of the input (that gets its 4xx); Starlette re-raises it to be logged.
        return _error(500, f"{type(exc).__name__}: {exc}", error="Internal Server Error")

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
                return _error(
                    503,
                    "the model is at capacity; retry shortly",
                    error="Service Unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S["capacity"])},
                )
            lost = _replica_lost(exc)
            if lost:  # Serve starts a new replica; this request's answer is gone with the old one
                log.warning("the model replica %s under a request", lost)
                return _error(
                    503,
                    f"the model replica serving this request {lost}; Serve is replacing it: retry",
                    error="Service Unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S["replica"])},
                )
            log.exception("backend call failed")
            return _error(500, f"{type(inner).__name__}: {inner}", error="Internal Server Error")

    @app.post(
        "/v1/predict",
        response_model=PredictReply,
        responses=ERRORS,
        dependencies=[Depends(require_form_body)],
        summary="Malignancy probability of one image, or of a CC+MLO pair",
    )
    async def predict(
        request: Request,
        response: Response,
        file: UploadFile | None = File(None),  # the fields as PREDICT_FORM documents them
        cc: UploadFile | None = File(None),
        mlo: UploadFile | None = File(None),
        box: str | None = Form(None),
        seed: str | None = Form(None),
        cc_box: str | None = Form(None),
        cc_seed: str | None = Form(None),
        mlo_box: str | None = Form(None),
        mlo_seed: str | None = Form(None),
    ) -> Any:
        form = await request.form()
        check_form(form, SINGLE_FIELDS | PAIR_FIELDS, set(), PREDICT_FILES)
        given = set(form.keys())
        if "file" in given and given & {"cc", "mlo"}:
            raise UploadError(422, "send either 'file' or the pair 'cc' and 'mlo', not both", "file")
        if "file" not in given and not {"cc", "mlo"} <= given:
            missing = "file" if not given & {"cc", "mlo"} else ("mlo" if "mlo" not in given else "cc")
            raise UploadError(422, f"missing required form field {missing!r} (send 'file', or 'cc' and 'mlo')", missing)
        stray = sorted(given - (SINGLE_FIELDS if "file" in given else PAIR_FIELDS))
        if stray:
            takes = (
                "'file' takes 'box' or 'seed'" if "file" in given else "a pair takes cc_box/cc_seed, mlo_box/mlo_seed"
            )
            raise UploadError(422, f"{stray[0]!r} does not go with the image(s) sent: {takes}", stray[0])
        files = {
            name: await _read(up, name, settings.max_bytes)
            for name, up in (("file", file), ("cc", cc), ("mlo", mlo))
            if up is not None
        }
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
        called = time.perf_counter()
        result = await _call(backend.predict(PredictItem(files=files, rois=rois)))
        if isinstance(result, UploadError):
            raise result
        if isinstance(result, dict):
            timing = result.pop(TIMING_KEY, None)
            response.headers["Server-Timing"] = server_timing(request.state.arrived, called, timing)
        return result

    @app.post(
        "/v1/localize",
        response_model=LocalizeReply,
        response_model_exclude_unset=True,
        responses={
            **ERRORS,
            200: {
                "description": "format=json: the boxes and the heatmap as JSON. format=dicom (a DICOM upload "
                "only): a zip of <stem>_sr.dcm (TID 1500 SR: each box a planar ROI with its score, "
                "referencing the upload's Study, Series and SOP Instance UIDs), <stem>_seg.dcm (FRACTIONAL "
                "SEG of the map on the upload's pixel grid) and <stem>_boxes.json. " + DISCLAIMER,
                "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
        dependencies=[Depends(require_form_body)],
        summary="Heatmap and boxes of a whole mammogram (original pixel coordinates): the dense map of a "
        "patch classifier, or the CAM / Grad-CAM of a crop classifier; as JSON, or as DICOM SR + SEG",
    )
    async def localize(
        request: Request,
        file: UploadFile = File(...),  # the fields as LOCALIZE_FORM documents them
        threshold: str | None = Form(None),
        heatmap: Literal["png", "array", "both", "layers", "none"] = Form("png"),
        method: Literal["dense", "cam", "gradcam"] | None = Form(None),
        format: Literal["json", "dicom"] = Query("json", description="json, or dicom: a zip of the SR and SEG"),
    ) -> Any:
        form = await request.form()
        check_form(form, LOCALIZE_FIELDS, {"file"}, {"file"})
        name, data = await _read(file, "file", settings.max_bytes)
        if format == "dicom":
            archive = await _call(backend.localize_dicom(name, data, parse_threshold(threshold), method))
            if isinstance(archive, Response):  # an error reply
                return archive
            stem = Path(name).stem or "image"
            return Response(
                archive,
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="{stem}_dicom.zip"', "X-Disclaimer": DISCLAIMER},
            )
        return await _call(backend.localize(name, data, parse_threshold(threshold), heatmap, method))

    @app.post(
        "/v1/preview",
        response_model=PreviewReply,
        responses=ERRORS,
        dependencies=[Depends(require_form_body)],
        summary="The upload as an 8-bit PNG in its stored orientation (what the page shows and draws ROIs on)",
    )
    async def preview(request: Request, file: UploadFile = File(...)) -> Any:
        form = await request.form()
        check_form(form, {"file"}, {"file"}, {"file"})
        name, data = await _read(file, "file", settings.max_bytes)
        return await _call(backend.preview(name, data))

    @app.get("/", response_class=HTMLResponse, summary="The page: upload a CC and an MLO, see the ensemble's answer")
    async def page() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")

    @app.get(
        "/v1/health",
        response_model=HealthReply,
        responses={503: {"model": HealthReply}},
        summary="ready (200) once the models are loaded and warmed, else 503",
    )
    async def health() -> Any:
        try:
            status = await asyncio.wait_for(backend.status(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not up yet (or gone): not ready
            return JSONResponse(
                status_code=503, content={"status": "loading", "reason": type(exc).__name__, "disclaimer": DISCLAIMER}
            )
        ready = status.get("status") == "ready"
        return JSONResponse(status_code=200 if ready else 503, content={**status, "disclaimer": DISCLAIMER})

    @app.get(
        "/v1/model",
        responses={401: {"model": ErrorReply}, 503: {"model": ErrorReply}},
        summary="Version, members with their MLflow runs, config, metrics, execution",
    )
    async def model_info() -> Any:
        return await _call(backend.info())

    derived = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_forms(derived())  # derived() caches its schema in app.openapi_schema
        return derived()

    def secured() -> dict[str, Any]:
        spec = openapi()
        if keys is not None and "bearer" not in spec["components"].get("securitySchemes", {}):
            spec["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
            for path, item in spec["paths"].items():
                if path.startswith("/v1/") and path not in OPEN_PATHS:
                    for operation in item.values():
                        operation["security"] = [{"bearer": []}]
        return spec

    app.openapi = secured  # type: ignore[method-assign]
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

    async def localize_dicom(self, name: str, data: bytes, threshold: float | None, method: str | None) -> bytes:
        return await asyncio.to_thread(self._ready().localize_dicom, name, data, threshold=threshold, method=method)

    async def preview(self, name: str, data: bytes) -> dict[str, Any]:
        return await asyncio.to_thread(self._ready().preview, name, data)

    async def status(self) -> dict[str, Any]:
        if self.runtime is None:
            return {"status": "failed" if self.error else "loading", "reason": repr(self.error) if self.error else None}
        return self.runtime.status()

    async def info(self) -> dict[str, Any]:
        return self._ready().info()
