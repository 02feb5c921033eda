"""The HTTP API in-process (FastAPI TestClient over a ModelRuntime, no Ray): served predictions equal
the offline evaluation, each class of bad input gets its 4xx and the next request succeeds, health
says loading until the model is loaded, and the model endpoint shows the lineage."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from member_variants import shifted_members
from mlflow import MlflowClient
from PIL import Image
from pydicom import dcmread
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import RLELossless

from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.dicom import read_dicom
from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.runtime import ServeSettings
from mammo_ray.train.evaluation import predict_checkpoint

pytestmark = pytest.mark.slow


def client_for(checkpoint, tmp_path, **settings) -> tuple[TestClient, RuntimeBackend]:
    config = ServeSettings(model=str(checkpoint), workdir=str(tmp_path), execution="loop", **settings)
    backend = RuntimeBackend(config)
    asyncio.run(backend.load())
    return TestClient(build_api(backend, config)), backend


@pytest.fixture(scope="module")
def lesion_client(lesion_model, tmp_path_factory):
    return client_for(lesion_model[0], tmp_path_factory.mktemp("serve"))[0]


@pytest.fixture(scope="module")
def test_lesions(lesion_model):
    """The test split's lesions with the offline prediction, image file and ROI (stored coordinates)."""
    checkpoint, prepared = lesion_model
    cache = CropCache(prepared.cache_dir)
    dataset = SingleViewDataset(cache, "test", "pathology")
    frame = predict_checkpoint(
        checkpoint, "test", prepared.dataset_dir, cache_dir=prepared.cache_dir, splits_path=prepared.splits
    ).frame
    rows = dataset.frame.assign(prob=frame["prob"].to_numpy())
    manifest = pd.read_parquet(prepared.manifest).set_index("lesion_id")
    rows["roi_mask_path"] = manifest.loc[rows["lesion_id"], "roi_mask_path"].to_numpy()
    return rows


def _dicom(path: str) -> bytes:
    return Path(path).read_bytes()


def _box(mask_path: str) -> str:
    mask, _ = read_dicom(mask_path, flip=False)  # the stored orientation, as a user would give it
    return ",".join(str(v) for v in mask_bbox(mask > 0))


def test_predict_equals_the_offline_evaluation(lesion_client, test_lesions):
    for row in test_lesions.head(6).itertuples():
        reply = lesion_client.post(
            "/v1/predict", files={"file": ("scan.dcm", _dicom(row.image_path))}, data={"box": _box(row.roi_mask_path)}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["probability"] == pytest.approx(row.prob, abs=1e-5), row.lesion_id
        assert body["label"] == ("malignant" if body["probability"] >= 0.5 else "benign")
        assert body["members"]["count"] == 1 and body["members"]["std"] == 0
        assert body["views"] == {row.view: pytest.approx(row.prob, abs=1e-5)}
        assert body["disclaimer"] == DISCLAIMER and body["model_version"]


def test_a_cc_mlo_pair_averages_its_views(lesion_client, test_lesions):
    exam = test_lesions.groupby("exam_key").filter(lambda g: set(g["view"]) == {"CC", "MLO"})
    cc, mlo = (exam[exam["view"] == v].iloc[0] for v in ("CC", "MLO"))
    reply = lesion_client.post(
        "/v1/predict",
        files={"cc": ("cc.dcm", _dicom(cc.image_path)), "mlo": ("mlo.dcm", _dicom(mlo.image_path))},
        data={"cc_box": _box(cc.roi_mask_path), "mlo_box": _box(mlo.roi_mask_path)},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["views"]["CC"] == pytest.approx(cc.prob, abs=1e-5)
    assert body["views"]["MLO"] == pytest.approx(mlo.prob, abs=1e-5)
    assert body["probability"] == pytest.approx((cc.prob + mlo.prob) / 2, abs=1e-5)  # paper 000, per exam


def _compressed(path: str) -> bytes:
    ds = dcmread(path)
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_each_bad_input_gets_its_4xx_and_the_next_request_succeeds(lesion_model, test_lesions, tmp_path, monkeypatch):
    client, _ = client_for(lesion_model[0], tmp_path, max_upload_mb=0.5, max_dim=1000)
    row = test_lesions.iloc[0]
    good = {"files": {"file": ("scan.dcm", _dicom(row.image_path))}, "data": {"box": _box(row.roi_mask_path)}}
    big = np.zeros((1200, 50), np.uint8)
    big[:, :10] = 200
    png = io.BytesIO()
    Image.fromarray(big).save(png, format="PNG")
    compressed = _compressed(row.image_path)
    cases = [
        ("not an image", {"files": {"file": ("x.dcm", b"hello, not an image" * 10)}}, 400, "not a DICOM"),
        ("truncated DICOM", {"files": {"file": ("t.dcm", _dicom(row.image_path)[:-500])}}, 400, "truncated"),
        ("compressed, no decoder", {"files": {"file": ("c.dcm", compressed)}}, 415, "RLE Lossless"),
        (
            "oversized upload",
            {"files": {"file": ("huge.png", b"\x89PNG\r\n\x1a\n" + bytes(600_000))}},
            413,
            "upload cap",
        ),
        ("too many rows", {"files": {"file": ("tall.png", png.getvalue())}}, 413, "1200"),
        ("wrong field name", {"files": {"image": ("scan.dcm", _dicom(row.image_path))}}, 422, "'image'"),
        ("missing file", {"data": {"box": "1,2,3,4"}}, 422, "missing required form field 'file'"),
        (
            "bad box",
            {"files": {"file": ("scan.dcm", _dicom(row.image_path))}, "data": {"box": "3,3,1,1"}},
            422,
            "empty",
        ),
        (
            "box outside",
            {"files": {"file": ("scan.dcm", _dicom(row.image_path))}, "data": {"box": "0,0,9000,9"}},
            422,
            "outside the image",
        ),
    ]
    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})  # as if no RLE plugin were installed
    for name, request, status, words in cases:
        reply = client.post("/v1/predict", **request)
        assert reply.status_code == status, (name, reply.status_code, reply.text)
        body = reply.json()
        assert words in (body["reason"] + body["error"]), (name, body)
        assert body["disclaimer"] == DISCLAIMER
        after = client.post("/v1/predict", **good)  # the server stays up and serves the next request
        assert after.status_code == 200, (name, after.text)


def _registered_ensemble(checkpoints, tmp_path, name: str) -> tuple[str, str]:
    """(models:/ URI, tracking URI) of ``checkpoints`` registered as one ensemble, as `make demo` registers it."""
    from mlflow import MlflowClient

    from mammo_ray.ensemble.model import register_ensemble

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment)
    registered = register_ensemble(uri, parent.info.run_id, checkpoints, [""] * len(checkpoints), name)
    return registered["model_uri"], uri


def _untrained_checkpoint(tmp_path, *overrides: str) -> Path:
    import torch

    from mammo_ray.config import load_config
    from mammo_ray.data.transforms import TransformSpec
    from mammo_ray.models.views import build_view_model
    from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint

    torch.manual_seed(0)
    config = load_config(
        None, ["data.cache_px=40", "data.input_px=32", "data.crop=proportional", "data.task=pathology", *overrides]
    )
    model = build_view_model(config.model).eval()
    spec = TransformSpec.from_config(config.data, train_mean=1000.0, train_std=500.0)
    return save_checkpoint(checkpoint_payload(model=model, config=config, spec=spec, epoch=0), tmp_path)


def _heatmap_png(body) -> Image.Image:
    return Image.open(io.BytesIO(__import__("base64").b64decode(body["heatmap_png_base64"])))


def test_a_crop_classifier_ensemble_localizes_with_its_class_map(lesion_model, test_lesions, tmp_path):
    """The ensemble `make demo` serves (levynet on proportional crops, pathology): Grad-CAM, as CAM needs GAP+FC."""
    model_uri, uri = _registered_ensemble([lesion_model[0]] * 2, tmp_path, "crop-ensemble")
    client, backend = client_for(model_uri, tmp_path, tracking_uri=uri)
    row = test_lesions.iloc[0]
    scan = {"file": ("scan.dcm", _dicom(row.image_path))}
    reply = client.post("/v1/localize", files=scan, data={"heatmap": "both"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    image, _ = read_dicom(row.image_path, flip=False)
    assert body["method"] == "gradcam" and "Grad-CAM" in body["map_values"] and body["window_px"] is None
    assert body["image_size"] == list(image.shape) and body["boxes"] and body["disclaimer"] == DISCLAIMER
    assert all(
        0 <= b["x0"] < b["x1"] <= image.shape[1] + body["map_stride_px"] and b["score"] >= 0.5 for b in body["boxes"]
    )
    grid = np.asarray(body["heatmap_array"])
    assert grid.shape == tuple(body["map_shape"]) and grid.min() >= 0 and grid.max() == pytest.approx(1.0)
    assert body["max_spread"] == pytest.approx(0, abs=1e-6)  # two copies of one member agree
    assert 0 <= body["image_score"] <= 1 and _heatmap_png(body).format == "PNG"
    explicit = client.post("/v1/localize", files=scan, data={"method": "gradcam", "heatmap": "none"}).json()
    assert explicit["boxes"] == body["boxes"] and "heatmap_png_base64" not in explicit
    for method, words in (("dense", "data.crop='proportional'"), ("cam", "levynet does not")):
        refused = client.post("/v1/localize", files=scan, data={"method": method})
        assert refused.status_code == 422, refused.text
        error = refused.json()
        assert error["field"] == "method" and f"method {method!r} is not available" in error["reason"]
        assert words in error["reason"] and error["disclaimer"] == DISCLAIMER
    bad = client.post("/v1/localize", files=scan, data={"method": "saliency"})
    assert bad.status_code == 422 and bad.json()["field"] == "method"
    assert client.post("/v1/localize", files=scan).status_code == 200  # still serving after the refusals
    info = client.get("/v1/model").json()["localize"]
    assert info["default_method"] == "gradcam" and info["methods"]["gradcam"] == "available"
    assert "proportional" in info["methods"]["dense"]


def test_a_gap_fc_crop_classifier_defaults_to_cam(test_lesions, tmp_path):
    checkpoint = _untrained_checkpoint(tmp_path / "resnet", "model.name=resnet18")
    client, _ = client_for(checkpoint, tmp_path)
    scan = {"file": ("scan.dcm", _dicom(test_lesions.iloc[0].image_path))}
    body = client.post("/v1/localize", files=scan, data={"heatmap": "array"}).json()
    assert body["method"] == "cam" and body["disclaimer"] == DISCLAIMER
    assert np.asarray(body["heatmap_array"]).shape == tuple(body["map_shape"])
    assert client.post("/v1/localize", files=scan, data={"method": "gradcam"}).json()["method"] == "gradcam"


def test_a_multimodal_model_cannot_localize_and_says_so(test_lesions, tmp_path):
    checkpoint = _untrained_checkpoint(tmp_path / "mm", "model.name=levynet", "model.view_mode=multimodal")
    client, _ = client_for(checkpoint, tmp_path)
    reply = client.post("/v1/localize", files={"file": ("scan.dcm", _dicom(test_lesions.iloc[0].image_path))})
    assert reply.status_code == 422 and "cannot localize" in reply.json()["reason"]
    assert "multimodal" in reply.json()["reason"] and reply.json()["field"] == "file"


def test_localize_gives_a_heatmap_and_boxes(patch_model, tmp_path):
    client, backend = client_for(patch_model[0], tmp_path, localize_threshold=0.3)
    manifest = pd.read_parquet(patch_model[1].manifest)
    row = manifest[manifest["abnormality_type"] == "MASS"].iloc[2]
    reply = client.post(
        "/v1/localize", files={"file": ("scan.dcm", _dicom(row["image_path"]))}, data={"heatmap": "both"}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["method"] == "dense" and body["window_px"] == 64  # a patch classifier keeps its dense map
    image, _ = read_dicom(row["image_path"], flip=False)
    assert body["image_size"] == list(image.shape) and body["boxes"]
    assert all(0 <= b["x0"] < b["x1"] <= image.shape[1] + 32 and b["score"] >= 0.3 for b in body["boxes"])
    assert np.asarray(body["heatmap_array"]).shape == tuple(body["map_shape"])
    png = Image.open(io.BytesIO(__import__("base64").b64decode(body["heatmap_png_base64"])))
    assert png.format == "PNG" and min(png.size) > 100
    direct = backend.runtime.localize("scan.dcm", _dicom(row["image_path"]), threshold=0.3, heatmap="none")
    assert direct["boxes"] == body["boxes"]  # HTTP adds nothing to the computation


def test_health_is_loading_until_the_model_is_loaded(lesion_model, tmp_path):
    settings = ServeSettings(model=str(lesion_model[0]), workdir=str(tmp_path))
    backend = RuntimeBackend(settings)
    client = TestClient(build_api(backend, settings))
    before = client.get("/v1/health")
    assert before.status_code == 503 and before.json()["status"] == "loading"
    assert client.get("/v1/model").status_code == 503
    asyncio.run(backend.load())
    after = client.get("/v1/health")
    assert after.status_code == 200 and after.json()["status"] == "ready"


def test_model_endpoint_and_openapi(lesion_client, lesion_model):
    info = lesion_client.get("/v1/model").json()
    assert info["members"] == 1 and info["source"]["checkpoints"] == [str(lesion_model[0])]
    assert info["config"]["model"]["name"] == "levynet" and info["execution"]["chosen"] == "loop"
    assert "val_auc" in info["metrics"]["member_0_last_epoch"] and info["disclaimer"] == DISCLAIMER
    spec = lesion_client.get("/openapi.json").json()
    assert DISCLAIMER in spec["info"]["description"]
    assert {"/v1/predict", "/v1/localize", "/v1/health", "/v1/model"} <= set(spec["paths"])
    fields = spec["components"]["schemas"]
    assert any("probability" in s.get("properties", {}) for s in fields.values())
    localize = spec["paths"]["/v1/localize"]["post"]
    assert fields["LocalizeReply"]["properties"]["method"]["enum"] == ["dense", "cam", "gradcam"]
    assert localize["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("LocalizeReply")
    form = localize["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    method = fields[form]["properties"]["method"]
    assert "gradcam" in json.dumps(method) and "422" in method["description"]


MEMBER_SHIFTS = (-2.0, 0.0, 0.7, 2.5)  # class-1 logit shifts: four members that disagree, unevenly spaced


@pytest.fixture(scope="module")
def disagreeing_members(lesion_model, tmp_path_factory):
    """(models:/ URI, tracking URI, offline P(malignant) of every test lesion per member (lesions x members))."""
    checkpoint, prepared = lesion_model
    out = tmp_path_factory.mktemp("members")
    members = shifted_members(checkpoint, out, MEMBER_SHIFTS)
    probs = np.stack(
        [
            predict_checkpoint(
                member, "test", prepared.dataset_dir, cache_dir=prepared.cache_dir, splits_path=prepared.splits
            ).frame["prob"]
            for member in members
        ],
        axis=1,
    )
    model_uri, uri = _registered_ensemble(members, out, "disagreeing-members")
    return model_uri, uri, probs


def assert_member_statistics(reported: dict, members: np.ndarray) -> None:
    """What /v1/predict says about the members' probabilities is numpy's mean, std and quantiles of them."""
    assert reported["count"] == len(members)
    assert reported["mean"] == pytest.approx(np.mean(members), abs=1e-5)
    assert reported["std"] == pytest.approx(np.std(members), abs=1e-5)
    quantiles = {f"q{q:02d}": np.quantile(members, q / 100) for q in (5, 25, 50, 75, 95)}
    assert reported["quantiles"] == pytest.approx(quantiles, abs=1e-5)
    assert reported["probabilities"] == pytest.approx(list(members), abs=1e-5)  # each member's, in member order


@pytest.mark.parametrize("execution", ["loop", "stacked"])
def test_served_member_statistics_are_numpys_over_members_that_disagree(
    disagreeing_members, test_lesions, tmp_path, execution
):
    model_uri, uri, probs = disagreeing_members
    settings = ServeSettings(
        model=model_uri, tracking_uri=uri, workdir=str(tmp_path), execution=execution,
        mlflow_ui_url="http://127.0.0.1:5000/",
    )  # fmt: skip
    backend = RuntimeBackend(settings)
    asyncio.run(backend.load())
    client = TestClient(build_api(backend, settings))
    assert backend.runtime.execution["chosen"] == execution and len(backend.runtime.members) == len(MEMBER_SHIFTS)
    # the page links the registered version to its ensemble run in the MLflow UI
    run = MlflowClient(uri).get_run(backend.runtime.source.run_id)
    assert client.get("/v1/model").json()["run_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    )
    for i, row in enumerate(test_lesions.head(4).itertuples()):
        members = probs[i]
        assert np.ptp(members) > 0.3, members  # the members really disagree: mean, median and max differ
        reply = client.post(
            "/v1/predict", files={"file": ("scan.dcm", _dicom(row.image_path))}, data={"box": _box(row.roi_mask_path)}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert_member_statistics(body["members"], members)
        assert body["probability"] == pytest.approx(np.mean(members), abs=1e-5)
        assert body["views"] == {row.view: pytest.approx(np.mean(members), abs=1e-5)}
    # A CC+MLO pair: each member's exam probability is the mean of its two views (paper 000), and the
    # statistics are over those per-member means.
    exam = test_lesions.groupby("exam_key").filter(lambda g: set(g["view"]) == {"CC", "MLO"})
    cc, mlo = (exam.index[exam["view"] == view][0] for view in ("CC", "MLO"))
    reply = client.post(
        "/v1/predict",
        files={
            "cc": ("cc.dcm", _dicom(test_lesions.loc[cc, "image_path"])),
            "mlo": ("mlo.dcm", _dicom(test_lesions.loc[mlo, "image_path"])),
        },
        data={
            "cc_box": _box(test_lesions.loc[cc, "roi_mask_path"]),
            "mlo_box": _box(test_lesions.loc[mlo, "roi_mask_path"]),
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    per_member = (probs[test_lesions.index.get_loc(cc)] + probs[test_lesions.index.get_loc(mlo)]) / 2
    assert_member_statistics(body["members"], per_member)
    assert body["views"] == pytest.approx(
        {"CC": np.mean(probs[test_lesions.index.get_loc(cc)]), "MLO": np.mean(probs[test_lesions.index.get_loc(mlo)])},
        abs=1e-5,
    )
