"""The shared shape of every Siamese method: original loss, one λ-weighted term per mixed batch, and their sum."""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from mixmask.batches import MixedBatch
from mixmask.errors import UserError
from mixmask.vocab import MIXED_KINDS


@dataclass(frozen=True)
class RunShape:
    """What a method's checks know of the run: the global batch, the processes (None: not launched yet, i.e. at
    config time) and whether BatchNorm is synchronised; `prefix` is the dotted name of the method's config section,
    so an error names the key to change."""

    global_batch: int
    world_size: int | None = None
    sync_bn: bool = False
    prefix: str = "method"

    @property
    def batch_size_per_rank(self) -> int | None:
        return None if self.world_size is None else self.global_batch // self.world_size


@dataclass
class MethodParams:
    """A method's hyper-parameters: one `mixmask.fields.setting` per field (type, default, doc, bounds).

    The run layer shows them as the config section `method.<name>` and builds the method with
    `SiameseMethod.from_params`. Subclasses add the cross-field rules a user can break in `check` (UserError, one
    line, naming the key) and the values they derive from the launch in `derived`.
    """

    def check(self, shape: RunShape) -> None:
        """Raise UserError for settings this run cannot use; runs at config time (`shape.world_size` None) and
        again at start-up, when the processes are known."""

    def derived(self, world_size: int) -> dict[str, Any]:
        """Values computed from the settings and the launch (logged in the run's `computed` block)."""
        return {}

    def launch_note(self, shape: RunShape) -> str | None:
        """A line worth telling the user about how these settings apply to this launch, or None."""
        return None


def check_head_batchnorm(shape: RunShape) -> None:
    """Projection heads with BatchNorm1d need two samples per process in training (SyncBN pools the processes)."""
    per_rank = shape.batch_size_per_rank
    if per_rank is not None and per_rank < 2 and not shape.sync_bn:
        raise UserError(f"data.batch_size={shape.global_batch} on {shape.world_size} processes leaves {per_rank} "
                        "sample per process, and the projection head's BatchNorm needs at least 2: raise "
                        "data.batch_size or set method.sync_bn=true")


class SiameseMethod(nn.Module, abc.ABC):
    """Base class: `forward(view1, view2, mixed)` returns named loss terms, `loss` (their sum) and detached stats.

    Subclasses implement `original_loss` (the base method's loss, returning whatever its mix terms need as
    `targets`) and `mixed_loss` (the soft loss of one MixedBatch against those targets). The mixed images are built
    from view1, so each mixed term regresses/contrasts the mixed view-1 embedding against the view-2 targets t_i and
    t_π(i) (DESIGN.md). `after_step(progress)` runs after each optimizer step.

    Attributes:
        backbone: the plain backbone (what `backbone.pt` exports).
    """

    backbone: nn.Module
    Params: ClassVar[type[MethodParams]] = MethodParams

    @classmethod
    def from_params(cls, params: MethodParams, *, backbone: nn.Module, feature_dim: int, world_size: int = 1,
                    sync_bn: bool = False) -> SiameseMethod:
        """The method with the hyper-parameters of its config section (whose field names are this class's keyword
        arguments unless a subclass maps them); `world_size` and `sync_bn` describe the launch."""
        return cls(backbone=backbone, feature_dim=feature_dim, **asdict(params))

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, mixed: Sequence[MixedBatch] = ()
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one step.

        Shape:
            view1, view2: (B, 3, H, W); each MixedBatch: images (B, 3, H, W), lam (B,), perm (B,)
        Returns:
            `loss_orig`, `loss_<kind>` per MixedBatch, `loss` (to backprop), `lam_mean_<kind>`, `lam_std_<kind>`.
        """
        kinds = [batch.kind for batch in mixed]
        unknown = sorted(set(kinds) - set(MIXED_KINDS))
        if unknown or len(set(kinds)) != len(kinds):
            raise ValueError(f"mixed batches must have distinct kinds among {MIXED_KINDS}, got {kinds}")
        loss_orig, targets = self.original_loss(view1, view2)
        out = {"loss_orig": loss_orig}
        total = loss_orig
        for batch in mixed:
            term = self.mixed_loss(batch, targets)
            out[f"loss_{batch.kind}"] = term
            total = total + term
            lam = batch.lam.detach().float()
            out[f"lam_mean_{batch.kind}"] = lam.mean()
            out[f"lam_std_{batch.kind}"] = lam.std(unbiased=False)
        self.finish_forward(targets)
        out["loss"] = total
        return out

    @abc.abstractmethod
    def original_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The base method's loss on the two views, and the targets the mixed terms use."""

    @abc.abstractmethod
    def mixed_loss(self, batch: MixedBatch, targets: Any) -> torch.Tensor:
        """mean_i[λ_i ℓ(z_i, t_i) + (1 − λ_i) ℓ(z_i, t_π(i))] for the embeddings z of `batch.images`."""

    def finish_forward(self, targets: Any) -> None:
        """State updates that follow the loss (MoCo's enqueue)."""

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called by the loop after each optimizer step; progress = step / total_steps in [0, 1]."""


@torch.no_grad()
def momentum_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1 − momentum)·online, parameter-wise (MoCo Eq. 2; BYOL Eq. 1).

    Buffers (BN running statistics) are left alone: both encoders run BN in training mode, and the target's
    running statistics follow its own forwards, as in the official MoCo code.
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` initialised to its weights, with gradients disabled (momentum / EMA encoders)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
