"""``serve run serve/config.yaml`` (or ``serve run serve.app:build_app model=...``) from the repository root.

The deployments live in the installed package (``mammo_ray.serving.app``) so every Ray worker can
import them; this module only gives Serve's CLI its conventional import path.
For research use only. Not for use in diagnostic procedures.
"""

from mammo_ray.serving.app import EnsembleModel, ReplicaOptions, build_app

__all__ = ["EnsembleModel", "ReplicaOptions", "build_app"]
