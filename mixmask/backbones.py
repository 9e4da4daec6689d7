"""Torchvision ResNet backbones without their classifier, with the CIFAR stem option for 32 and 64 px images."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from mixmask.errors import choice_error

_ARCHS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}


def cifar_stem_(model: nn.Module) -> nn.Module:
    """Replace a torchvision ResNet's stem in place by the CIFAR one: 3×3 conv, stride 1, no max-pool.

    The small-image stem of the SimCLR CIFAR recipe (Chen et al. 2020, appendix B.9), used by MixMask's CIFAR-100 and
    Tiny-ImageNet runs. Key names are unchanged; only `conv1.weight`'s shape differs from torchvision's.
    """
    out_channels = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_backbone(arch: str, *, cifar_stem: bool, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet with `fc = Identity`, and its feature width.

    Its `state_dict()` loads into `torchvision.models.<arch>()` with exactly `fc.weight` and `fc.bias` missing
    (with the CIFAR stem, into a torchvision ResNet whose stem was replaced by `cifar_stem_`).
    """
    if arch not in _ARCHS:
        raise choice_error("backbone", arch, _ARCHS)
    model = _ARCHS[arch](weights=None, zero_init_residual=zero_init_residual)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if cifar_stem:
        cifar_stem_(model)
    return model, feature_dim
