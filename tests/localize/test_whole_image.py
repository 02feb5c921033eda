"""Whole mammograms through a trained patch classifier (paper 003): geometry, boxes, FROC, the CLI.

One levynet patch model (mass vs no mass, 64-px patches stored at 32 px, global normalisation)
is trained on the tests' tiny synthetic data for a few epochs, without Ray, and shared.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from member_variants import shifted_members
from mlflow import MlflowClient
from PIL import Image
from setups import TINY_TRAIN

import mammo_ray
from mammo_ray.cli import main
from mammo_ray.config import load_config
from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.dicom import read_dicom
from mammo_ray.ensemble.model import Ensemble
from mammo_ray.localize.whole_image import localize_image, prepare_whole_image, read_mammogram, window_geometry

pytestmark = pytest.mark.slow


def _run(capfd, *args: str) -> dict:
    capfd.readouterr()
    assert main([*args, "--json"]) == 0, capfd.readouterr().err[-2000:]
    return json.loads(capfd.readouterr().out)


def test_geometry_and_preprocessing_follow_the_checkpoint(patch_model, mass_image):
    ensemble = Ensemble.from_checkpoints([patch_model[0]])
    geometry = window_geometry(ensemble.config, ensemble.spec)
    assert (geometry.scale, geometry.window, geometry.patch_px) == (0.5, 32, 64)
    image, _ = read_mammogram(mass_image[0])
    x = prepare_whole_image(image, ensemble.spec, geometry)
    assert x.shape == (1, 3, round(image.shape[0] * 0.5), round(image.shape[1] * 0.5))
    spec = ensemble.spec  # global normalisation: the training crops' mean and std
    assert float(x.mean()) == pytest.approx((float(image.mean()) - spec.train_mean) / spec.train_std, abs=0.05)
    with pytest.raises(ValueError, match="data.crop='proportional'"):
        window_geometry(load_config(None, TINY_TRAIN), spec)


def _overlaps(box, gt) -> bool:
    return min(box.x1, gt[2]) > max(box.x0, gt[0]) and min(box.y1, gt[3]) > max(box.y0, gt[1])


def test_boxes_land_on_the_masses_in_original_coordinates(patch_model):
    ensemble = Ensemble.from_checkpoints([patch_model[0]])
    manifest = pd.read_parquet(patch_model[1].manifest)
    rows = manifest[(manifest["abnormality_type"] == "MASS") & (manifest["roi_mask_path"] != "")].iloc[:10]
    hits, flips = 0, set()
    for row in rows.itertuples():
        image, flipped = read_mammogram(row.image_path)
        mask, _ = read_dicom(row.roi_mask_path, flip=False)  # the stored orientation
        found = localize_image(
            list(ensemble.members), ensemble.spec, ensemble.config, image, flipped=flipped, threshold=0.5, tile=64
        )
        flips.add(flipped)
        scores = [b.score for b in found.boxes]
        assert scores == sorted(scores, reverse=True) and all(s >= 0.5 for s in scores)
        heat = found.heatmap()
        assert heat.shape == image.shape and 0 <= heat.min() and heat.max() <= 1
        hits += any(_overlaps(b, mask_bbox(mask > 0)) for b in found.boxes)
    assert flips == {True, False}  # both orientations were mapped back
    assert hits >= 6, hits  # measured 7 of 10 (a chance box would rarely touch a ~25-px mass)


def test_tiles_do_not_change_the_grid(patch_model, mass_image):
    ensemble = Ensemble.from_checkpoints([patch_model[0]])
    image, flipped = read_mammogram(mass_image[0])
    maps = [
        localize_image(
            list(ensemble.members), ensemble.spec, ensemble.config, image, flipped=flipped, tile=tile
        ).dense.probs
        for tile in (None, 64, 100)
    ]
    assert maps[0].shape == maps[1].shape == maps[2].shape
    # levynet pads its convolutions, so tile seams differ a little (exact for valid convs: test_fcn);
    # measured 0.90-0.97 across patch models, 64-px tiles being the worst case
    assert np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1] > 0.85
    assert np.corrcoef(maps[0].ravel(), maps[2].ravel())[0, 1] > 0.85


def test_localize_cli_writes_overlay_and_boxes_and_logs_to_the_run(patch_model, mass_image, tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("localize", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={"mammo_ray.checkpoint": str(patch_model[0])})
    client.set_terminated(run.info.run_id)
    out = _run(
        capfd,
        "localize",
        "--model",
        run.info.run_id,
        "--tracking-uri",
        uri,
        "--image",
        mass_image[0],
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path),
        "--threshold",
        "0.25",
    )
    assert out["boxes"] and set(out["boxes"][0]) >= {"x0", "y0", "x1", "y1", "score"}
    assert out["disclaimer"].startswith("For research use only")
    with Image.open(out["overlay"]) as png:
        assert png.size[0] > 200 and png.size[1] > 200
    saved = json.loads(open(out["boxes_json"]).read())
    assert saved["boxes"] == out["boxes"] and saved["image_size"] == list(read_mammogram(mass_image[0])[0].shape)
    # one code path: the boxes and map of mammo_ray.load's localize (the Serve replica's) for the same file
    found = mammo_ray.load(patch_model[0], workdir=tmp_path).localize(mass_image[0], threshold=0.25)
    assert found["boxes"] == out["boxes"] and found["image_score"] == out["image_score"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "localize/000000")}
    assert "localize/000000/000000_heatmap.png" in logged and "localize/000000/000000_boxes.json" in logged


def test_froc_beats_a_random_heatmap(patch_model, tmp_path, capfd):
    _, prepared = patch_model
    out = _run(
        capfd,
        "froc",
        "--model",
        str(patch_model[0]),
        "--manifest",
        prepared.manifest,
        "--splits",
        prepared.splits,
        "--split",
        "test",
        "--out",
        str(tmp_path / "froc"),
        "--workdir",
        str(tmp_path),
    )
    assert out["n_images"] >= 4 and out["n_rois"] >= 2 and out["skipped"] == []
    # "peak" counts each blob once at its maximum: a random map cannot hide in one big blob there
    assert out["sensitivity_at_1fp"]["peak"] > out["random_sensitivity_at_1fp"]["peak"] + 0.2, out
    # The paper's overlap rule ranks nothing: one big random blob touches every ROI at no FP cost
    # (a random map reaches 1.0 here), which is why "peak" is reported beside it.
    assert 0 <= out["sensitivity_at_1fp"]["overlap"] <= 1 and 0 <= out["random_sensitivity_at_1fp"]["overlap"] <= 1
    assert out["image_auc"] is not None and out["image_auc"] > 0.5
    two = out["two_stage"]
    assert 0 <= two["stage1_accuracy"] <= 1 and two["n_images"] == out["n_images"]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in out["plots"])
    assert len(pd.read_csv(out["per_image"])) == out["n_images"]


def test_explain_and_dream_cli(patch_model, mass_image, tmp_path, capfd):
    image, box = mass_image
    roi = ",".join(str(v) for v in box)
    out = _run(
        capfd,
        "explain",
        "--model",
        str(patch_model[0]),
        "--image",
        image,
        "--box",
        roi,
        "--out",
        str(tmp_path / "explain"),
        "--workdir",
        str(tmp_path),
    )
    assert 0 <= out["probability"] <= 1 and len(out["files"]) == 2
    # one code path: the probability mammo_ray.load (and so the Serve replica) gives the same lesion
    served = mammo_ray.load(patch_model[0], workdir=tmp_path).predict(image, box=box)
    assert out["probability"] == served["probability"] and out["members"] == served["members"]
    outside = ",".join(str(v) for v in (box[0], box[1], box[2] + 100_000, box[3]))
    code = main(["explain", "--model", str(patch_model[0]), "--image", image, "--box", outside,
                 "--out", str(tmp_path / "x"), "--workdir", str(tmp_path), "--json"])  # fmt: skip
    error = json.loads(capfd.readouterr().out)["error"]
    assert code == 1 and error.startswith("--box: ") and "outside" in error, error
    saliency = np.load(out["saliency"])
    assert saliency.shape == (32, 32) and saliency.min() >= 0 and saliency.max() > 0
    for target in ("benign", "malignant"):
        gif = tmp_path / f"dream-{target}.gif"
        dream = _run(
            capfd,
            "dream",
            "--model",
            str(patch_model[0]),
            "--image",
            image,
            "--box",
            roi,
            "--target",
            target,
            "--steps",
            "6",
            "--out",
            str(gif),
            "--workdir",
            str(tmp_path),
        )
        with Image.open(gif) as frames:
            assert frames.n_frames == 7
        scores = dream["scores"]  # P(target) per step: rises towards the target
        assert len(scores) == 7 and scores[-1] > scores[0], (target, scores)


def test_unknown_model_source_is_a_clear_error(tmp_path, capfd):
    capfd.readouterr()
    assert (
        main(
            [
                "localize",
                "--model",
                "not-a-model",
                "--image",
                "x.dcm",
                "--out",
                str(tmp_path),
                "--workdir",
                str(tmp_path),
                "--json",
            ]
        )
        == 1
    )
    assert "--model not-a-model" in json.loads(capfd.readouterr().out)["error"]


def test_a_registered_ensemble_averages_its_members_maps(patch_model, mass_image, tmp_path, capfd):
    """Three members that disagree (the patch model with its mass logit moved by -1.5, 0 and +2):
    the ensemble's map is their mean cell by cell, and its spread their std; the first member, the
    maximum or the median would give other maps."""
    from mammo_ray.ensemble.model import register_ensemble

    members = shifted_members(patch_model[0], tmp_path / "members", (-1.5, 0.0, 2.0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ens", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment)
    registered = register_ensemble(uri, parent.info.run_id, members, [""] * len(members), "patch-ensemble")
    common = ["--image", mass_image[0], "--workdir", str(tmp_path), "--threshold", "0.25"]
    singles = [
        _run(capfd, "localize", "--model", str(member), "--out", str(tmp_path / f"one-{i}"), *common)
        for i, member in enumerate(members)
    ]
    together = _run(
        capfd,
        "localize",
        "--model",
        registered["model_uri"],
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "together"),
        *common,
    )
    maps = np.stack([np.load(single["map"]) for single in singles])
    assert np.abs(maps[2] - maps[0]).max() > 0.2  # the members disagree
    np.testing.assert_allclose(np.load(together["map"]), maps.mean(axis=0), atol=1e-6)  # the members' mean
    assert together["max_spread"] == pytest.approx(float(maps.std(axis=0).max()), abs=1e-6)
    assert together["image_score"] == pytest.approx(float(maps.mean(axis=0).max()), abs=1e-6)
    assert all(single["spread_overlay"] is None for single in singles)
    with Image.open(together["spread_overlay"]) as png:
        assert png.size[0] > 200
    assert together["mlflow_run"] == parent.info.run_id  # logged to the ensemble's run
