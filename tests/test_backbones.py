"""Backbones keep torchvision's key names, drop the classifier, and build the CIFAR stem."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from mixmask.core.backbones import SplitBatchNorm2d, build_backbone, cifar_stem_, split_batchnorm_
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


def reference_split_bn(x, weight, bias, running_mean, running_var, splits, momentum=0.1, eps=1e-5):
    """Per-chunk BatchNorm written with the stock functional op: each chunk normalised by its own statistics and
    updating its own copy of the running statistics; the copies are then averaged (the MoCo CIFAR demo's rule)."""
    outs, means, variances = [], [], []
    for chunk in x.chunk(splits):
        rm, rv = running_mean.clone(), running_var.clone()
        outs.append(torch.nn.functional.batch_norm(chunk, rm, rv, weight, bias, True, momentum, eps))
        means.append(rm)
        variances.append(rv)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_normalises_each_split_with_its_own_statistics(channels_last):
    torch.manual_seed(0)
    splits, channels = 4, 3
    # each split gets its own offset and scale, so shared statistics would give visibly different outputs
    x = torch.randn(8, channels, 5, 5) * torch.arange(1, 9).view(8, 1, 1, 1) + torch.arange(8).view(8, 1, 1, 1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bn = SplitBatchNorm2d(channels, splits)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.2, 0.0, -0.1]))
        bn.running_var.copy_(torch.tensor([1.5, 1.0, 0.7]))
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    x_in = x.detach().clone().requires_grad_()
    expected, mean_ref, var_ref = reference_split_bn(x_ref, weight, bias, bn.running_mean.clone(),
                                                     bn.running_var.clone(), splits)
    got = bn(x_in)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, mean_ref)
    torch.testing.assert_close(bn.running_var, var_ref)
    assert int(bn.num_batches_tracked) == 1
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    # ... and each split's output is standardised on its own B/S samples (not on the whole batch)
    for chunk in ((got - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1)).detach().chunk(splits):
        torch.testing.assert_close(chunk.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-5, rtol=0)
    whole = nn.BatchNorm2d(channels).train()(x)
    assert not torch.allclose(whole, (got - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1), atol=1e-2)
    # gradients match the per-chunk reference too
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


def test_split_bn_eval_uses_running_statistics_like_batchnorm():
    torch.manual_seed(1)
    bn = SplitBatchNorm2d(3, 4)
    for _ in range(3):
        bn(torch.randn(8, 3, 4, 4) * 2 + 1)  # move the running statistics off their initial values
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    bn.eval()
    plain.eval()
    x = torch.randn(5, 3, 4, 4)  # any batch size in eval, not only multiples of the splits
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn(x), (x - bn.running_mean.view(1, -1, 1, 1))
                               / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1)
                               + bn.bias.view(1, -1, 1, 1))
    bn.train()
    with pytest.raises(ValueError, match="not divisible"):
        bn(x)


def test_split_bn_backbone_keeps_torchvision_keys_and_one_split_is_plain_bn():
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    split_batchnorm_(backbone, 8)
    assert isinstance(backbone.bn1, SplitBatchNorm2d) and isinstance(backbone.layer4[1].bn2, SplitBatchNorm2d)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in backbone.modules()) == 20
    state = backbone.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    result = cifar_stem_(torchvision.models.resnet18(weights=None)).load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    # one split is BatchNorm2d exactly
    x = torch.randn(4, 3, 6, 6)
    one = SplitBatchNorm2d(3, 1)
    torch.testing.assert_close(one(x), nn.BatchNorm2d(3)(x))
    assert split_batchnorm_(nn.Sequential(nn.BatchNorm2d(3)), 1)[0].__class__ is nn.BatchNorm2d


def test_split_bn_compiles_without_graph_breaks():
    torch.manual_seed(2)
    bn, twin = SplitBatchNorm2d(3, 2), SplitBatchNorm2d(3, 2)
    x = torch.randn(4, 3, 4, 4).to(memory_format=torch.channels_last)
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), twin(x))
    torch.testing.assert_close(bn.running_mean, twin.running_mean)
    torch.testing.assert_close(bn.running_var, twin.running_var)
