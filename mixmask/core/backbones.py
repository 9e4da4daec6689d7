"""Torchvision ResNet backbones without their classifier, the CIFAR stem option for 32 and 64 px images, and split
BatchNorm (the MoCo CIFAR recipe on one GPU)."""

from __future__ import annotations

import torch
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


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `num_splits` equal chunks of the batch with its own
    statistics, as `num_splits` devices would; eval uses the running statistics like BatchNorm2d.

    The MoCo CIFAR recipe (the MoCo authors' CIFAR demo, and the Un-Mix CIFAR code the MixMask paper builds on,
    `--bn-splits 8`): on one GPU it gives shuffle-BN something to shuffle. The running statistics move as if every
    chunk updated its own copy and the copies were averaged (the demo's rule): mean ← (1 − m)·mean + m·avg_s μ_s,
    var ← (1 − m)·var + m·avg_s σ²_s with σ²_s unbiased. Parameters and buffers are BatchNorm2d's, so state dicts
    are interchangeable. Written with reductions over a (S, B/S, C, H, W) view, so any memory format (channels_last
    included) and torch.compile work.

    Shape:
        input: (B, C, H, W) with B divisible by `num_splits`
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_splits == 1 or not (self.training or not self.track_running_stats):
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"split BatchNorm: batch {n} is not divisible by num_splits={s}")
        # (S, B/S, C, H, W): splitting dim 0 is a view in every memory format. Statistics in fp32 under autocast.
        xs = x.float().view(s, n // s, c, h, w)
        var, mean = torch.var_mean(xs, dim=(1, 3, 4), correction=0, keepdim=True)  # (S, 1, C, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.view(1, 1, c, 1, 1)
            shift = shift * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        out = (xs * scale + shift).to(x.dtype).reshape(n, c, h, w)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / self.num_batches_tracked.item() if self.momentum is None  # cumulative average
                          else self.momentum)
                count = (n // s) * h * w
                self.running_mean.lerp_(mean.view(s, c).mean(0), factor)
                self.running_var.lerp_(var.view(s, c).mean(0) * (count / max(count - 1, 1)), factor)
        return out


def split_batchnorm_(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every plain BatchNorm2d in `module` by a SplitBatchNorm2d with the same parameters and buffers.

    In place (returns `module`); key names are unchanged, so the state dict still loads into torchvision's ResNet.
    `num_splits=1` leaves the module as it is.
    """
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats,
                                     device=child.weight.device if child.affine else None)
            split.load_state_dict(child.state_dict())
            split.train(child.training)
            if child.affine:
                split.weight.requires_grad_(child.weight.requires_grad)
                split.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, split)
        else:
            split_batchnorm_(child, num_splits)
    return module
