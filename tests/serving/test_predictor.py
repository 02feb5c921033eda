"""``mammo_ray.load``: a model in this process, without Ray. Its predictions equal the HTTP app's and the
offline evaluation's (one code path: the Serve replica's ``ModelRuntime``), for a path, bytes or an
array; a pair averages its views; localize gives the heatmap and boxes in original pixels; bad input
raises an error naming the argument."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

import mammo_ray
from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.dicom import read_dicom
from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.runtime import ServeSettings
from mammo_ray.serving.uploads import UploadError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(lesion_model, tmp_path_factory):
    return mammo_ray.load(lesion_model[0], workdir=tmp_path_factory.mktemp("load"), execution="loop")


def test_a_path_bytes_and_an_array_give_the_offline_probability(model, lesions):
    for row in lesions.head(3).itertuples():
        stored, _ = read_dicom(row.image_path, flip=False)  # the pixels as a viewer shows them
        answers = [
            model.predict(row.image_path, box=row.box),
            model.predict(Path(row.image_path).read_bytes(), box=list(row.box)),
            model.predict(stored, box=np.array(row.box)),
        ]
        for answer in answers:
            assert answer["probability"] == pytest.approx(row.prob, abs=1e-5), row.lesion_id
            assert answer["label"] == ("malignant" if answer["probability"] >= 0.5 else "benign")
            assert answer["members"]["count"] == 1 and answer["disclaimer"] == DISCLAIMER
        assert answers[0]["views"] == {row.view: pytest.approx(row.prob, abs=1e-5)}  # the DICOM names its view
        assert answers[2]["views"] == {"image": pytest.approx(row.prob, abs=1e-5)}  # an array does not


def test_the_python_api_and_http_give_the_same_reply(model, lesion_model, lesions, tmp_path):
    settings = ServeSettings(model=str(lesion_model[0]), workdir=str(tmp_path), execution="loop")
    backend = RuntimeBackend(settings)
    asyncio.run(backend.load())
    client = TestClient(build_api(backend, settings))
    row = lesions.iloc[1]
    box = ",".join(map(str, row.box))
    http = client.post(
        "/v1/predict", files={"file": ("scan.dcm", Path(row.image_path).read_bytes())}, data={"box": box}
    )
    assert http.status_code == 200, http.text
    local = model.predict(row.image_path, box=row.box)
    assert set(local) == set(http.json())
    assert local["probability"] == pytest.approx(http.json()["probability"], abs=1e-6)
    members = http.json()["members"]
    assert local["members"]["quantiles"] == pytest.approx(members.pop("quantiles"), abs=1e-6)
    assert local["members"]["probabilities"] == pytest.approx(members.pop("probabilities"), abs=1e-6)
    assert {k: local["members"][k] for k in members} == pytest.approx(members, abs=1e-6)


def test_a_pair_averages_its_views(model, lesions):
    exam = lesions.groupby("exam_key").filter(lambda g: set(g["view"]) == {"CC", "MLO"})
    cc, mlo = (exam[exam["view"] == v].iloc[0] for v in ("CC", "MLO"))
    answer = model.predict(cc=cc.image_path, mlo=mlo.image_path, cc_box=cc.box, mlo_box=mlo.box)
    assert answer["views"]["CC"] == pytest.approx(cc.prob, abs=1e-5)
    assert answer["views"]["MLO"] == pytest.approx(mlo.prob, abs=1e-5)
    assert answer["probability"] == pytest.approx((cc.prob + mlo.prob) / 2, abs=1e-5)  # paper 000, per exam


def test_bad_input_names_the_argument(model, lesions, tmp_path):
    row = lesions.iloc[0]
    cases = [
        (lambda: model.predict(tmp_path / "missing.dcm"), 400, "image", "missing.dcm"),
        (lambda: model.predict(b"not an image at all" * 10), 400, "image", "not a DICOM"),
        (lambda: model.predict(np.zeros((4, 5, 3))), 415, "image", "2-D"),
        (lambda: model.predict(np.full((8, 8), np.nan)), 400, "image", "NaN"),
        (lambda: model.predict(row.image_path, box=(0, 0, 10_000, 10)), 422, "box", "outside the image"),
        (lambda: model.predict(row.image_path, box=(5, 5, 1)), 422, "box", "expected 4"),
        (lambda: model.predict(row.image_path, cc=row.image_path), 422, "image", "not both"),
        (lambda: model.predict(cc=row.image_path), 422, "mlo", "missing 'mlo'"),
        (lambda: model.predict(42), 422, "image", "got int"),
    ]
    for call, status, field, words in cases:
        with pytest.raises(UploadError) as info:
            call()
        assert (info.value.status, info.value.field) == (status, field), info.value
        assert words in str(info.value)
    assert model.predict(row.image_path, box=row.box)["probability"] == pytest.approx(row.prob, abs=1e-5)


def test_localize_gives_the_heatmap_and_boxes_in_original_pixels(patch_model, tmp_path):
    checkpoint, prepared = patch_model
    model = mammo_ray.load(checkpoint, workdir=tmp_path, execution="loop")
    manifest = pd.read_parquet(prepared.manifest)
    image_path = manifest.loc[manifest["roi_mask_path"] != "", "image_path"].iloc[0]
    stored, _ = read_dicom(image_path, flip=False)
    found = model.localize(image_path)
    assert found["method"] == "dense" and found["disclaimer"] == DISCLAIMER
    assert found["heatmap"].shape == stored.shape == found["spread"].shape
    assert found["heatmap"].dtype == np.float32 and 0 <= found["heatmap"].min() <= found["heatmap"].max() <= 1
    assert float(found["heatmap"].max()) <= found["image_score"] + 1e-6  # the map grid's maximum, resampled
    for box in found["boxes"]:
        assert 0 <= box["x0"] < box["x1"] <= stored.shape[1] and 0 <= box["y0"] < box["y1"] <= stored.shape[0]
    http = model.runtime.localize(Path(image_path).name, Path(image_path).read_bytes(), heatmap="none")
    assert found["boxes"] == http["boxes"] and found["image_score"] == pytest.approx(http["image_score"])
    mirrored = model.localize(np.fliplr(stored))  # the same film, breast on the other side
    np.testing.assert_allclose(mirrored["heatmap"], np.fliplr(found["heatmap"]), atol=1e-5)


def test_info_gives_the_lineage(model, lesion_model):
    info = model.info()
    assert info["version"] == str(lesion_model[0]) and info["members"] == 1
    assert info["task"] == "pathology" and info["disclaimer"] == DISCLAIMER
    assert "levynet" in repr(model) and DISCLAIMER in repr(model)


def test_load_from_the_command_line_prints_a_probability_and_the_disclaimer(lesion_model, lesions, tmp_path):
    row = lesions.iloc[0]
    code = (
        "import mammo_ray; "
        f"m = mammo_ray.load({str(lesion_model[0])!r}, workdir={str(tmp_path)!r}); "
        f"print(m.predict({row.image_path!r}, box={tuple(int(v) for v in row.box)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    reply = ast.literal_eval(out.strip().splitlines()[-1])  # the printed dict
    assert reply["probability"] == pytest.approx(row.prob, abs=1e-5) and reply["disclaimer"] == DISCLAIMER


def test_a_model_with_a_decision_policy_calibrates_and_refers(lesion_model, lesions, model, tmp_path):
    """The policy fitted on val travels in the checkpoint: the reply's calibrated probability, operating
    labels and referral follow it; a model without one says so instead of inventing numbers."""
    import shutil

    from mammo_ray.train.checkpoint import store_decisions
    from mammo_ray.train.evaluation import evaluate_checkpoint

    checkpoint, prepared = lesion_model
    copy = tmp_path / "decided" / "checkpoint.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    val = evaluate_checkpoint(
        copy, "val", tmp_path, tmp_path / "val", n_boot=0, cache_dir=prepared.cache_dir, splits_path=prepared.splits
    )
    policy = val.policy
    store_decisions(copy, policy.to_dict())
    decided = mammo_ray.load(copy, workdir=tmp_path, execution="loop")
    assert decided.info()["decisions"]["calibration"]["method"] == "temperature"
    for row in lesions.head(4).itertuples():
        answer = decided.predict(row.image_path, box=row.box)
        p = answer["probability"]
        assert p == pytest.approx(row.prob, abs=1e-5)  # the raw probability is unchanged
        assert answer["calibrated_probability"] == pytest.approx(float(policy.calibration(np.array([p]))[0]))
        u = answer["uncertainty"]
        assert u["std"] == 0 and u["mutual_information"] == 0  # one network: no disagreement
        assert u["entropy"] == pytest.approx(u["expected_entropy"]) and 0 < u["entropy"] <= 1
        assert answer["refer"]["refer"] == (u["entropy"] > policy.referral_cutoff)
        assert answer["refer"]["cutoff"] == policy.referral_cutoff and "10%" in answer["refer"]["reason"]
        q = answer["calibrated_probability"]
        expected = [("malignant" if q >= o.threshold else "benign") for o in policy.operating_points]
        assert [o["label"] for o in answer["operating_points"]] == expected
    plain = model.predict(lesions.iloc[0].image_path, box=lesions.iloc[0].box)
    assert plain["calibrated_probability"] is None and plain["operating_points"] == []
    assert plain["refer"]["refer"] is None and "no decision policy" in plain["refer"]["reason"]
