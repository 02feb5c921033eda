"""The registered ensemble as an MLflow model: what it takes, what it returns, what it needs, and saving it.

``model.register_ensemble`` saves the members with ``save_ensemble_model`` and logs the folder as a
logged model of the ensemble's run. The folder holds:

    MLmodel                  the python_function flavor: signature, member artifacts, metadata
    pyfunc_model.py          the model's code, loaded by MLflow's models-from-code (no pickle)
    code/mammo_ray/          this package, so the model loads where mammo-ray is not installed
    artifacts/               the member checkpoints (weights only), ``member_000``, ... in the MLmodel
    input_example.json, serving_input_example.json
    requirements.txt, python_env.yaml, conda.yaml   what the code imports, at the versions here

The model takes images, not tensors: one row per image, a DataFrame of

    image    a DICOM, PNG or TIFF file path, or the file's bytes base64-encoded
    box      optional ROI ``"x0,y0,x1,y1"`` in pixels of the image as given; empty or None: the whole image

(a multimodal ensemble takes ``cc`` and ``mlo`` with ``cc_box`` and ``mlo_box`` instead), and returns
one row per input row: the fields of ``POST /v1/predict`` flattened (``OUTPUT_COLUMNS``). The image
goes through the Serve replica's ``ModelRuntime``, as ``mammo_ray.load`` and the HTTP app send it, so
a probability from the MLflow model equals the served one and ``mammo-ray evaluate``'s.

Nothing here imports the runtime (``serving.runtime`` imports ``ensemble.model``, which imports this);
``pyfunc_model.py`` does, when MLflow loads it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from PIL import Image

from mammo_ray import tags

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the models-from-code file MLflow copies and loads
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mammo_ray/, shipped whole as code_paths
MEMBER = re.compile(r"member_(\d{3,})")
DECISIONS = "decisions"  # the artifact holding the ensemble's decision policy (decisions.json)

# The distributions the model's code imports (pyfunc_model -> serving.runtime and what it imports;
# tests/ensemble/test_pyfunc.py checks this against the import graph), pinned to the versions installed
# here. Not mammo-ray: the package travels with the model. Not ray: the runtime does not import it.
# pylibjpeg(-openjpeg) decode JPEG 2000 DICOMs, as in the Serve app.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "pandas",
    "pillow",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pydantic",
    "pyyaml",
    "psutil",
    "matplotlib",  # serving.runtime -> localize.render
    "captum",  # serving.runtime -> localize.cam
    "scikit-learn",  # serving.runtime -> decisions (calibration, referral)
    "highdicom",  # serving.runtime -> localize.dicom_out (/v1/localize?format=dicom)
)

# The image columns per view mode, all required; each has an optional ROI column (``box`` for ``image``,
# ``cc_box`` for ``cc``, ...). The CC+MLO pair of a multimodal ensemble is one row.
IMAGE_COLUMNS = {"single": ("image",), "parallel": ("image",), "multimodal": ("cc", "mlo")}
QUANTILE_NAMES = ("q05", "q25", "q50", "q75", "q95")  # serving.runtime.QUANTILES as /v1/predict names them
OUTPUT_COLUMNS: tuple[tuple[str, DataType], ...] = (
    ("probability", DataType.double),  # P(class 1): malignant for the pathology task; mean over members
    ("label", DataType.string),  # the class at `threshold`
    ("threshold", DataType.double),
    ("task", DataType.string),
    ("view", DataType.string),  # CC or MLO (DICOM header or file name), "image", or "CC+MLO" for a pair
    ("members_count", DataType.long),
    ("members_std", DataType.double),  # spread of the members' probabilities (ddof 0)
    *((f"members_{q}", DataType.double) for q in QUANTILE_NAMES),
    ("calibrated_probability", DataType.double),  # through the calibration fitted on val (NaN: none stored)
    ("uncertainty_entropy", DataType.double),  # bits: total uncertainty of the mean probability
    ("uncertainty_mutual_information", DataType.double),  # bits: the members' disagreement (epistemic)
    ("refer", DataType.boolean),  # above the referral cut-off chosen on val (False without a stored policy)
    ("refer_reason", DataType.string),
    ("disclaimer", DataType.string),
)


def member_index(name: str) -> int | None:
    """The member number of artifact ``member_007`` (7), or None for any other artifact name."""
    match = MEMBER.fullmatch(name)
    return int(match.group(1)) if match else None


def input_columns(view_mode: str) -> list[tuple[str, bool]]:
    """``(column, required)`` of the model's input for ensembles of ``view_mode``: images, then ROI boxes."""
    try:
        images = IMAGE_COLUMNS[view_mode]
    except KeyError:
        raise ValueError(f"unknown view mode {view_mode!r}; expected one of {sorted(IMAGE_COLUMNS)}") from None
    boxes = ["box"] if images == ("image",) else [f"{c}_box" for c in images]
    return [(c, True) for c in images] + [(c, False) for c in boxes]


def signature(view_mode: str) -> ModelSignature:
    inputs = Schema([ColSpec(DataType.string, name, required=required) for name, required in input_columns(view_mode)])
    outputs = Schema([ColSpec(dtype, name) for name, dtype in OUTPUT_COLUMNS])
    return ModelSignature(inputs=inputs, outputs=outputs)


def flatten_reply(reply: Mapping[str, Any], pair: bool) -> dict[str, Any]:
    """One output row from a ``/v1/predict`` reply (``ModelRuntime.predict_items``)."""
    members = reply["members"]
    return {
        "probability": reply["probability"],
        "label": reply["label"],
        "threshold": reply["threshold"],
        "task": reply["task"],
        "view": "CC+MLO" if pair else next(iter(reply["views"]), "image"),
        "members_count": members["count"],
        "members_std": members["std"],
        **{f"members_{q}": members["quantiles"][q] for q in QUANTILE_NAMES},
        "calibrated_probability": (
            float("nan") if reply["calibrated_probability"] is None else reply["calibrated_probability"]
        ),
        "uncertainty_entropy": reply["uncertainty"]["entropy"],
        "uncertainty_mutual_information": reply["uncertainty"]["mutual_information"],
        "refer": bool(reply["refer"]["refer"]),
        "refer_reason": reply["refer"]["reason"],
        "disclaimer": reply["disclaimer"],
    }


def _example_png(height: int = 96, width: int = 64) -> str:
    """A small 16-bit grayscale PNG, base64: a soft bright blob on a ramp, breast side on the left."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = 20000 * (1 - x / width)
    blob = 30000 * np.exp(-((x - width / 3) ** 2 + (y - height / 2) ** 2) / (2 * (width / 8) ** 2))
    buffer = io.BytesIO()
    Image.fromarray((ramp + blob).astype(np.uint16)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example(view_mode: str) -> pd.DataFrame:
    """Two rows: an image with an ROI box, and the same image whole (no box)."""
    png = _example_png()
    return pd.DataFrame({c: [png, png] if image else ["16,28,40,68", None] for c, image in input_columns(view_mode)})


def pip_requirements() -> list[str]:
    """``REQUIREMENTS`` pinned to the installed releases (a local version such as ``+cu130`` dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def save_ensemble_model(
    path: str | Path,
    members: Mapping[str, str | Path],
    view_mode: str,
    *,
    mlflow_model: Model | None = None,
    decisions: Mapping[str, Any] | None = None,
) -> None:
    """Save the ensemble as an MLflow model in the new folder ``path`` (MLmodel metadata: members, view
    mode and the mammo-ray version).

    Args:
        members: artifact name (``member_000``, ...) -> member checkpoint file, in member order.
        view_mode: the members' view mode (chooses the input columns).
        mlflow_model: the ``Model`` to save into (a logged model's id, run and artifact location).
        decisions: the ensemble's decision policy (fitted on val), saved as the ``decisions``
            artifact (``decisions.json``): calibration, operating thresholds, referral cut-off.
    """
    if not members or any(member_index(name) is None for name in members):
        raise ValueError(f"ensemble model: member artifacts must be named member_000, ...; got {sorted(members)}")
    try:
        package_version = version("mammo-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = "0+unknown"
    artifacts = {name: str(Path(file).resolve()) for name, file in members.items()}
    with tempfile.TemporaryDirectory() as staging:  # the policy's file, until save_model has copied it
        if decisions is not None:
            artifacts[DECISIONS] = str(Path(staging) / "decisions.json")
            Path(artifacts[DECISIONS]).write_text(json.dumps(dict(decisions), indent=2))
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(view_mode),
            input_example=input_example(view_mode),
            pip_requirements=pip_requirements(),
            metadata={
                tags.MEMBERS: len(members),
                tags.VIEW_MODE: view_mode,
                tags.VERSION: package_version,
            },
            mlflow_model=mlflow_model,
        )
