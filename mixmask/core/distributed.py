"""Process-group helpers the methods use: rank queries, gathers with and without gradient, shuffle-BN.

Every helper works without a process group (plain `python train.py`): rank 0, world size 1, gathers return their
input. Nothing here reads environment variables; `mixmask.run.launch` initialises the group from torchrun's `env://`.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# torch 2.14 marks this public autograd gather deprecated in favour of `torch.distributed._functional_collectives`,
# a private module; the public one is correct on the pinned torch (tests/test_methods_distributed.py checks the
# gradients on gloo), so its once-per-rank FutureWarning is not shown to users. Revisit when torch removes it.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


def is_distributed() -> bool:
    """True when a default process group exists and spans more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order, without gradient (MoCo's keys for the queue).

    Shape:
        x: (B, ...) with the same B on every rank → (world_size·B, ...)
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order, letting gradients flow back to every rank's input.

    Each rank's loss uses the whole gathered batch, so the gradient of rank r's input is the sum over ranks of the
    gradients flowing into slice r: torch's autograd all_gather does that sum (a reduce-scatter), and DDP then
    averages parameter gradients as usual (SimCLR, Chen et al. 2020, cross-replica negatives).

    Shape:
        x: (B, ...) with the same B on every rank → (world_size·B, ...)
    """
    if not is_distributed():
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks for MoCo's shuffle-BN; returns this rank's shuffled slice and the
    index that undoes it.

    Rank 0 draws the permutation and broadcasts it, so every rank agrees (He et al. 2020, "Shuffling BN"). Without
    a process group it is the identity: BN over one device's batch is invariant to the order of that batch.

    Shape:
        x: (B, ...) → shuffled (B, ...), idx_unshuffle (world_size·B,) long
    """
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device)
    x_all = concat_all_gather(x)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    mine = idx_shuffle.view(get_world_size(), -1)[get_rank()]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle`: gather the shuffled outputs and take back this rank's original samples.

    Shape:
        x: (B, ...), idx_unshuffle: (world_size·B,) → (B, ...)
    """
    if not is_distributed():
        return x
    x_all = concat_all_gather(x)
    mine = idx_unshuffle.view(get_world_size(), -1)[get_rank()]
    return x_all[mine]
