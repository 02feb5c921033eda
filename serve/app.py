"""``serve run serve.app:build_app model=...`` / ``serve run serve/config.yaml`` from the repository root.

The deployments live in the installed package (``mammo_ray.serving.app``) so every Ray worker can
import them; this module only gives Serve's CLI its conventional import path.
For research use only. Not for use in diagnostic procedures.
"""

from mammo_ray.serving.app import EnsembleModel, Ingress, build_app

__all__ = ["EnsembleModel", "Ingress", "build_app"]
