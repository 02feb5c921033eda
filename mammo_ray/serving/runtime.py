"""The served ensemble, without Ray: load, choose the execution, warm, predict, localize, describe.

``ModelRuntime`` is what one Serve replica holds (``serving/app.py`` wraps it in a deployment that batches
requests with ``serving/batching.py``); the tests use it in-process. Every input goes through the same steps as the
offline evaluation: the upload is decoded by the one image decoder every entry point uses
(``data.images.read_image``, as ``mammo-ray localize`` reads files), the ROI is cropped as the crop
cache crops it (``data.roi``), and the eval transform stored in the checkpoint does the rest, so a
served probability equals ``mammo-ray evaluate``'s for the same lesion.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from mlflow import MlflowClient
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mammo_ray.constants import CLASS_NAMES, DISCLAIMER, Task
from mammo_ray.data.images import DecodedImage
from mammo_ray.data.roi import roi_crop
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.decisions.policy import DecisionPolicy
from mammo_ray.decisions.referral import member_uncertainty
from mammo_ray.ensemble.execution import choose_execution
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.ensemble.source import ModelSource, resolve_model_source
from mammo_ray.localize.methods import default_method, localize, map_label, method_reasons
from mammo_ray.localize.render import grayscale_png, overlay_base64
from mammo_ray.localize.whole_image import Localization
from mammo_ray.serving.uploads import (
    DEFAULT_MAX_UPLOAD_BYTES,
    UploadError,
    check_in_bounds,
    decode_upload,
    parse_box,
    parse_point,
)
from mammo_ray.train.checkpoint import checkpoint_file, load_checkpoint
from mammo_ray.workdir import resolve_workdir

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# A model replica's timing of one prediction, added to its reply and taken out by the ingress for its
# Server-Timing header: {"queue": s from the ingress's hand-over to the batch's start (the handle hop and
# the batch wait), "model": s of the batch's work, "batch": requests in the batch, "done_at": time.time()}.
TIMING_KEY = "_timing"


class ServeSettings(BaseModel):
    """The app builder's typed arguments (``serve/config.yaml``'s ``args``, or ``mammo-ray serve``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str  # checkpoint file or folder, MLflow run id, models:/<name>/<version> or models:/<name>@<alias>
    tracking_uri: str | None = None  # MLflow store of `model` (default: as `train` uses)
    workdir: str | None = None  # where registered models are downloaded (default: $MAMMO_RAY_WORKDIR or ./work)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica has a GPU
    execution: Literal["auto", "loop", "stacked"] = "auto"  # auto: measured on the replica's device
    max_batch_size: int = Field(8, ge=1)  # requests combined into one forward pass (serving/batching.py)
    # How long an idle model waits for a batch to fill after its first request. 0: a lone request never waits,
    # and a busy replica still batches: the requests that arrived while it worked run together next
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_upload_mb: float = Field(DEFAULT_MAX_UPLOAD_BYTES / 2**20, gt=0)  # larger uploads answer 413
    max_dim: int = Field(10_000, ge=64)  # images with more rows or columns answer 413 (from the header)
    threshold: float = Field(0.5, ge=0, le=1)  # `label` is malignant at or above this probability
    localize_threshold: float = Field(0.5, ge=0, le=1)  # default box threshold of /v1/localize
    localize_tile: int = Field(1024, ge=0)  # dense-map tile side (px); 0: one pass
    localize_long_side: int | None = Field(None, ge=8)  # cam/gradcam: image long side (network px); None: by crop
    roi_default: Literal["whole", "center"] = "whole"  # without a box or seed: the whole image or its centre
    # split: a FastAPI ingress deployment calls the model deployment through its handle, and answers 503 with
    # Retry-After when a model replica dies under a request. combined: one deployment holds both, so an upload
    # crosses one process boundary, not two; a replica's death is then answered by the proxy: `mammo-ray serve
    # --haproxy` makes that a 503 with Retry-After (serving/haproxy.py), Serve's Python proxy a 500.
    topology: Literal["split", "combined"] = "split"
    num_replicas: int = Field(1, ge=1)  # replicas of the model (ignored with autoscaling)
    autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}
    num_cpus: float = Field(1.0, ge=0)  # CPUs per model replica
    num_gpus: float = Field(0.0, ge=0)  # GPU fraction per model replica (e.g. 0.25)
    max_ongoing_requests: int = Field(16, ge=1)  # per replica; must be >= max_batch_size for full batches
    max_queued_requests: int = Field(64, ge=1)  # beyond this the app answers 503 instead of queueing
    health_check_period_s: float = Field(10.0, gt=0)
    mlflow_ui_url: str | None = None  # the MLflow UI (e.g. http://127.0.0.1:5000): the page links the model's run there
    api_keys_file: str | None = None  # bearer keys, one per line (default: $MAMMO_RAY_API_KEYS_FILE; serving/auth.py)
    insecure_no_auth: bool = False  # serve beyond loopback without keys (refused otherwise), with a warning

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class PredictItem:
    """One /v1/predict request (or one ``Predictor.predict`` call): images by field ("file", or "cc" and
    "mlo") and ROI texts by field. An image is its file's bytes, decoded here, or already decoded
    (``mammo_ray.load``'s paths and arrays)."""

    files: Mapping[str, tuple[str, bytes | DecodedImage]]  # field -> (file name, bytes or decoded image)
    rois: dict[str, str] = field(default_factory=dict)  # "box", "seed", "cc_box", "mlo_seed", ...
    sent_at: float = 0.0  # time.time() when the ingress handed it to the model (0: untimed); see TIMING_KEY


class MemberGuard:
    """Who may use the members at once. Grad-CAM hooks their layers for the length of one request, and
    a hook fires on every forward pass, whoever runs it: so Grad-CAM runs alone (``exclusive``), while
    predictions, dense maps and CAM (no hooks) overlap freely (``shared``). A waiting Grad-CAM holds
    back new shared users, so a stream of predictions cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = self._waiting = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not (self._exclusive or self._waiting))
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not (self._exclusive or self._shared))
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class ModelRuntime:
    """The ensemble of one replica, loaded, measured and warmed in ``__init__``.

    ``source`` skips resolving ``settings.model`` (``from_checkpoints`` passes the files it was given).
    """

    def __init__(self, settings: ServeSettings | dict[str, Any], source: ModelSource | None = None) -> None:
        started = time.perf_counter()
        self.settings = s = settings if isinstance(settings, ServeSettings) else ServeSettings(**settings)
        if source is None:
            source = resolve_model_source(s.model, resolve_workdir(s.workdir), tracking_uri=s.tracking_uri)
        self.source = source
        self.device = _device(s.device)
        ensemble = Ensemble.from_checkpoints(self.source.checkpoints, self.device)
        self.spec, self.config, self.view_mode = ensemble.spec, ensemble.config, ensemble.view_mode
        self.members = list(ensemble.members)  # the localizer scans member by member
        self.transform = build_eval_transform(self.spec)
        self.class_names = CLASS_NAMES[Task.parse(self.config.data.task)]  # (class 0, class 1): benign, malignant
        example = self._example(s.max_batch_size)
        self.module, self.execution = choose_execution(ensemble, example, mode=s.execution)
        with torch.inference_mode():
            self.module(example)  # warm: the first call pays for allocation and kernel selection
        self.guard = MemberGuard()  # Grad-CAM hooks the members' layers: nothing else runs them meanwhile
        self.localize_reasons, self.localize_method = self._check_localizable()
        self.policy, self.policy_note = self._policy()
        self.localizable = self.localize_method is not None
        self.load_seconds = time.perf_counter() - started
        self.ready = True

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | Path],
        settings: ServeSettings | dict[str, Any],
        *,
        decisions: dict[str, Any] | None = None,
    ) -> ModelRuntime:
        """The runtime of member checkpoints already on this machine (files or folders, in member order),
        such as an MLflow model's artifacts: no lookup, no MLflow store. ``settings.model`` only names
        them (``info()``'s ``source.spec``); ``decisions`` is the ensemble's stored decision policy."""
        s = settings if isinstance(settings, ServeSettings) else ServeSettings(**settings)
        files = [checkpoint_file(p) for p in paths]
        return cls(s, ModelSource(s.model, "checkpoint", files, registered_decisions=decisions))

    # ------------------------------------------------------------------ setup

    def _example(self, batch: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(np.full((self.spec.cache_px,) * 2, 1000, np.uint16))
        x = x.unsqueeze(0).repeat(batch, 1, 1, 1).to(self.device)
        return (x, x.clone()) if self.view_mode == "multimodal" else x

    def _check_localizable(self) -> tuple[dict[str, str], str | None]:
        """Per localization method, why this model cannot use it ("" if it can), and its default method."""
        reasons = method_reasons(self.members, self.config, self.spec)
        return reasons, default_method(self.config, reasons)

    def _policy(self) -> tuple[DecisionPolicy | None, str]:
        """The model's decision policy (calibration, operating thresholds, referral), and a note on it."""
        stored = self.source.decisions()
        if stored is None:
            return None, (
                "this model has no decision policy: no calibration, operating points or referral "
                "(train or register it with this mammo-ray version, which fits them on its val split)"
            )
        policy = DecisionPolicy.from_dict(stored)
        if policy.members != len(self.members):
            return (
                None,
                f"the stored decision policy is for {policy.members} member(s), the model has {len(self.members)}",
            )
        return policy, f"{policy.calibration.method} calibration and thresholds fitted on the val split"

    @property
    def localize_note(self) -> str:
        if self.localize_method is None:
            return self.localize_reasons["dense"]
        notes = {
            "dense": "dense map of the patch classifier (paper 003)",
            "cam": "class activation map of the whole image (paper 004)",
            "gradcam": "Grad-CAM of the whole image (CAM is not defined for this head)",
        }
        return f"default method {self.localize_method}: {notes[self.localize_method]}"

    # ------------------------------------------------------------------ predict

    def decode(self, name: str, data: bytes | DecodedImage, field: str) -> DecodedImage:
        """An upload's bytes decoded under this app's caps (an ``UploadError`` when they are bad)."""
        if isinstance(data, DecodedImage):
            return data
        return decode_upload(
            data, name=name, field=field, max_bytes=self.settings.max_bytes, max_dim=self.settings.max_dim
        )

    def view_tensor(
        self, name: str, data: bytes | DecodedImage, rois: Mapping[str, str | None], prefix: str = ""
    ) -> tuple[torch.Tensor, str]:
        """One view as the members' input (C, H, W): decoded, its ROI (``rois[prefix + "box"]`` or
        ``[prefix + "seed"]``, the form's text) cropped as the crop cache crops, and the checkpoint's
        eval transform applied; with the view's name (the DICOM's CC/MLO, else the field's)."""
        field = prefix.rstrip("_") or "file"
        decoded = self.decode(name, data, field)
        box = parse_box(rois.get(f"{prefix}box"), f"{prefix}box")
        seed = parse_point(rois.get(f"{prefix}seed"), f"{prefix}seed")
        check_in_bounds(box, decoded.shape, f"{prefix}box")
        check_in_bounds(seed, decoded.shape, f"{prefix}seed")
        crop = roi_crop(
            decoded.image,
            self.config.data,
            box=box,
            seed=seed,
            flipped=decoded.flipped,
            default=self.settings.roi_default,
        )
        view = decoded.view.value if decoded.view is not None else field.upper()
        return self.transform(crop), view

    def _inputs(self, item: PredictItem) -> tuple[list[torch.Tensor], list[str]]:
        if "file" in item.files:
            name, data = item.files["file"]
            x, view = self.view_tensor(name, data, item.rois, "")
            if self.view_mode == "multimodal":
                raise UploadError(422, "this multimodal model needs a CC+MLO pair: send fields 'cc' and 'mlo'", "file")
            return [x], [view if view in ("CC", "MLO") else "image"]
        tensors, views = [], []
        for prefix in ("cc", "mlo"):
            name, data = item.files[prefix]
            x, _ = self.view_tensor(name, data, item.rois, f"{prefix}_")
            tensors.append(x)
            views.append(prefix.upper())
        return tensors, views

    def predict_items(self, items: list[PredictItem]) -> list[dict[str, Any] | UploadError]:
        """One forward pass for every request of a batch; a bad request gets its UploadError back
        (returned, not raised, so the rest of the batch is answered)."""
        prepared: list[tuple[list[torch.Tensor], list[str]] | UploadError] = []
        for item in items:
            try:
                prepared.append(self._inputs(item))
            except UploadError as exc:
                prepared.append(exc)
        good = [p for p in prepared if not isinstance(p, UploadError)]
        probs = self._forward(good) if good else []
        out: list[dict[str, Any] | UploadError] = []
        k = 0
        for p in prepared:
            if isinstance(p, UploadError):
                out.append(p)
            else:
                out.append(self._response(probs[k], p[1]))
                k += 1
        return out

    def _forward(self, good: list[tuple[list[torch.Tensor], list[str]]]) -> list[np.ndarray]:
        """Per request: (views, members) probabilities of class 1."""
        with self.guard.shared(), torch.inference_mode():
            if self.view_mode == "multimodal":
                cc = torch.stack([t[0] for t, _ in good]).to(self.device)
                mlo = torch.stack([t[1] for t, _ in good]).to(self.device)
                probs = self.module((cc, mlo)).float().cpu().numpy()  # (N, M): one joint view
                return [row[None] for row in probs]
            flat = torch.stack([x for tensors, _ in good for x in tensors]).to(self.device)
            probs = self.module(flat).float().cpu().numpy()  # (total views, M)
        out, k = [], 0
        for tensors, _ in good:
            out.append(probs[k : k + len(tensors)])
            k += len(tensors)
        return out

    def _response(self, probs: np.ndarray, views: list[str]) -> dict[str, Any]:
        members = probs.mean(axis=0).astype(np.float64)  # per member: CC and MLO averaged (paper 000)
        p = float(members.mean())
        by_view = {}
        if self.view_mode != "multimodal":
            by_view = {view: float(probs[i].mean()) for i, view in enumerate(views)}
        uncertainty = member_uncertainty(members[None, :]).row(0)
        calibrated, refer, points = None, {"refer": None, "reason": self.policy_note}, []
        if self.policy is not None:
            calibrated = float(self.policy.calibration(np.array([p]))[0])
            refer = self.policy.refer(uncertainty)
            points = [
                {"name": o.name, "threshold": o.threshold, "label": self.class_names[int(calibrated >= o.threshold)]}
                for o in self.policy.operating_points
            ]
        return {
            "probability": p,
            "calibrated_probability": calibrated,
            "label": self.class_names[int(p >= self.settings.threshold)],
            "threshold": self.settings.threshold,
            "task": self.config.data.task,
            "members": {
                "count": int(members.size),
                "mean": p,
                "std": float(members.std()),
                "quantiles": {f"q{round(q * 100):02d}": float(np.quantile(members, q)) for q in QUANTILES},
                "probabilities": [round(float(m), 6) for m in members],  # per member, in member order
            },
            "uncertainty": uncertainty,
            "refer": refer,
            "operating_points": points,
            "views": by_view,
            "model_version": self.version,
            "disclaimer": DISCLAIMER,
        }

    # ------------------------------------------------------------------ localize

    def locate(
        self,
        name: str,
        data: bytes | DecodedImage,
        *,
        threshold: float | None = None,
        method: str | None = None,
    ) -> tuple[Localization, DecodedImage]:
        """The map of one whole mammogram by ``method`` (None: the model's default) and its boxes,
        with the decoded image (``localize`` is this as a JSON reply).

        Raises:
            UploadError: 422 naming ``file`` when the model has no localization method at all, or
                ``method`` when it cannot use the one asked for (with the reason); the upload's 4xx.
        """
        if not self.localizable:
            raise UploadError(422, f"this model cannot localize: {self.localize_note}", "file")
        chosen = method or self.localize_method
        if chosen not in self.localize_reasons:
            raise UploadError(
                422, f"unknown method {chosen!r}: expected one of {sorted(self.localize_reasons)}", "method"
            )
        if self.localize_reasons[chosen]:
            raise UploadError(
                422, f"method {chosen!r} is not available for this model: {self.localize_reasons[chosen]}", "method"
            )
        decoded = self.decode(name, data, "file")
        t = self.settings.localize_threshold if threshold is None else threshold
        with self.guard.exclusive() if chosen == "gradcam" else self.guard.shared():
            found = localize(
                self.members,
                self.spec,
                self.config,
                decoded.image,
                method=chosen,
                flipped=decoded.flipped,
                threshold=t,
                tile=self.settings.localize_tile or None,
                long_side=self.settings.localize_long_side,
            )
        return found, decoded

    def localize(
        self,
        name: str,
        data: bytes | DecodedImage,
        *,
        threshold: float | None = None,
        heatmap: str = "png",
        method: str | None = None,
        max_side: int = 768,
    ) -> dict[str, Any]:
        """``locate`` as the /v1/localize reply: boxes, scores, and the heatmap as ``heatmap`` asks
        (a PNG overlay in base64, the map grid, both, or none)."""
        found, decoded = self.locate(name, data, threshold=threshold, method=method)
        result = {**found.to_dict(), "model_version": self.version, "disclaimer": DISCLAIMER}
        if heatmap in ("png", "both"):
            stored = np.fliplr(decoded.image) if decoded.flipped else decoded.image
            label = map_label(found.method, self.config)
            result["heatmap_png_base64"] = overlay_base64(
                stored,
                found.heatmap(),
                found.boxes,
                label=label,
                title=f"{name}: {label} ({found.method})",
                max_side=max_side,
            )
        if heatmap == "layers":  # for the page: the map and the member spread at the preview's size, 8-bit
            result["heatmap_layers"] = self._layers(found, decoded, max_side=1024)
        if heatmap in ("array", "both"):  # the map grid, stored orientation, rounded for size
            grid = np.fliplr(found.dense.probs) if decoded.flipped else found.dense.probs
            result["heatmap_array"] = np.round(grid, 4).tolist()
            result["heatmap_array_geometry"] = {"cell_px": found.map_scale, "offset_px": list(found.map_offset)}
        return result

    @staticmethod
    def _layers(found: Localization, decoded: DecodedImage, *, max_side: int) -> dict[str, Any]:
        """The map (values in [0, 1]) and the members' spread (scaled by its maximum) as grayscale PNGs
        on ``preview``'s pixel grid, stored orientation: the page colours them and sets their opacity."""
        factor = min(1.0, max_side / max(decoded.shape))
        size = (max(1, round(decoded.shape[0] * factor)), max(1, round(decoded.shape[1] * factor)))
        spread = found.heatmap(size, spread=True)
        spread_max = float(spread.max(initial=0.0))
        layers: dict[str, Any] = {"size": list(size), "scale": factor, "spread_max": spread_max}
        for key, values in (("map", found.heatmap(size)), ("spread", spread / spread_max if spread_max else spread)):
            png = io.BytesIO()
            Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)).save(png, format="PNG")
            layers[f"{key}_png_base64"] = base64.b64encode(png.getvalue()).decode("ascii")
        return layers

    def localize_dicom(
        self, name: str, data: bytes, *, threshold: float | None = None, method: str | None = None
    ) -> bytes:
        """``locate`` as DICOM objects that PACS viewers open, zipped: the TID 1500 SR of the boxes and the
        FRACTIONAL SEG of the map on the upload's own pixel grid (``localize.dicom_out``), and the boxes
        as JSON.

        Raises:
            UploadError: 422 naming ``file`` when the upload is no DICOM (a PNG or TIFF has no UIDs to
                reference) or a DICOM without the attributes a reference needs; ``locate``'s errors.
        """
        from mammo_ray.localize.dicom_out import DicomSourceError, dicom_zip

        decoded = self.decode(name, data, "file")
        if decoded.kind != "dicom":
            raise UploadError(
                422,
                f"DICOM output needs a DICOM input; {name} is a {decoded.kind.upper()} image "
                "(ask without format=dicom, or send the DICOM file it came from)",
                "file",
            )
        found, _ = self.locate(name, decoded, threshold=threshold, method=method)
        summary = {**found.to_dict(), "image": name, "model_version": self.version, "disclaimer": DISCLAIMER}
        try:
            return dicom_zip(
                name,
                data,
                found.heatmap(),
                found.boxes,
                label=map_label(found.method, self.config),
                method=found.method,
                image_score=found.image_score,
                summary=summary,
            )
        except DicomSourceError as exc:
            raise UploadError(422, f"cannot reference {name} in a DICOM output: {exc.reason}", "file") from None

    def preview(self, name: str, data: bytes | DecodedImage, *, max_side: int = 1024) -> dict[str, Any]:
        """The upload as the page shows it: a grayscale PNG (base64) in the file's stored orientation, the
        orientation boxes and heatmaps use, with its size and the factor from file pixels to PNG pixels."""
        decoded = self.decode(name, data, "file")
        stored = np.fliplr(decoded.image) if decoded.flipped else decoded.image
        png, factor = grayscale_png(stored, max_side=max_side)
        return {
            "image_png_base64": base64.b64encode(png).decode("ascii"),
            "image_size": list(decoded.shape),
            "scale": factor,
            "kind": decoded.kind,
            "view": decoded.view.value if decoded.view is not None else None,
            "disclaimer": DISCLAIMER,
        }

    # ------------------------------------------------------------------ describe

    @property
    def version(self) -> str:
        s = self.source
        return s.model_uri or (f"runs:/{s.run_id}" if s.run_id else str(s.checkpoints[0]))

    def _metrics(self) -> dict[str, Any]:
        """The model run's MLflow metrics (the ensemble's for a registered version), and member 0's
        last-epoch validation metrics from its checkpoint."""
        history = load_checkpoint(self.source.checkpoints[0]).get("history") or [{}]
        out: dict[str, Any] = {
            "member_0_last_epoch": {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
        }
        if self.source.run_id and self.source.tracking_uri:
            try:
                run = MlflowClient(self.source.tracking_uri).get_run(self.source.run_id)
                out["run"] = dict(run.data.metrics)
                self._experiment_id = run.info.experiment_id
            except Exception as exc:  # noqa: BLE001 - the store may be unreachable from a replica
                out["run_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def _run_url(self) -> str | None:
        """The model's run in the MLflow UI, when ``settings.mlflow_ui_url`` says where the UI is."""
        ui, run_id = self.settings.mlflow_ui_url, self.source.run_id
        experiment = getattr(self, "_experiment_id", None)
        if not (ui and run_id and experiment):
            return None
        return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"

    def info(self) -> dict[str, Any]:
        if not hasattr(self, "_info_metrics"):
            self._info_metrics = self._metrics()
        return {
            "version": self.version,
            "run_url": self._run_url(),  # None unless the MLflow UI's URL is configured and the model has a run
            "class_names": list(self.class_names),
            "source": self.source.to_dict(),
            "members": len(self.members),
            "member_run_ids": self.source.member_run_ids,
            "view_mode": self.view_mode,
            "model": self.config.model.name,
            "task": self.config.data.task,
            "config": self.config.model_dump(mode="json"),
            "metrics": self._info_metrics,
            "execution": self.execution,
            "decisions": self.policy.to_dict() if self.policy else {"note": self.policy_note},
            "device": str(self.device),
            "load_seconds": self.load_seconds,
            "localize": {
                "available": self.localizable,
                "note": self.localize_note,
                "default_method": self.localize_method,
                "methods": {m: reason or "available" for m, reason in self.localize_reasons.items()},
            },
            "settings": self.settings.model_dump(mode="json"),
            "disclaimer": DISCLAIMER,
        }

    def status(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "loading",
            "members": len(self.members),
            "execution": self.execution.get("chosen"),
            "device": str(self.device),
        }
