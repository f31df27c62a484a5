"""backbone.py against torchvision: key names, shapes, parameter counts and outputs; freeze_at; MSRA init."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from backbone import ResNet, resnet50, resnet101, resnet152, resnext, vgg16
from norm import FrozenBatchNorm2d, GroupNorm

TV_RESNET50_PARAMS = 25_557_032  # torchvision.models.resnet50 documentation ("num_params")
FC_PARAMS = 2048 * 1000 + 1000  # the ImageNet classifier that our trunk leaves out


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _without_classifier(state_dict, prefixes=("fc.",)):
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _randomize_bn(model, seed=0):
    """Non-trivial BN buffers and affine parameters, so that a wrong mapping of BN tensors shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.weight.copy_(torch.rand(C, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)


# ------------------------------------------------------------------------------------------------------ ResNet

def test_resnet50_parameter_count_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        n_tv = sum(p.numel() for p in tv.models.resnet50().parameters())
        n_gn = sum(p.numel() for p in resnet50(norm="gn").parameters())
        n_bn = sum(p.numel() for p in resnet50(norm="bn").parameters())
    assert n_tv == TV_RESNET50_PARAMS
    assert n_gn + FC_PARAMS == TV_RESNET50_PARAMS  # GN has BN's affine parameters, one gamma/beta per channel
    assert n_bn == n_gn


def test_resnet50_output_strides_channels_and_norm_everywhere():
    model = resnet50(norm="gn")
    assert model.out_channels == [256, 512, 1024, 2048]
    # 1 stem + 16 blocks x 3 + 4 projection shortcuts = 53 norm layers, one after every conv.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    assert len(convs) == len(norms) == 53
    assert all(c.bias is None for c in convs)  # the norm's shift replaces the bias
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["C2", "C3", "C4", "C5"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4),
                                                       (1, 2048, 2, 2)]


def test_resnet50_loads_torchvision_weights_and_matches_its_features():
    tv = pytest.importorskip("torchvision")
    ref = tv.models.resnet50(weights=None).eval()
    _randomize_bn(ref)
    ours = resnet50(norm="frozen_bn").eval()
    ours.load_state_dict(_without_classifier(ref.state_dict()))  # strict; BN's num_batches_tracked is dropped
    getter = tv.models._utils.IntermediateLayerGetter(
        ref, return_layers={"layer1": "C2", "layer2": "C3", "layer3": "C4", "layer4": "C5"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = getter(x), ours(x)
    for name in ("C2", "C3", "C4", "C5"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozen_bn"])
def test_resnet50_bn_kinds_have_torchvision_keys(norm):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        expected = _shapes(_without_classifier(tv.models.resnet50().state_dict()))
        got = _shapes(resnet50(norm=norm).state_dict())
    if norm == "frozen_bn":  # no BN counter in a frozen layer
        expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert got == expected


def test_resnet50_gn_keys_are_torchvision_keys_without_running_stats():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        expected = _shapes(_without_classifier(tv.models.resnet50().state_dict()))
        got = _shapes(resnet50(norm="gn").state_dict())
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert got == {k: v for k, v in expected.items() if not k.endswith(buffers)}


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_deeper_resnets_have_torchvision_keys_and_shapes(name):
    tv = pytest.importorskip("torchvision")
    ours_builder = {"resnet101": resnet101, "resnet152": resnet152}[name]
    with torch.device("meta"):
        expected = _shapes(_without_classifier(getattr(tv.models, name)().state_dict()))
        got = _shapes(ours_builder(norm="bn").state_dict())
    assert got == expected


def test_resnext101_32x8d_has_torchvision_keys_and_shapes():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        expected = _shapes(_without_classifier(tv.models.resnext101_32x8d().state_dict()))
        got = _shapes(resnext(depth=101, groups=32, width_per_group=8, norm="bn").state_dict())
    assert got == expected


def test_resnext152_8x32d_and_32x8d_differ_only_in_grouping():
    with torch.device("meta"):
        x8x32 = resnext(depth=152, groups=8, width_per_group=32)  # the paper's "ResNeXt-152 8x32d" (Table 3)
        x32x8 = resnext(depth=152, groups=32, width_per_group=8)  # Detectron's X-152-32x8d
    assert x8x32.layer1[0].conv2.groups == 8 and x32x8.layer1[0].conv2.groups == 32
    # Both have 256 channels in res2's 3x3 conv (8 x 32 = 32 x 8); each filter sees 256 / groups input channels.
    assert tuple(x8x32.layer1[0].conv2.weight.shape) == (256, 32, 3, 3)
    assert tuple(x32x8.layer1[0].conv2.weight.shape) == (256, 8, 3, 3)
    assert tuple(x8x32.layer4[0].conv2.weight.shape) == (2048, 256, 3, 3)
    assert len(x8x32.layer3) == 36 and x8x32.out_channels == [256, 512, 1024, 2048]


@pytest.mark.parametrize("freeze_at, frozen", [
    (0, ()), (1, ("conv1.", "bn1.")), (2, ("conv1.", "bn1.", "layer1.")),
    (5, ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."))])
def test_freeze_at(freeze_at, frozen):
    model = ResNet(layers=(1, 1, 1, 1), width_per_group=16, num_groups=8, freeze_at=freeze_at)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name


@pytest.mark.parametrize("norm", ["gn", "syncbn", "bn", "frozen_bn"])
def test_resnet_trains_with_every_norm(norm):
    # A training step through every layer (in-place ReLUs after each norm included); with frozen_bn only the convs
    # learn. A projection of C5 by a random tensor, as GN would cancel a plain sum.
    model = ResNet(layers=(1, 1, 1, 1), width_per_group=16, num_groups=8, norm=norm).train()
    x = torch.randn(2, 3, 32, 32)  # C5 is 1x1: BN still sees 2 values per channel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # syncbn's single-process warning, tested in test_norm.py
        C5 = model(x)["C5"]
    (C5 * torch.randn_like(C5)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_msra_init():
    model = resnet50(norm="gn")
    w = model.layer4[0].conv2.weight  # (512, 512, 3, 3): 2.4M samples, the std estimate is good to < 0.2 %
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.02  # He et al. 2015: std = sqrt(2 / fan_out)
    assert abs(w.mean().item()) < 0.01 * math.sqrt(2.0 / fan_out)  # zero-mean normal
    for m in model.modules():
        if isinstance(m, GroupNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_msra_init_uses_fan_out_not_fan_in():
    # A 1x1 conv with fan_in != fan_out: layer4[0].conv3 is (2048, 512, 1, 1), fan_out 2048 and fan_in 512, so
    # fan_out gives std sqrt(2 / 2048) = 0.03125 and fan_in twice that (1M samples: the estimate is good to < 0.2 %).
    w = resnet50(norm="gn").layer4[0].conv3.weight
    assert tuple(w.shape) == (2048, 512, 1, 1)
    assert abs(w.std().item() / 0.03125 - 1) < 0.02


def test_frozen_bn_resnet_has_no_norm_parameters():
    model = resnet50(norm="frozen_bn")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53
    conv_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == conv_params  # only the convs train


# --------------------------------------------------------------------------------------------------------- VGG16

def test_vgg16_matches_torchvision_features_up_to_conv5_3():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        tv_features = tv.models.vgg16().features  # 31 modules; ours drops the last one, pool5 (no parameters)
    tv_features = tv_features.to_empty(device="cpu")
    ours = vgg16().eval()
    assert _shapes(ours.state_dict()) == {f"features.{k}": v for k, v in _shapes(tv_features.state_dict()).items()}
    assert sum(p.numel() for p in ours.parameters()) == 14_714_688  # the 13 convs of VGG-16, D column
    assert isinstance(tv_features[30], nn.MaxPool2d) and len(ours.features) == 30
    tv_features.load_state_dict({k[len("features."):]: v for k, v in ours.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        expected = tv_features[:30](x)  # conv5_3 + ReLU, before pool5
    assert list(out) == ["C5"] and out["C5"].shape == (1, 512, 4, 4)  # stride 16
    assert ours.out_channels == [512]
    torch.testing.assert_close(out["C5"], expected)
