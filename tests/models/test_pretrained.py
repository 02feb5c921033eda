"""Local ImageNet weights, first-conv channel adaptation and the fine-tuning policies."""

import pytest
import torch
import torchvision.models as tvm

from mammo_ray.models import (
    PretrainedWeightsError,
    create_model,
    create_view_model,
    fine_tune_multipliers,
    freeze,
    hub_cache_path,
    param_groups,
    weights_url,
)

TORCHVISION_HEAD = ("fc.", "aux1.", "aux2.", "AuxLogits.")  # replaced or left out by the wrapper


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(0)
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.parametrize(
    "name, tv_kwargs",
    [
        ("resnet18", {}),
        ("googlenet", dict(aux_logits=True, init_weights=True)),  # the ImageNet file holds the aux classifiers
    ],
)
def test_loading_a_state_dict_file_gives_identical_trunk_weights(tmp_path, name, tv_kwargs):
    reference = getattr(tvm, name)(weights=None, **tv_kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(name, pretrained=path, num_classes=2)
    wrapped = model.state_dict()
    compared = 0
    for key, value in reference.state_dict().items():
        if key.startswith(TORCHVISION_HEAD):
            continue
        torch.testing.assert_close(wrapped[f"features.{key}"], value, rtol=0, atol=0)
        compared += 1
    assert compared == len(wrapped) - 2  # everything but the new fc.weight / fc.bias
    assert model.fc.weight.shape == (2, model.head_features) and torch.count_nonzero(model.fc.bias) == 0
    assert not any(k.startswith(("aux", "features.aux")) for k in wrapped)


def test_alexnet_keeps_the_imagenet_fc6_fc7(tmp_path):
    reference = tvm.alexnet(weights=None)
    torch.save(reference.state_dict(), tmp_path / "alexnet.pth")
    model = create_model("alexnet", pretrained=tmp_path / "alexnet.pth")
    torch.testing.assert_close(model.features[3].weight, reference.features[3].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.pre_logits.fc6.weight, reference.classifier[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.pre_logits.fc7.bias, reference.classifier[4].bias, rtol=0, atol=0)
    assert model.fc.out_features == 2


def test_one_channel_kernel_is_the_rgb_sum(resnet18_file):
    reference, path = resnet18_file
    model = create_model("resnet18", in_chans=1, pretrained=path).eval()
    rgb = reference.conv1.weight
    torch.testing.assert_close(model.features.conv1.weight, rgb.sum(dim=1, keepdim=True))
    # ... so a grayscale image gives what the RGB network gives on it replicated to 3 channels.
    gray = torch.randn(2, 1, 64, 64)
    rgb_model = create_model("resnet18", in_chans=3, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(gray), rgb_model.forward_features(gray.expand(-1, 3, -1, -1)))


def test_nine_channel_kernel_is_rgb_sum_then_zeros(resnet18_file):
    reference, path = resnet18_file
    model = create_model("resnet18", in_chans=9, pretrained=path).eval()
    weight = model.features.conv1.weight
    assert weight.shape == (64, 9, 7, 7) and model.expected_input_channels == 1
    torch.testing.assert_close(weight[:, :1], reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.count_nonzero(weight[:, 1:]) == 0
    one = create_model("resnet18", in_chans=1, pretrained=path).eval()
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # the DoG channels start switched off: the same features as the 1-channel model
        torch.testing.assert_close(model.forward_features(gray), one.forward_features(gray))
    model.train()(gray).sum().backward()
    assert weight.grad[:, 1:].abs().sum() > 0  # ... and they learn from the first step


def test_scratch_adaptation_keeps_the_output_scale():
    torch.manual_seed(0)
    rgb = create_model("resnet50", in_chans=3).features.conv1.weight
    one = create_model("resnet50", in_chans=1).features.conv1.weight
    nine = create_model("resnet50", in_chans=9).features.conv1.weight
    # Var(conv output) ~ in_chans * Var(w) for unit-variance input: the same for 1, 3 and 9 channels.
    for weight, n in [(one, 1), (nine, 9)]:
        assert weight.shape[1] == n
        assert abs(n * weight.var().item() / (3 * rgb.var().item()) - 1) < 0.1


def test_missing_hub_file_names_the_url_and_the_place(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_url("resnet18") == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert hub_cache_path("resnet18") == expected
    with pytest.raises(PretrainedWeightsError) as err:
        create_model("resnet18", pretrained="imagenet")
    message = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and str(expected) in message
    # Put the file where the message says, and it loads.
    reference = tvm.resnet18(weights=None)
    expected.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), expected)
    model = create_model("resnet18", pretrained="imagenet")
    torch.testing.assert_close(model.features.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_bad_weight_files_are_named(tmp_path, resnet18_file):
    _, path = resnet18_file
    with pytest.raises(PretrainedWeightsError, match=r"not found: .*nope\.pth.*resnet18-f37072fd\.pth"):
        create_model("resnet18", pretrained=tmp_path / "nope.pth")
    with pytest.raises(PretrainedWeightsError, match="does not match torchvision's resnet50"):
        create_model("resnet50", pretrained=path)
    (tmp_path / "junk.pth").write_text("<html>404</html>")
    with pytest.raises(PretrainedWeightsError, match="junk.pth: not a readable state dict"):
        create_model("resnet18", pretrained=tmp_path / "junk.pth")
    with pytest.raises(PretrainedWeightsError, match="levynet has no ImageNet weights"):
        create_model("levynet", pretrained=path)


def test_param_groups_set_the_papers_learning_rates():
    model = create_model("resnet18")
    multipliers = fine_tune_multipliers(model, train_last=1)  # paper 001 "shallow"
    assert multipliers == {"stem": 0.1, "layer1": 0.1, "layer2": 0.1, "layer3": 0.1, "layer4": 1.0}
    groups = param_groups(model, base_lr=0.01, weight_decay=5e-4, multipliers=multipliers)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr == pytest.approx(
        {
            "stem": 0.001,
            "layer1": 0.001,
            "layer2": 0.001,
            "layer3": 0.001,
            "layer4": 0.01,
            "head.weight": 0.1,
            "head.bias": 0.2,
        }
    )
    by_name = {g["name"]: g["params"] for g in groups}
    assert by_name["head.weight"] == [model.fc.weight] and by_name["head.bias"] == [model.fc.bias]
    assert len(by_name["stem"]) == 3  # conv1.weight, bn1.weight, bn1.bias
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    optimizer = torch.optim.SGD(groups, lr=0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]
    with pytest.raises(ValueError, match=r"unknown layer group\(s\) \['layer5'\]"):
        param_groups(model, 0.01, 0.0, {"layer5": 1.0})
    with pytest.raises(ValueError, match="head_weight_mult"):
        param_groups(model, 0.01, 0.0, {"head": 1.0})


def test_googlenet_policies_of_paper_001():
    model = create_model("googlenet")
    assert fine_tune_multipliers(model, train_last=1) == {
        "stem": 0.1,
        "inception3": 0.1,
        "inception4": 0.1,
        "inception5a": 0.1,
        "inception5b": 1.0,
    }
    assert fine_tune_multipliers(model, train_last=2)["inception5a"] == 1.0  # "deeper"
    groups = param_groups(model, 0.01, 1e-3, fine_tune_multipliers(model, 2))
    assert {g["name"]: g["lr_mult"] for g in groups}["inception4"] == 0.1


def test_freeze_stops_only_the_named_groups():
    model = create_view_model("resnet18", "multimodal")
    frozen = freeze(model, ["stem", "layer1", "layer2"])
    assert frozen and all(n.startswith(("cc.features.", "mlo.features.")) for n in frozen)
    for name, param in model.named_parameters():
        in_frozen = any(f".features.{g}" in name for g in ("conv1", "bn1", "layer1", "layer2"))
        assert param.requires_grad is not in_frozen, name
    groups = param_groups(model, 1e-4, 0.0, head_weight_mult=20, head_bias_mult=20)  # paper 004
    assert {g["name"] for g in groups} == {"layer3", "layer4", "head.weight", "head.bias"}
    assert {g["name"]: g["lr"] for g in groups}["head.bias"] == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="unknown layer group"):
        freeze(model, ["layer9"])
