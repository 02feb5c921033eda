"""The registry and the Classifier contract, parametrised over every registered model."""

import pytest
import torch
from torch import nn

from mammo_ray.models import (
    Classifier,
    ModelInfo,
    UnknownModelError,
    create_model,
    get_model_info,
    list_models,
    register_model,
)
from mammo_ray.models.pretrained import _in

MODELS = list_models()


def test_registry_holds_the_papers_backbones():
    assert MODELS == ["alexnet", "googlenet", "inception_v3", "levynet", "resnet18", "resnet50", "vgg16"]
    assert get_model_info("inception_v3").input_size == 299
    assert get_model_info("resnet18").input_size == 224
    assert get_model_info("resnet50").cam_target_layer == "features.layer4"
    assert [name for name in MODELS if get_model_info(name).gap_fc] == [
        "googlenet",
        "inception_v3",
        "resnet18",
        "resnet50",
    ]


def test_unknown_name_lists_the_registered_models():
    with pytest.raises(UnknownModelError) as err:
        create_model("resnet19")
    assert "'resnet19'" in str(err.value) and "resnet18, resnet50, vgg16" in str(err.value)
    with pytest.raises(UnknownModelError, match="alexnet, googlenet"):
        get_model_info("nope")


def test_duplicate_registration_is_an_error():
    info = get_model_info("resnet18")
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_model("resnet18", info)(lambda **kw: None)
    assert MODELS == list_models()
    with pytest.raises(ValueError, match="info.name"):
        register_model("resnet18_copy", info)


def test_create_model_drops_unset_kwargs():
    model = create_model("levynet", in_chans=None, num_classes=None, dropout=None, pretrained=None, pool_size=None)
    assert (model.in_chans, model.num_classes, model.head_drop.p) == (3, 2, 0.5)
    assert model.pre_logits.fc1.in_features == 64 * 7 * 7  # levynet's default pool_size
    model = create_model("levynet", in_chans=1, num_classes=4, dropout=0.1, pool_size=2)
    assert (model.in_chans, model.num_classes, model.head_drop.p) == (1, 4, 0.1)
    assert model.pre_logits.fc1.in_features == 64 * 2 * 2
    with pytest.raises(ValueError, match="in_chans must be one of"):
        create_model("levynet", in_chans=2)


def _side(info: ModelInfo) -> int:
    return max(64, info.min_input_size)


def _contract_cases():
    # in_chans only changes the input end (the first conv, the DoG bank before it), so 1 and 9
    # run on the quick backbones; the heavy ones (slow to build on 2 cores) are built with 3 only.
    for name in MODELS:
        for in_chans in (1, 3, 9) if name in ("levynet", "resnet18", "resnet50") else (3,):
            yield name, in_chans


@pytest.mark.parametrize(("name", "in_chans"), list(_contract_cases()))
def test_model_contract(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=3, dropout=0.2)
    info = model.info
    assert isinstance(model, Classifier) and info == get_model_info(name)
    assert model.expected_input_channels == (1 if in_chans == 9 else in_chans)
    first_conv = model.get_submodule(info.first_conv)
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == in_chans
    assert model.get_classifier() is model.get_submodule(info.classifier)
    assert isinstance(model.get_classifier(), nn.Linear)

    # Training mode: right shape, finite, and the gradient reaches the first conv.
    x = torch.randn(2, model.expected_input_channels, _side(info), _side(info))
    out = model.train()(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0

    # Eval mode: features are the CAM layer's output, and head(features) is the forward pass.
    model.eval()
    captured = []
    hook = model.get_submodule(info.cam_target_layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        smallest = model(torch.randn(2, model.expected_input_channels, info.min_input_size, info.min_input_size))
    hook.remove()
    assert features.dim() == 4 and features.shape[:2] == (2, info.num_features)
    torch.testing.assert_close(captured[0], features)
    torch.testing.assert_close(model.forward_head(features), logits)
    assert pre_logits.shape == (2, model.head_features)
    assert smallest.shape == (2, 3)
    with pytest.raises(ValueError, match=f"expects input \\(B, {model.expected_input_channels}, H, W\\)"):
        model(torch.randn(2, 2, 64, 64))


@pytest.mark.parametrize("name", MODELS)
def test_layer_groups_partition_the_parameters(name):
    model = create_model(name)
    groups = model.layer_groups()
    assert groups[-1] == ("head", ["fc"])
    for pname, _ in model.named_parameters():
        owners = [group for group, prefixes in groups if _in(pname, prefixes)]
        assert len(owners) == 1, f"{pname} is in groups {owners}"
    for group, prefixes in groups:  # every prefix names a real module with parameters
        for prefix in prefixes:
            assert list(model.get_submodule(prefix).parameters()), f"{group}: {prefix} has no parameters"


def test_reset_classifier():
    model = create_model("resnet18", num_classes=2).eval()
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert torch.count_nonzero(model.fc.bias) == 0
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)
