"""View modes (paper 000): single, parallel (shared weights, exam = mean of softmaxes), multimodal."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mammo_ray.config import ModelConfig
from mammo_ray.models import (
    VIEW_MODES,
    Classifier,
    MultiViewClassifier,
    build_view_model,
    create_view_model,
    get_model_info,
    list_models,
    param_groups,
)


def _batch(model, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, model.expected_input_channels, side, side, generator=g)


def _check_view_model(name, in_chans, view_mode):
    side = get_model_info(name).min_input_size
    model = create_view_model(name, view_mode, in_chans=in_chans, num_classes=3).eval()
    assert model.view_mode == view_mode and model.num_classes == 3
    assert model.expected_input_channels == (1 if in_chans == 9 else in_chans)
    cc, mlo = _batch(model, side, 1), _batch(model, side, 2)
    with torch.no_grad():
        logits = model((cc, mlo)) if view_mode == "multimodal" else model(cc)
        probs = model.predict_exam(cc, mlo)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


# Every backbone in every view mode. The in_chans axis changes only the Classifier's input end,
# which test_registry covers for every model; here it is crossed with the view modes on two
# cheap backbones to keep the suite fast on 2 cores.
@pytest.mark.parametrize("view_mode", VIEW_MODES)
@pytest.mark.parametrize("name", list_models())
def test_every_backbone_in_every_view_mode(name, view_mode):
    _check_view_model(name, 3, view_mode)


@pytest.mark.parametrize("view_mode", VIEW_MODES)
@pytest.mark.parametrize("in_chans", [1, 9])
@pytest.mark.parametrize("name", ["levynet", "resnet18"])
def test_view_modes_with_one_and_nine_channels(name, in_chans, view_mode):
    _check_view_model(name, in_chans, view_mode)


def test_single_and_parallel_are_the_same_network():
    single = create_view_model("levynet", "single")
    parallel = create_view_model("levynet", "parallel")
    assert type(single) is type(parallel) is Classifier
    assert (single.view_mode, parallel.view_mode) == ("single", "parallel")
    assert single.state_dict().keys() == parallel.state_dict().keys()  # checkpoints interchange


def test_parallel_exam_prediction_is_the_mean_of_the_view_softmaxes():
    model = create_view_model("resnet18", "parallel").eval()
    cc, mlo = _batch(model, 64, 1), _batch(model, 64, 2)
    with torch.no_grad():
        expected = (F.softmax(model(cc), dim=1) + F.softmax(model(mlo), dim=1)) / 2
        torch.testing.assert_close(model.predict_exam(cc, mlo), expected)
        assert not torch.allclose(model.predict_exam(cc, mlo), F.softmax(model(cc), dim=1))


def test_multimodal_uses_both_views():
    torch.manual_seed(0)
    model = create_view_model("resnet18", "multimodal", in_chans=1).eval()
    cc, mlo = _batch(model, 64, 1), _batch(model, 64, 2)
    with torch.no_grad():
        out = model((cc, mlo))
        torch.testing.assert_close(model(cc, mlo), out)  # the two call forms agree
        assert not torch.allclose(model((cc, _batch(model, 64, 3))), out)
        assert not torch.allclose(model((_batch(model, 64, 3), mlo)), out)
        torch.testing.assert_close(model.predict_exam(cc, mlo), F.softmax(out, dim=1))
        features = model.forward_features((cc, mlo))
        assert [f.shape for f in features] == [(2, 512, 2, 2)] * 2
        torch.testing.assert_close(model.forward_head(features), out)
        assert model.forward_head(features, pre_logits=True).shape == (2, 1024)  # two GAP vectors
    with pytest.raises(ValueError, match=r"\(cc, mlo\) pair"):
        model(cc)


def test_multimodal_branches_have_separate_weights():
    model = create_view_model("levynet", "multimodal", in_chans=9, dropout=0.1)
    assert isinstance(model, MultiViewClassifier) and model.head_drop.p == 0.1
    cc_ptrs = {p.data_ptr() for p in model.cc.parameters()}
    assert cc_ptrs.isdisjoint(p.data_ptr() for p in model.mlo.parameters())
    assert not torch.allclose(model.cc.features.block1.conv.weight, model.mlo.features.block1.conv.weight)
    assert isinstance(model.cc.get_classifier(), nn.Identity)  # the joint fc is the only head
    assert model.fc.in_features == 2 * 64
    before = model.mlo.features.block1.conv.weight.detach().clone()
    loss = F.cross_entropy(model.train()((_batch(model, 32, 1), _batch(model, 32, 2))), torch.tensor([0, 1]))
    loss.backward()
    assert model.cc.features.block1.conv.weight.grad.abs().sum() > 0  # both branches learn
    assert model.mlo.features.block1.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.cc.features.block1.conv.weight.add_(1.0)
    torch.testing.assert_close(model.mlo.features.block1.conv.weight.detach(), before)


def test_multimodal_layer_groups_name_both_branches():
    model = create_view_model("resnet18", "multimodal")
    groups = dict(model.layer_groups())
    assert groups["layer4"] == ["cc.features.layer4", "mlo.features.layer4"]
    assert groups["head"] == ["fc"]
    optim_groups = param_groups(model, base_lr=1e-3, weight_decay=0.0, multipliers={"layer4": 1.0}, default_mult=0.1)
    assert sum(len(g["params"]) for g in optim_groups) == len(list(model.parameters()))


def test_build_view_model_from_config():
    cfg = ModelConfig(name="levynet", view_mode="multimodal", in_chans=9, num_classes=2, dropout=0.2)
    model = build_view_model(cfg)
    assert isinstance(model, MultiViewClassifier)
    assert (model.in_chans, model.expected_input_channels, model.num_classes, model.head_drop.p) == (9, 1, 2, 0.2)
    assert build_view_model(ModelConfig(name="levynet", view_mode="parallel")).view_mode == "parallel"
    with pytest.raises(ValueError, match="unknown view_mode 'stereo'"):
        create_view_model("levynet", "stereo")
