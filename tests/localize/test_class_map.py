"""Whole-image CAM and Grad-CAM (paper 004) next to dense maps (paper 003): method choice, maps, boxes, CLI.

Untrained tiny models are enough for shapes, ranges and coordinates; where a map must land on a
lesion, a hand-set GAP+FC blob detector (channel 0 fires on bright tissue and drives class 1)
says where it should.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mammo_ray.cli import main
from mammo_ray.config import load_config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.localize.class_map import class_map_scale, localize_class_map
from mammo_ray.localize.methods import MethodUnavailable, choose_method, default_method, localize, method_reasons
from mammo_ray.localize.whole_image import read_mammogram
from mammo_ray.models import Classifier, ModelInfo
from mammo_ray.models.views import build_view_model
from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint

SMALL = ["data.cache_px=40", "data.input_px=32", "data.normalization=global", "model.dropout=0.0"]
CROP = [*SMALL, "data.crop=proportional", "data.task=pathology"]  # what `make demo` serves
PATCH = [*SMALL, "data.crop=patch", "data.task=mass_presence", "data.patch_px=64", "data.cache_px=32"]
SHAPE = (200, 120)  # (H, W) of the synthetic mammogram


def _model(*overrides: str) -> tuple[nn.Module, object, TransformSpec]:
    torch.manual_seed(0)
    config = load_config(None, list(overrides))
    spec = TransformSpec.from_config(config.data, train_mean=100.0, train_std=50.0)
    return build_view_model(config.model).eval(), config, spec


def _mammogram() -> np.ndarray:
    """Breast tissue on the left, a bright disc (the lesion) at row 140, col 40."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    image = np.where(xx < 80, 90.0, 0.0) + 60.0 * ((yy - 140) ** 2 + (xx - 40) ** 2 <= 12**2)
    return image.astype(np.float32)


def _blob_detector() -> tuple[nn.Module, object, TransformSpec]:
    """A GAP+FC classifier whose class-1 CAM is the local brightness above 0.5 (1-channel input)."""
    info = ModelInfo(
        "blob_detector",
        32,
        8,
        2,
        "features",
        "features.conv",
        (("trunk", ("features",)), ("head", ("fc",))),
        gap_fc=True,
    )
    features = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 5, padding=2), act=nn.ReLU(), pool=nn.MaxPool2d(4)))
    model = Classifier(info, features, num_features=2, in_chans=1).eval()
    with torch.no_grad():
        features.conv.weight.copy_(torch.stack([torch.full((1, 5, 5), 1 / 25), torch.full((1, 5, 5), -1 / 25)]))
        features.conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        model.fc.weight.copy_(torch.tensor([[0.0, 0.02], [1.0, 0.0]]))
        model.fc.bias.zero_()
    config = load_config(None, [*CROP, "data.channels=1", "model.in_chans=1"])
    return model, config, TransformSpec.from_config(config.data, train_mean=0.0, train_std=1.0)


# ---- method choice ---------------------------------------------------------------------------


def test_each_model_gets_its_method_and_a_reason_for_the_others():
    resnet, crop_config, spec = _model(*CROP, "model.name=resnet18")
    levynet, _, _ = _model(*CROP, "model.name=levynet")
    patch, patch_config, patch_spec = _model(*PATCH, "model.name=levynet")
    assert choose_method([resnet], crop_config, spec) == "cam"  # GAP+FC crop classifier
    assert choose_method([levynet], crop_config, spec) == "gradcam"  # an MLP head: CAM is not defined
    assert choose_method([resnet, levynet], crop_config, spec) == "gradcam"  # one method for all members
    assert choose_method([patch], patch_config, patch_spec) == "dense"  # paper 003's patch classifier
    assert choose_method([patch], patch_config, patch_spec, "gradcam") == "gradcam"
    with pytest.raises(MethodUnavailable, match="'cam' is not available.*levynet does not"):
        choose_method([levynet], crop_config, spec, "cam")
    with pytest.raises(MethodUnavailable, match="'dense'.*data.crop='proportional' crops vary in size") as error:
        choose_method([resnet], crop_config, spec, "dense")
    assert error.value.method == "dense" and "patch" in error.value.reason
    with pytest.raises(ValueError, match="method must be one of"):
        choose_method([resnet], crop_config, spec, "saliency")
    multimodal = load_config(None, [*CROP, "model.view_mode=multimodal"])
    reasons = method_reasons([resnet], multimodal, spec)
    assert default_method(multimodal, reasons) is None and all("multimodal" in r for r in reasons.values())


def test_the_scale_follows_the_crop_mode():
    _, crop_config, spec = _model(*CROP)
    _, patch_config, patch_spec = _model(*PATCH)
    assert class_map_scale(crop_config, spec, SHAPE)[0] == pytest.approx(4 * 32 / 200)  # 4 inputs on the long side
    assert class_map_scale(patch_config, patch_spec, SHAPE)[0] == pytest.approx(32 / 64)  # cache_px / patch_px
    assert class_map_scale(crop_config, spec, SHAPE, long_side=100)[0] == pytest.approx(0.5)
    whole = load_config(None, [*SMALL, "data.crop=whole", "data.whole_size=[100, 40]"])
    assert class_map_scale(whole, spec, SHAPE)[0] == pytest.approx(min(100 / 200, 40 / 120))


# ---- maps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method", "rows"), [("resnet18", "cam", 4), ("resnet18", "gradcam", 4), ("levynet", "gradcam", 16)]
)
def test_class_maps_are_relative_maps_on_the_whole_image(name, method, rows):
    model, config, spec = _model(*CROP, f"model.name={name}")
    image = _mammogram()
    found = localize_class_map([model], spec, config, image, method=method, threshold=0.5)
    # 4 x 32 px on the long side: 128 x 77 network px; resnet18 stride 32 -> 4 rows, levynet stride 8 -> 16
    h, w = found.dense.probs.shape
    assert (h, w) == (rows, round(77 / (128 / rows)))
    assert found.method == method and found.map_scale == pytest.approx(200 / rows)  # original px per cell
    assert np.isfinite(found.dense.probs).all() and found.dense.probs.min() >= 0 and found.dense.probs.max() <= 1
    assert found.dense.probs.max() == pytest.approx(1.0) or found.dense.probs.max() == 0  # min-max per member
    assert 0 <= found.image_score <= 1 and found.spread.max() == 0  # one member: no spread
    heat = found.heatmap()
    assert heat.shape == SHAPE and 0 <= heat.min() and heat.max() <= 1
    assert found.boxes and all(b.score >= 0.5 for b in found.boxes)
    for b in found.boxes:  # original pixels: inside the 200 x 120 image, whole cells of ~200 / rows px
        assert 0 <= b.x0 < b.x1 <= SHAPE[1] + found.map_scale and 0 <= b.y0 < b.y1 <= SHAPE[0]
    described = found.to_dict()
    assert described["method"] == method and described["window_px"] is None and "min-max" in described["map_values"]


@pytest.mark.parametrize("method", ["cam", "gradcam"])
@pytest.mark.parametrize("flipped", [False, True])
def test_the_map_and_its_box_land_on_the_lesion_in_stored_pixels(method, flipped):
    model, config, spec = _blob_detector()
    canonical = np.zeros((64, 96), dtype=np.float32)
    yy, xx = np.mgrid[:64, :96]
    canonical[(yy - 40) ** 2 + (xx - 20) ** 2 <= 6**2] = 1.0  # the disc, in the canonical frame
    found = localize_class_map(
        [model], spec, config, canonical, method=method, flipped=flipped, long_side=96, threshold=0.5
    )  # scale 1: 16 x 24 cells of 4 px
    assert found.dense.probs.shape == (16, 24) and found.map_scale == pytest.approx(4.0)
    centre_x = 95 - 20 if flipped else 20  # where the disc is in the stored image
    box = found.boxes[0]
    assert len(found.boxes) == 1 and box.x0 <= centre_x < box.x1 and box.y0 <= 40 < box.y1
    assert (box.x1 - box.x0) <= 24 and (box.y1 - box.y0) <= 24  # about the disc's 13 px, in 4-px cells
    heat = found.heatmap()
    row, col = np.unravel_index(int(heat.argmax()), heat.shape)
    assert abs(row - 40) <= 6 and abs(col - centre_x) <= 6
    assert found.image_score > 0.5  # the bright disc drives class 1


def test_dense_runs_through_the_same_entry_point():
    model, config, spec = _model(*PATCH, "model.name=levynet")
    found = localize([model], spec, config, _mammogram(), threshold=0.5, tile=None)
    assert found.method == "dense" and found.to_dict()["window_px"] == 64
    # 100 x 60 network px, 32-px windows at stride 8: 9 x 4 cells; values are probabilities
    assert found.dense.probs.shape == (9, 4) and found.score is None
    assert 0 <= found.dense.probs.min() and found.dense.probs.max() <= 1
    assert found.image_score == pytest.approx(float(found.dense.probs.max()))


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_members_that_disagree_are_averaged_and_their_spread_is_their_std(method):
    """Three resnet18 members of different seeds: the map is the mean of the members' own (min-max)
    maps, scaled again, the spread their std and the image score their mean probability; neither
    the first member, the maximum nor the median would give these."""
    config = load_config(None, [*CROP, "model.name=resnet18"])
    spec = TransformSpec.from_config(config.data, train_mean=100.0, train_std=50.0)
    members = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        members.append(build_view_model(config.model).eval())
    image = _mammogram()
    singles = [localize_class_map([m], spec, config, image, method=method) for m in members]
    together = localize_class_map(members, spec, config, image, method=method)
    maps = np.stack([s.dense.probs for s in singles])
    assert maps.min() == 0 and maps.max() == 1  # each member's map is min-max scaled on its own
    mean = maps.mean(axis=0)
    np.testing.assert_allclose(together.dense.probs, (mean - mean.min()) / (mean.max() - mean.min()), atol=1e-6)
    np.testing.assert_allclose(together.spread, maps.std(axis=0), atol=1e-6)
    assert together.spread.max() > 0.1  # they do disagree
    scores = [s.image_score for s in singles]
    assert together.image_score == pytest.approx(np.mean(scores), abs=1e-6)
    assert np.ptp(scores) > 1e-4 and together.to_dict()["max_spread"] == pytest.approx(float(together.spread.max()))


# ---- CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A resnet18 crop-classifier checkpoint, a levynet patch-classifier checkpoint and a PNG mammogram."""
    d = tmp_path_factory.mktemp("class-map")
    out = {}
    for key, overrides in (("crop", [*CROP, "model.name=resnet18"]), ("patch", [*PATCH, "model.name=levynet"])):
        model, config, spec = _model(*overrides)
        out[key] = save_checkpoint(checkpoint_payload(model=model, config=config, spec=spec, epoch=0), d / key)
    out["image"] = d / "mammogram.png"
    Image.fromarray(_mammogram().astype(np.uint8)).save(out["image"])
    return out


def _run(capfd, *args: str) -> tuple[int, dict]:
    capfd.readouterr()
    code = main([*args, "--json"])
    return code, json.loads(capfd.readouterr().out)


@pytest.mark.parametrize(
    ("model", "method", "expected"), [("crop", None, "cam"), ("crop", "gradcam", "gradcam"), ("patch", None, "dense")]
)
def test_localize_cli_states_its_method(files, tmp_path, capfd, model, method, expected):
    extra = ["--method", method] if method else []
    code, out = _run(
        capfd,
        "localize",
        "--model",
        str(files[model]),
        "--image",
        str(files["image"]),
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path),
        "--threshold",
        "0.5",
        *extra,
    )
    assert code == 0, out
    assert out["method"] == expected and out["disclaimer"].startswith("For research use only")
    saved = json.loads(open(out["boxes_json"]).read())
    assert saved["method"] == expected and saved["boxes"] == out["boxes"] and saved["image_size"] == list(SHAPE)
    assert all(0 <= b["x0"] < b["x1"] and 0 <= b["y0"] < b["y1"] <= SHAPE[0] for b in out["boxes"])
    with Image.open(out["overlay"]) as png:
        assert png.format == "PNG" and min(png.size) > 100
    assert np.load(out["map"]).shape == tuple(out["map_shape"])
    image, _ = read_mammogram(files["image"])
    assert image.shape == SHAPE


def test_localize_cli_refuses_a_method_the_model_cannot_do(files, tmp_path, capfd):
    code, out = _run(
        capfd,
        "localize",
        "--model",
        str(files["crop"]),
        "--image",
        str(files["image"]),
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path),
        "--method",
        "dense",
    )
    assert code == 1 and "method 'dense' is not available" in out["error"] and "proportional" in out["error"]
