"""MoCo v1 / v2 with MixMask's soft loss: query encoder, momentum key encoder, queue of negatives, shuffle-BN.

He et al. 2020 ("Momentum Contrast", v1: linear head) and Chen et al. 2020 ("Improved Baselines", v2: MLP head);
the mixed term follows the official MixMask code, a MoCo fork: the mixed query's positives are the key of its own
image and the key of the image it was mixed with, against the same queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixmask.batches import MixedBatch
from mixmask.core import distributed
from mixmask.core.losses import info_nce, info_nce_soft
from mixmask.core.methods.base import MethodParams, RunShape, SiameseMethod, frozen_copy, momentum_update_
from mixmask.core.methods.heads import mlp
from mixmask.errors import UserError
from mixmask.fields import setting


@dataclass
class MoCoParams(MethodParams):
    """MoCo's settings (`method.moco.*`). Defaults: MixMask Table 8's small-dataset dim, K, m and T, with the v2
    head (the small-dataset presets choose v1)."""

    mlp_head: bool = setting(True, "MLP projection head (v2; hidden width = the backbone's feature width, as in the "
                                   "official code) instead of a linear one (v1)")
    dim: int = setting(128, "embedding dimension of queries, keys and the queue", ge=1)
    queue_size: int = setting(4096, "negative queue length K (a multiple of the global batch)", ge=1)
    momentum: float = setting(0.99, "key-encoder momentum m", ge=0.0, le=1.0)
    temperature: float = setting(0.1, "InfoNCE softmax temperature T", gt=0.0)
    shuffle_bn: bool = setting(True, "shuffle BatchNorm across ranks for the key encoder (in one process: across "
                                     "the BN splits); off under method.sync_bn")
    bn_splits: int = setting(1, "one process only: split BatchNorm, statistics over S equal chunks of the batch "
                                "(the MoCo CIFAR recipe: 8); with more processes each rank's BN is a split and this "
                                "is 1", ge=1)

    def bn_splits_in_use(self, world_size: int) -> int:
        """Split BatchNorm stands in for several devices' BN in one process; with more processes every rank's BN
        already sees its own share of the batch and shuffle-BN applies, so it is off (1)."""
        return self.bn_splits if world_size == 1 else 1

    def check(self, shape: RunShape) -> None:
        key = shape.prefix
        if self.queue_size % shape.global_batch:
            fit = self.queue_size - self.queue_size % shape.global_batch or shape.global_batch
            raise UserError(f"{key}.queue_size={self.queue_size} must be a multiple of the global batch "
                            f"{shape.global_batch} (each step enqueues the whole batch's keys); pick e.g. {fit}")
        if shape.world_size is None:
            return
        splits, per_rank = self.bn_splits_in_use(shape.world_size), shape.batch_size_per_rank
        if per_rank % splits:
            raise UserError(f"{key}.bn_splits={splits} must divide the batch per process {per_rank} "
                            "(data.batch_size / world size)")
        if splits > 1 and shape.sync_bn:
            raise UserError(f"method.sync_bn=true and {key}.bn_splits={splits} exclude each other (one normalises "
                            f"across processes, the other within one); set {key}.bn_splits=1")

    def derived(self, world_size: int) -> dict:
        return {"bn_splits": self.bn_splits_in_use(world_size)}

    def launch_note(self, shape: RunShape) -> str | None:
        if self.bn_splits > 1 and shape.world_size is not None and shape.world_size > 1:
            return (f"{shape.prefix}.bn_splits={self.bn_splits} is for one process; with {shape.world_size} "
                    "processes each rank's BatchNorm is a split and shuffle-BN applies")
        return None


class MoCo(SiameseMethod):
    """MoCo: `L_orig = InfoNCE(q(view1), k(view2), queue)`, asymmetric as in the official code.

    Defaults are the CIFAR-100 recipe of MixMask's Table 8 (dim 128, K 4096, m 0.99, T 0.1); ImageNet uses
    K 65536, m 0.999, T 0.2. The momentum update runs at the *start* of forward, before the keys are computed, as
    in the official MoCo code (so the first step's keys come from an encoder equal to the query encoder, and a
    resumed run reproduces the same sequence). The queue enqueues the keys gathered from all ranks in rank order,
    after the loss, so a step never contrasts against its own keys.

    Shuffle-BN (default) permutes the key batch across ranks so the key encoder's per-device BN statistics do not
    leak which samples are positives. `sync_bn=True` converts both encoders to SyncBatchNorm instead (shuffling then
    is redundant; turn it off with `shuffle_bn=False`).

    In one process, plain BN sees the whole batch and shuffling changes nothing; `bn_splits=S` (the MoCo CIFAR
    recipe: the MoCo authors' CIFAR demo and the Un-Mix CIFAR code, S = 8) makes both encoders' BatchNorm2d
    split BatchNorm, statistics over S chunks as on S devices, and shuffle-BN then permutes the key batch within
    the process so a key's chunk holds other samples than its query's.
    """

    Params = MoCoParams

    @classmethod
    def from_params(cls, params: MethodParams, *, backbone: nn.Module, feature_dim: int, world_size: int = 1,
                    sync_bn: bool = False) -> MoCo:
        assert isinstance(params, MoCoParams)
        # MoCo v2's MLP hidden width is the backbone's feature width (512 for ResNet-18, 2048 for ResNet-50), as in
        # the official code (mlp_hidden_dim=None); SyncBN makes shuffling redundant.
        return cls(backbone=backbone, feature_dim=feature_dim, version=2 if params.mlp_head else 1, dim=params.dim,
                   mlp_hidden_dim=None, queue_size=params.queue_size, momentum=params.momentum,
                   temperature=params.temperature, shuffle_bn=params.shuffle_bn and not sync_bn, sync_bn=sync_bn,
                   bn_splits=params.bn_splits_in_use(world_size))

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        version: int = 2,
        dim: int = MoCoParams.dim,
        mlp_hidden_dim: int | None = None,
        queue_size: int = MoCoParams.queue_size,
        momentum: float = MoCoParams.momentum,
        temperature: float = MoCoParams.temperature,
        shuffle_bn: bool = MoCoParams.shuffle_bn,
        sync_bn: bool = False,
        bn_splits: int = MoCoParams.bn_splits,
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"moco version must be 1 (linear head) or 2 (MLP head), got {version}")
        if sync_bn and bn_splits > 1:
            raise ValueError("moco: sync_bn and bn_splits > 1 are exclusive (one normalises across devices, the "
                             "other within one)")
        if sync_bn:
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
        # Imported here: backbones loads torchvision, which the config (importing MoCoParams) does not need.
        from mixmask.core.backbones import split_batchnorm_

        self.backbone = split_batchnorm_(backbone, bn_splits)
        self.bn_splits = bn_splits
        if version == 1:
            self.head: nn.Module = nn.Linear(feature_dim, dim)
        else:
            self.head = mlp(feature_dim, mlp_hidden_dim or feature_dim, dim, hidden_bn=False)
        self.backbone_k = frozen_copy(self.backbone)
        self.head_k = frozen_copy(self.head)
        self.momentum = momentum
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, dim) unit keys
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        """Query embeddings (not normalised; the losses normalise in fp32).

        Shape:
            images: (B, 3, H, W) → (B, dim)
        """
        return self.head(self.backbone(images))

    @torch.no_grad()
    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 keys from the momentum encoder, through shuffle-BN when enabled.

        Shape:
            images: (B, 3, H, W) → (B, dim)
        """
        local_shuffle = self.shuffle_bn and self.bn_splits > 1
        if self.shuffle_bn:
            images, idx_unshuffle = distributed.batch_shuffle(images)
        if local_shuffle:  # the CIFAR demo's single-GPU shuffle: keys land in other BN splits than their queries
            local_perm = torch.randperm(images.shape[0], device=images.device)
            images = images[local_perm]
        k = F.normalize(self.head_k(self.backbone_k(images)).float(), dim=1)
        if local_shuffle:
            k = k[torch.argsort(local_perm)]
        if self.shuffle_bn:
            k = distributed.batch_unshuffle(k, idx_unshuffle)
        return k

    def original_loss(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            momentum_update_(self.backbone_k, self.backbone, self.momentum)
            momentum_update_(self.head_k, self.head, self.momentum)
            k = self.encode_key(view2)
        # Autograd keeps the negatives for backward, and the enqueue below writes the queue in place: snapshot it.
        negatives = self.queue.clone()
        q = self.encode_query(view1)
        return info_nce(q, k, negatives, self.temperature).mean(), (k, negatives)

    def mixed_loss(self, batch: MixedBatch, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k, negatives = targets
        q = self.encode_query(batch.images)
        return info_nce_soft(q, k, k[batch.perm], negatives, batch.lam, self.temperature)

    @torch.no_grad()
    def finish_forward(self, targets: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._enqueue(distributed.concat_all_gather(targets[0]))

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest queue rows with `keys` (the gathered batch, in rank order).

        Shape:
            keys: (N, dim), N the global batch; the queue size must be a multiple of N.
        """
        queue_size, global_batch = self.queue.shape[0], keys.shape[0]
        if queue_size % global_batch:
            raise ValueError(
                f"moco queue_size={queue_size} must be a multiple of the global batch {global_batch}; "
                f"pick e.g. {queue_size - queue_size % global_batch or global_batch}"
            )
        # The pointer stays on the device: index arithmetic instead of `int(ptr)` keeps the step free of a
        # host sync (the official code reads it on the host every step).
        rows = (self.queue_ptr + torch.arange(global_batch, device=keys.device)) % queue_size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.add_(global_batch).remainder_(queue_size)
