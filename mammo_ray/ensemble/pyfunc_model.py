"""The code of the registered ensemble's MLflow model, loaded by MLflow's models-from-code.

``pyfunc.save_ensemble_model`` names this file as the ``python_model``: MLflow copies it into the
model folder and runs it when the model is loaded, and ``set_model`` at the bottom hands MLflow the
model. Nothing is pickled, so loading needs no ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` and prints no
pickle warning. Only MLflow should import this module (it calls ``set_model``); ``pyfunc`` holds
what the model takes and returns.

``load_context`` builds the Serve replica's ``ModelRuntime`` from the member checkpoints among the
model's artifacts (``ModelRuntime.from_checkpoints``), with ``ServeSettings`` fields from the model
config: ``mlflow.pyfunc.load_model(uri, model_config={"threshold": 0.3, "device": "cpu"})``.
``predict`` turns each row into the ``PredictItem`` that ``POST /v1/predict`` and ``mammo_ray.load``
build, so the image is decoded, cropped and transformed by the same code.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

import mammo_ray
from mammo_ray.data.images import DecodedImage, read_image
from mammo_ray.ensemble.pyfunc import DECISIONS, OUTPUT_COLUMNS, flatten_reply, input_columns, member_index
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import UploadError, upload_errors

log = logging.getLogger("mammo_ray.ensemble.pyfunc_model")  # not __name__: MLflow runs this file as code_model_<uuid>
MODEL_DIR = os.path.dirname(os.path.abspath(__file__))  # MLflow runs the copy at the model folder's root
MAX_ERRORS_SHOWN = 5


def _missing(value: Any) -> bool:
    """None, NaN (a missing value in a pandas column) or blank text."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


class EnsemblePyfunc(PythonModel):
    """The ensemble as an MLflow pyfunc: images in (``pyfunc.input_columns``), ``/v1/predict`` fields out."""

    runtime: ModelRuntime | None = None

    def load_context(self, context: PythonModelContext) -> None:
        members = sorted((i, name) for name in context.artifacts if (i := member_index(name)) is not None)
        if not members:
            raise ValueError(f"ensemble model: no member_XXX artifacts among {sorted(context.artifacts)}")
        files = [context.artifacts[name] for _, name in members]
        settings = ServeSettings(model=MODEL_DIR, **(context.model_config or {}))
        stored = context.artifacts.get(DECISIONS)  # the policy fitted on val, when registered with one
        decisions = json.loads(Path(stored).read_text()) if stored else None
        self.runtime = ModelRuntime.from_checkpoints(files, settings, decisions=decisions)
        self.columns = input_columns(self.runtime.view_mode)
        log.info("mammo-ray ensemble of %d members in %s; code from %s", len(files), MODEL_DIR, mammo_ray.__file__)

    def _image(self, value: Any, column: str, row: int, max_dim: int) -> tuple[str, bytes | DecodedImage]:
        """A file on this machine (decoded here, as ``mammo_ray.load`` reads paths) or base64 bytes
        (decoded by the runtime under the upload caps, as the HTTP app decodes uploads)."""
        if not isinstance(value, str) or _missing(value):
            raise UploadError(422, "expected a file path or base64-encoded file bytes", column)
        if os.path.isfile(value):  # False for text too long to be a path (base64)
            with upload_errors(column, value):
                return value, read_image(value, max_dim=max_dim)
        try:
            return f"<row {row} {column}, base64>", base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise UploadError(422, f"{shown!r} is neither a file here nor base64-encoded bytes", column) from None

    def _item(self, row: dict[str, Any], index: int, max_dim: int) -> PredictItem:
        """The /v1/predict request of one row: ``image`` is its ``file`` field, the other columns keep their names."""
        files, rois = {}, {}
        for column, is_image in self.columns:
            value = row.get(column)
            if is_image:
                files["file" if column == "image" else column] = self._image(value, column, index, max_dim)
            elif not _missing(value):
                rois[column] = str(value)
        return PredictItem(files=files, rois=rois)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row of ``pyfunc.OUTPUT_COLUMNS`` per input row, in order.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE (the scoring server's 400) naming every bad row,
                its column and the reason, after the other rows were tried.
        """
        if self.runtime is None:
            raise RuntimeError("ensemble model: predict called before load_context")
        pair = self.runtime.view_mode == "multimodal"
        records = model_input.to_dict("records")
        rows: list[dict[str, Any]] = []
        errors: list[str] = []
        step = self.runtime.settings.max_batch_size  # one forward per chunk, as a Serve batch; bounds memory
        for start in range(0, len(records), step):
            items, positions = [], []
            for i in range(start, min(start + step, len(records))):
                try:
                    items.append(self._item(records[i], i, self.runtime.settings.max_dim))
                    positions.append(i)
                except UploadError as exc:
                    errors.append(f"row {i}, {exc.field}: {exc.reason}")
            for i, reply in zip(positions, self.runtime.predict_items(items) if items else [], strict=True):
                if isinstance(reply, UploadError):
                    field = "image" if reply.field == "file" else reply.field
                    errors.append(f"row {i}, {field}: {reply.reason}")
                else:
                    rows.append(flatten_reply(reply, pair))
        if errors:
            shown = "; ".join(errors[:MAX_ERRORS_SHOWN]) + ("; ..." if len(errors) > MAX_ERRORS_SHOWN else "")
            raise MlflowException.invalid_parameter_value(f"{len(errors)} of {len(records)} rows failed: {shown}")
        return pd.DataFrame(rows, columns=[name for name, _ in OUTPUT_COLUMNS])


set_model(EnsemblePyfunc())
