"""The Serve app on a 2-CPU local Ray, over real HTTP on 127.0.0.1: a lesion classifier under "/" and a
patch localizer under "/loc", their answers against the offline paths, a bad upload inside a
batch, and 200 concurrent requests with back-pressure."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from http_forms import SMALL, multipart, post, server_timing
from ray import serve
from ray_head import reserved_port

from mammo_ray.cli.serve import start_app, wait_ready
from mammo_ray.constants import DISCLAIMER
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.localize.class_map import localize_class_map
from mammo_ray.localize.whole_image import localize_image, read_mammogram
from mammo_ray.serving.app import build_app
from mammo_ray.serving.runtime import ServeSettings

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(local_ray, lesion_model, patch_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve-ray")
    lesion = {"model": str(lesion_model[0]), "workdir": str(workdir), **SMALL}
    with reserved_port() as port:  # held until Serve's proxy binds it (SO_REUSEPORT, Serve's default)
        url = start_app(ServeSettings(**lesion).model_dump(), "127.0.0.1", port)  # on the session's Ray
    patch = ServeSettings(model=str(patch_model[0]), workdir=str(workdir), localize_threshold=0.3, **SMALL)
    serve.run(build_app(patch.model_dump()), name="loc", route_prefix="/loc", blocking=False)
    wait_ready(f"{url}/loc")
    yield url
    serve.shutdown()  # Ray itself stays up for the next module that uses it


def test_health_and_model_lineage(served, lesion_model):
    with urllib.request.urlopen(f"{served}/v1/health") as reply:
        assert reply.status == 200 and json.loads(reply.read())["status"] == "ready"
    with urllib.request.urlopen(f"{served}/v1/model") as reply:
        info = json.loads(reply.read())
    assert info["source"]["checkpoints"] == [str(lesion_model[0])] and info["members"] == 1
    assert info["execution"]["chosen"] == "loop" and info["settings"]["max_queued_requests"] == 8


def test_predict_over_http_equals_the_offline_evaluation(served, lesions):
    for row in lesions.head(4).itertuples():
        status, body = post(
            f"{served}/v1/predict", {"file": ("scan.dcm", Path(row.image_path).read_bytes()), "box": row.box_text}
        )
        assert status == 200, body
        assert body["probability"] == pytest.approx(row.prob, abs=1e-5)


def test_localize_over_http_equals_the_offline_map(served, patch_model):
    row = pd.read_parquet(patch_model[1].manifest).query("abnormality_type == 'MASS'").iloc[2]
    status, body = post(
        f"{served}/loc/v1/localize", {"file": ("scan.dcm", Path(row["image_path"]).read_bytes()), "heatmap": "none"}
    )
    assert status == 200, body
    ensemble = Ensemble.from_checkpoints([patch_model[0]])
    image, flipped = read_mammogram(row["image_path"])
    offline = localize_image(
        list(ensemble.members), ensemble.spec, ensemble.config, image, flipped=flipped, threshold=0.3
    )
    assert body["image_score"] == pytest.approx(offline.image_score, abs=1e-6)
    assert body["method"] == "dense" and len(body["boxes"]) == len(offline.boxes)
    for served_box, box in zip(body["boxes"], offline.boxes, strict=True):  # a replica sums in another order
        expected = box.to_dict()
        assert served_box["score"] == pytest.approx(expected.pop("score"), abs=1e-5)
        assert {k: served_box[k] for k in expected} == expected


def test_a_crop_classifier_localizes_with_its_class_map_over_http(served, lesion_model, lesions):
    """The lesion classifier (levynet, proportional crops) has no dense map: Grad-CAM, as offline."""
    row = lesions.iloc[0]
    scan = ("scan.dcm", Path(row.image_path).read_bytes())
    status, body = post(f"{served}/v1/localize", {"file": scan, "heatmap": "png"})
    assert status == 200, body
    assert body["method"] == "gradcam" and body["heatmap_png_base64"] and body["boxes"]
    assert body["disclaimer"].startswith("For research use only")
    ensemble = Ensemble.from_checkpoints([lesion_model[0]])
    image, flipped = read_mammogram(row.image_path)
    offline = localize_class_map(
        list(ensemble.members), ensemble.spec, ensemble.config, image, method="gradcam", flipped=flipped, threshold=0.5
    )
    assert body["boxes"] == [b.to_dict() for b in offline.boxes]
    assert body["image_score"] == pytest.approx(offline.image_score, abs=1e-5)
    status, body = post(f"{served}/v1/localize", {"file": scan, "method": "dense"})
    assert status == 422 and body["field"] == "method" and "not available" in body["reason"]


def test_the_page_preview_and_dicom_output_through_the_ingress(served, patch_model):
    """The page's routes through Serve: / and its files under each app's prefix (the page's URLs are
    relative), /v1/preview, and /v1/localize?format=dicom's zip, each over the deployment handle."""
    for prefix in ("", "/loc"):
        with urllib.request.urlopen(f"{served}{prefix}/") as reply:
            page = reply.read().decode()
        assert reply.status == 200 and DISCLAIMER in page and 'src="page/page.js"' in page
        with urllib.request.urlopen(f"{served}{prefix}/page/page.js") as reply:
            assert reply.status == 200 and b"v1/predict" in reply.read()
    row = pd.read_parquet(patch_model[1].manifest).query("abnormality_type == 'MASS'").iloc[2]
    scan = ("scan.dcm", Path(row["image_path"]).read_bytes())
    status, body = post(f"{served}/loc/v1/preview", {"file": scan})
    assert (
        status == 200
        and body["kind"] == "dicom"
        and body["image_size"] == list(read_mammogram(row["image_path"])[0].shape)
    )
    data, content_type = multipart({"file": scan, "threshold": "0.3"})
    request = urllib.request.Request(
        f"{served}/loc/v1/localize?format=dicom", data=data, headers={"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.headers["Content-Type"] == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(reply.read())).namelist()
    assert sorted(names) == ["scan_boxes.json", "scan_seg.dcm", "scan_sr.dcm"]


def test_a_prediction_says_where_its_time_went(served, lesions):
    row = lesions.iloc[0]
    headers: dict[str, str] = {}
    status, body = post(
        f"{served}/v1/predict", {"file": ("scan.dcm", Path(row.image_path).read_bytes()), "box": row.box_text}, headers
    )
    assert status == 200 and "_timing" not in body  # the replica's timing goes to the header only
    stages = server_timing(headers["server-timing"])
    assert {"ingress", "backend", "queue", "model", "return", "total", "batch"} <= stages.keys()
    ms = {k: v for k, v in stages.items() if isinstance(v, float)}
    assert all(v >= 0 for v in ms.values()) and ms["model"] > 0
    # The replica's three stages happen inside the ingress's model call, and that inside the app's total.
    assert ms["queue"] + ms["model"] + ms["return"] <= ms["backend"] + 1.0
    assert ms["ingress"] + ms["backend"] <= ms["total"] + 0.01
    assert stages["batch"] == "1 requests"  # alone: no batch wait (batch_wait_timeout_s 0)


def test_a_bad_upload_is_a_4xx_and_the_server_stays_up(served, lesions):
    status, body = post(f"{served}/v1/predict", {"file": ("junk.dcm", b"\x00not an image" * 50)})
    assert status == 400 and "not a DICOM" in body["reason"]
    row = lesions.iloc[0]
    status, _ = post(
        f"{served}/v1/predict", {"file": ("scan.dcm", Path(row.image_path).read_bytes()), "box": row.box_text}
    )
    assert status == 200


def test_200_concurrent_requests_answer_200_or_503(served, lesions):
    row = lesions.iloc[0]
    fields = {"file": ("scan.dcm", Path(row.image_path).read_bytes()), "box": row.box_text}
    replies: list[dict[str, str]] = [{} for _ in range(200)]
    with ThreadPoolExecutor(max_workers=48) as pool:
        results = list(pool.map(lambda i: post(f"{served}/v1/predict", fields, replies[i]), range(200)))
    # Without a batch wait, the requests that queue while the model works still form batches.
    batches = [int(str(server_timing(h["server-timing"])["batch"]).split()[0]) for h in replies if h]
    assert max(batches) > 1, batches
    statuses = pd.Series([s for s, _ in results]).value_counts().to_dict()
    assert set(statuses) <= {200, 503}, statuses  # back-pressure, never another 5xx
    assert statuses.get(200, 0) >= 20, statuses
    answers = [b["probability"] for s, b in results if s == 200]
    assert answers == pytest.approx([row.prob] * len(answers), abs=1e-5)  # batched with others, the same answer
    for s, b in results:
        if s == 503:
            assert "Service Unavailable" in json.dumps(b) or "raw" in b
    status, _ = post(f"{served}/v1/predict", fields)
    assert status == 200
