"""BYOL with MixMask's soft loss: online projector + predictor, EMA target with the cosine τ schedule.

Grill et al. 2020 ("Bootstrap Your Own Latent").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mixmask.batches import MixedBatch
from mixmask.core.losses import byol_regression, soft_mix
from mixmask.core.methods.base import (
    MethodParams,
    RunShape,
    SiameseMethod,
    check_head_batchnorm,
    frozen_copy,
    momentum_update_,
)
from mixmask.core.methods.heads import mlp
from mixmask.fields import setting


@dataclass
class BYOLParams(MethodParams):
    """BYOL's settings (`method.byol.*`); the names are the constructor's keyword arguments."""

    proj_hidden_dim: int = setting(1024, "projector hidden width (Linear-BN-ReLU-Linear)", ge=1)
    proj_dim: int = setting(256, "projector output (embedding) dimension", ge=1)
    pred_hidden_dim: int | None = setting(None, "predictor hidden width (null = proj_hidden_dim)", ge=1)
    base_tau: float = setting(0.99, "target EMA decay at the start; it follows a cosine to 1 at the end", ge=0.0,
                              le=1.0)

    def check(self, shape: RunShape) -> None:
        check_head_batchnorm(shape)


def cosine_tau(base_tau: float, progress: float) -> float:
    """BYOL's target decay τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2, from τ_base at 0 to 1 at the end
    (Grill et al. 2020, section 3.2); progress = step / total_steps."""
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOL(SiameseMethod):
    """BYOL: `L_orig = mean_i ℓ(p1_i, z2'_i) + mean_i ℓ(p2_i, z1'_i)` with ℓ = 2 − 2 cos (symmetrised as in the
    paper), p the online predictions and z' the target projections (no gradient).

    Mixed term (images are mixed view 1): the mixed prediction regresses to z2'_i and z2'_π(i) with weights λ_i and
    1 − λ_i, in the units of one direction of `L_orig`. The target is updated in `after_step` with τ from
    `cosine_tau(base_tau, progress)`.

    Defaults (`BYOLParams`): MixMask Table 8 small-dataset projector width 1024 (read as the hidden width), output
    256, τ 0.99.
    """

    Params = BYOLParams

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = BYOLParams.proj_hidden_dim,
        proj_dim: int = BYOLParams.proj_dim,
        pred_hidden_dim: int | None = BYOLParams.pred_hidden_dim,
        base_tau: float = BYOLParams.base_tau,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feature_dim, proj_hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, pred_hidden_dim or proj_hidden_dim, proj_dim)
        self.backbone_t = frozen_copy(backbone)
        self.projector_t = frozen_copy(self.projector)
        self.base_tau = base_tau
        self.tau = base_tau  # the last τ used, for logging

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Online predictions. Shape: images (B, 3, H, W) → (B, proj_dim)."""
        return self.predictor(self.projector(self.backbone(images)))

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Target projections, no gradient. Shape: images (B, 3, H, W) → (B, proj_dim)."""
        return self.projector_t(self.backbone_t(images))

    def original_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p1, p2 = self.predict(view1), self.predict(view2)
        z1_t, z2_t = self.target(view1), self.target(view2)
        loss = byol_regression(p1, z2_t).mean() + byol_regression(p2, z1_t).mean()
        return loss, z2_t

    def mixed_loss(self, batch: MixedBatch, targets: torch.Tensor) -> torch.Tensor:
        z2_t = targets
        p = self.predict(batch.images)
        return soft_mix(byol_regression(p, z2_t), byol_regression(p, z2_t[batch.perm]), batch.lam)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        self.tau = cosine_tau(self.base_tau, progress)
        momentum_update_(self.backbone_t, self.backbone, self.tau)
        momentum_update_(self.projector_t, self.projector, self.tau)
