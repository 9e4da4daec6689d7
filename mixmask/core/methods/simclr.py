"""SimCLR with MixMask's soft loss: NT-Xent over the batch gathered across ranks with gradient.

Chen et al. 2020 ("A Simple Framework for Contrastive Learning"), projector Linear-BN-ReLU-Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixmask.batches import MixedBatch
from mixmask.core import distributed
from mixmask.core.losses import info_nce_soft, nt_xent, self_pair_mask
from mixmask.core.methods.base import MethodParams, RunShape, SiameseMethod, check_head_batchnorm
from mixmask.core.methods.heads import mlp
from mixmask.fields import setting


@dataclass
class SimCLRParams(MethodParams):
    """SimCLR's settings (`method.simclr.*`); the names are the constructor's keyword arguments."""

    proj_hidden_dim: int = setting(1024, "projector hidden width (Linear-BN-ReLU-Linear)", ge=1)
    proj_dim: int = setting(128, "projector output (embedding) dimension", ge=1)
    temperature: float = setting(0.5, "NT-Xent softmax temperature", gt=0.0)

    def check(self, shape: RunShape) -> None:
        check_head_batchnorm(shape)


class SimCLR(SiameseMethod):
    """SimCLR: `L_orig` = NT-Xent over both views (symmetric), negatives = the 2N − 2 other embeddings of the global
    batch, gathered from every rank with gradient.

    Mixed term (the images are mixed view 1): the mixed query z_i has positives z2_i and z2_π(i) (view-2
    embeddings), weighted λ_i and 1 − λ_i, against the same negatives: every gathered view-1 and view-2 embedding
    except those of samples i and π(i), since neither image present in the mix is a negative for it (2N − 4
    negatives; 2N − 2 when π(i) = i, as for `erase`, where λ = 1 gives exactly the NT-Xent row of the mixed query).
    The permutation is local to each rank, as the mixing operator is.

    Defaults (`SimCLRParams`): MixMask Table 8 small-dataset projector width 1024 (read as the hidden width),
    output 128, T 0.5 (SimCLR's CIFAR setting is T 0.5).
    """

    Params = SimCLRParams

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = SimCLRParams.proj_hidden_dim,
        proj_dim: int = SimCLRParams.proj_dim,
        temperature: float = SimCLRParams.temperature,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feature_dim, proj_hidden_dim, proj_dim)
        self.temperature = temperature

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 projections.

        Shape:
            images: (B, 3, H, W) → (B, proj_dim)
        """
        return F.normalize(self.projector(self.backbone(images)).float(), dim=1)

    def original_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.embed(view1), self.embed(view2)
        z1_all, z2_all = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
        offset = distributed.get_rank() * z1.shape[0]
        loss = nt_xent(z1, z2, self.temperature, z1_all=z1_all, z2_all=z2_all, offset=offset)
        return loss, {"z2": z2, "candidates": torch.cat([z1_all, z2_all]), "offset": offset}

    def mixed_loss(self, batch: MixedBatch, targets: dict) -> torch.Tensor:
        z2, candidates, offset = targets["z2"], targets["candidates"], targets["offset"]
        q = self.embed(batch.images)
        own = offset + torch.arange(q.shape[0], device=q.device)
        neg_mask = self_pair_mask(own, offset + batch.perm, candidates.shape[0] // 2)
        return info_nce_soft(q, z2, z2[batch.perm], candidates, batch.lam, self.temperature, neg_mask)
