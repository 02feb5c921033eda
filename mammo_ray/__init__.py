"""mammo-ray: train, search, ensemble, track and serve mammogram lesion CNNs on Ray.

For research use only. Not for use in diagnostic procedures.

``mammo_ray.load(model)`` gives a trained model in this process (``serving.predictor.Predictor``);
the rest is the ``mammo-ray`` command (``mammo_ray.cli``). This module imports nothing heavy, so
``import mammo_ray`` and ``mammo-ray --help`` stay fast.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os

    from mammo_ray.serving.predictor import Predictor

try:
    __version__ = version("mammo-ray")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load"]


def load(
    model: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    **settings: Any,
) -> Predictor:
    """A trained model, ready to ``predict``, ``localize`` and describe itself (``info``), in this process.

    Args:
        model: a checkpoint file or folder, an MLflow run id (``runs:/<id>``), ``models:/<name>/<version>``
            or ``models:/<name>@<alias>``.
        tracking_uri: the MLflow store of ``model`` (default: ``$MLFLOW_TRACKING_URI``, else the work
            directory's SQLite store).
        workdir: the work directory (default: ``$MAMMO_RAY_WORKDIR``, else ``./work``).
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        settings: other ``ServeSettings`` fields, e.g. ``threshold=0.3``.
    """
    from mammo_ray.serving.predictor import Predictor

    return Predictor.load(model, tracking_uri=tracking_uri, workdir=workdir, device=device, **settings)
