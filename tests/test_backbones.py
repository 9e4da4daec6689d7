"""Backbones keep torchvision's key names, drop the classifier, and build the CIFAR stem."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from mixmask.backbones import build_backbone, cifar_stem_
from mixmask.errors import UserError


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_state_dict_loads_into_torchvision_with_only_fc_missing(arch, width):
    backbone, feature_dim = build_backbone(arch, cifar_stem=False)
    assert feature_dim == width
    reference = getattr(torchvision.models, arch)(weights=None)
    result = reference.load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(reference.conv1.weight, backbone.conv1.weight)


def test_cifar_stem_state_dict_loads_into_torchvision_with_the_same_stem():
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    assert backbone.conv1.weight.shape == (64, 3, 3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    reference = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError, match="conv1.weight"):
        reference.load_state_dict(backbone.state_dict(), strict=False)  # the stock 7×7 stem does not fit
    result = cifar_stem_(reference).load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_features_and_resolution_of_the_cifar_stem():
    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True)
    backbone.eval()
    feats = {}
    backbone.layer4.register_forward_hook(lambda m, i, o: feats.update(map=o.shape))
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feature_dim)
    assert feats["map"][-2:] == (4, 4)  # 32 px / 8: the CIFAR stem keeps full resolution into layer1


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    backbone, _ = build_backbone("resnet18", cifar_stem=True, zero_init_residual=True)
    assert torch.count_nonzero(backbone.layer1[0].bn2.weight) == 0
    default, _ = build_backbone("resnet18", cifar_stem=True)
    assert torch.count_nonzero(default.layer1[0].bn2.weight) > 0


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="resnet18"):
        build_backbone("resnet181", cifar_stem=False)
