"""The page at / and the routes it uses, in-process (FastAPI TestClient over a ModelRuntime, no Ray, no
browser; tests/serving/test_page_browser.py drives it in Chromium): the page and its files are served
with the disclaimer and nothing from elsewhere, /v1/preview shows the upload as the server decodes it,
and /v1/localize's heatmap=layers gives the map and the member spread on the preview's pixel grid."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.dicom import read_dicom
from mammo_ray.serving.api import PAGE_DIR, RuntimeBackend, build_api
from mammo_ray.serving.runtime import ServeSettings

pytestmark = pytest.mark.slow  # the fixtures train a model


@pytest.fixture(scope="module")
def served(lesion_model, tmp_path_factory):
    """(TestClient, runtime) of the lesion classifier, with the MLflow UI's URL configured."""
    settings = ServeSettings(
        model=str(lesion_model[0]), workdir=str(tmp_path_factory.mktemp("page")), execution="loop",
        mlflow_ui_url="http://127.0.0.1:5000",
    )  # fmt: skip
    backend = RuntimeBackend(settings)
    asyncio.run(backend.load())
    return TestClient(build_api(backend, settings)), backend.runtime


def _png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_the_page_and_its_files_are_served_with_the_disclaimer_and_nothing_from_elsewhere(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count(DISCLAIMER) >= 2  # the header's, and the footer's that is always on screen
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(linked) == ["page/page.css", "page/page.js"]
    for path, kind in (("page/page.js", "javascript"), ("page/page.css", "css")):
        reply = client.get(f"/{path}")
        assert reply.status_code == 200 and kind in reply.headers["content-type"]
    for file in PAGE_DIR.iterdir():  # no CDN, no font service, no analytics: the page works offline
        assert "://" not in file.read_text(), f"{file.name} refers to another server"
    missing = client.get("/page/nothing.js")
    assert missing.status_code == 404 and missing.json()["disclaimer"] == DISCLAIMER
    assert "/" in client.get("/openapi.json").json()["paths"]


def test_preview_is_the_upload_as_the_server_decodes_it_in_its_stored_orientation(served, lesions):
    client, _ = served
    row = lesions.iloc[0]
    reply = client.post("/v1/preview", files={"file": ("scan.dcm", Path(row.image_path).read_bytes())})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    stored, _ = read_dicom(row.image_path, flip=False)
    assert body["image_size"] == list(stored.shape) and body["kind"] == "dicom"
    assert body["view"] == row.view and body["disclaimer"] == DISCLAIMER
    png = _png(body["image_png_base64"])
    assert png.shape == tuple(round(n * body["scale"]) for n in stored.shape) and png.dtype == np.uint8
    # the stored orientation: the PNG's brightness follows the file's pixels, not their mirror image
    small = np.asarray(Image.fromarray(stored.astype(np.float32)).resize(png.shape[::-1]))
    assert np.corrcoef(small.ravel(), png.ravel().astype(float))[0, 1] > 0.9
    bad = client.post("/v1/preview", files={"file": ("junk.dcm", b"not an image at all" * 20)})
    assert bad.status_code == 400 and bad.json()["field"] == "file" and "junk.dcm" in bad.json()["reason"]


def test_localize_layers_are_the_map_and_the_member_spread_on_the_preview_grid(served, lesions):
    client, runtime = served
    row = lesions.iloc[0]
    data = Path(row.image_path).read_bytes()
    reply = client.post("/v1/localize", files={"file": ("scan.dcm", data)}, data={"heatmap": "layers"})
    assert reply.status_code == 200, reply.text
    layers = reply.json()["heatmap_layers"]
    assert "heatmap_png_base64" not in reply.json() and "heatmap_array" not in reply.json()
    preview = client.post("/v1/preview", files={"file": ("scan.dcm", data)}).json()
    assert layers["size"] == list(_png(preview["image_png_base64"]).shape) and layers["scale"] == preview["scale"]
    found, _ = runtime.locate("scan.dcm", data)
    expected = np.clip(found.heatmap(tuple(layers["size"])), 0, 1) * 255
    heat = _png(layers["map_png_base64"])
    assert heat.shape == tuple(layers["size"]) and np.abs(heat - expected).max() <= 0.51
    assert heat.max() == 255  # a class map is scaled to its maximum: the overlay is never blank
    spread = _png(layers["spread_png_base64"])
    assert spread.shape == heat.shape and layers["spread_max"] == 0.0 and spread.max() == 0  # one member


def test_the_model_reply_links_its_run_only_when_it_has_one(served):
    client, _ = served
    info = client.get("/v1/model").json()
    assert info["class_names"] == ["benign", "malignant"]
    assert info["run_url"] is None  # a checkpoint file has no MLflow run to link, even with the UI's URL set
