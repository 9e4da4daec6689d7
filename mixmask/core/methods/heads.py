"""Projection and prediction heads of the Siamese methods (shapes per each method's paper)."""

from __future__ import annotations

import torch.nn as nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    num_layers: int = 2,
    hidden_bn: bool = True,
    last_bn: bool = False,
) -> nn.Sequential:
    """Linear(→hidden) [BN] ReLU, repeated `num_layers − 1` times, then Linear(→out) [BN without affine].

    - MoCo v2 (Chen et al. 2020b): 2 layers, no BN.
    - SimCLR (Chen et al. 2020a) and BYOL (Grill et al. 2020) projector/predictor: 2 layers, hidden BN.
    - SimSiam (Chen & He 2021): projector 3 layers with BN after the output too; predictor 2-layer bottleneck.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        # The bias is redundant right before BN.
        layers += [nn.Linear(dim, hidden_dim, bias=not hidden_bn)]
        if hidden_bn:
            layers += [nn.BatchNorm1d(hidden_dim)]
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers += [nn.Linear(dim, out_dim, bias=not last_bn)]
    if last_bn:
        layers += [nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*layers)
