"""SimSiam with MixMask's soft loss: projector + predictor, stop-gradient targets.

Chen & He 2021 ("Exploring Simple Siamese Representation Learning").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mixmask.batches import MixedBatch
from mixmask.core.losses import negative_cosine, soft_mix
from mixmask.core.methods.base import MethodParams, RunShape, SiameseMethod, check_head_batchnorm
from mixmask.core.methods.heads import mlp
from mixmask.fields import setting


@dataclass
class SimSiamParams(MethodParams):
    """SimSiam's settings (`method.simsiam.*`); the names are the constructor's keyword arguments."""

    proj_dim: int = setting(2048, "projector output (embedding) dimension", ge=1)
    proj_hidden_dim: int | None = setting(None, "projector hidden width (null = proj_dim, the paper's 2048/2048)",
                                          ge=1)
    proj_layers: int = setting(3, "projector layers (3 on ImageNet, 2 in the SimSiam paper's CIFAR setting)", ge=1)
    pred_hidden_dim: int = setting(512, "predictor bottleneck width", ge=1)

    def check(self, shape: RunShape) -> None:
        check_head_batchnorm(shape)


class SimSiam(SiameseMethod):
    """SimSiam: `L_orig = ½ mean_i D(p1_i, sg(z2_i)) + ½ mean_i D(p2_i, sg(z1_i))`, D = −cos (paper Eq. 2).

    Mixed term (images are mixed view 1): the mixed prediction regresses to sg(z2_i) and sg(z2_π(i)) with weights
    λ_i and 1 − λ_i, in the units of one direction D. Projector: `proj_layers` Linear-BN-ReLU blocks of width
    `proj_hidden_dim` (default: `proj_dim`, the SimSiam paper's 2048/2048) ending in BN (3 for ImageNet, 2 in the
    paper's CIFAR setting); predictor: hidden width `pred_hidden_dim`. Defaults: `SimSiamParams`.
    """

    Params = SimSiamParams

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        proj_dim: int = SimSiamParams.proj_dim,
        proj_hidden_dim: int | None = SimSiamParams.proj_hidden_dim,
        proj_layers: int = SimSiamParams.proj_layers,
        pred_hidden_dim: int = SimSiamParams.pred_hidden_dim,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feature_dim, proj_hidden_dim or proj_dim, proj_dim, num_layers=proj_layers,
                             last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)

    def original_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.projector(self.backbone(view1)), self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine(p1, z2.detach()).mean() + 0.5 * negative_cosine(p2, z1.detach()).mean()
        return loss, z2.detach()

    def mixed_loss(self, batch: MixedBatch, targets: torch.Tensor) -> torch.Tensor:
        z2 = targets
        p = self.predictor(self.projector(self.backbone(batch.images)))
        return soft_mix(negative_cosine(p, z2), negative_cosine(p, z2[batch.perm]), batch.lam)
