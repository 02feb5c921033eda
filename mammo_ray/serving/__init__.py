"""Serving the ensemble: the runtime a replica holds and the FastAPI app (no Ray in either)."""
