"""One epoch's sample order for one rank, shared by every backend (DistributedSampler semantics, no process group).

The permutation depends only on (seed, epoch), so every rank computes the same one without communicating and a
resumed run repeats it. It is padded by wrapping around to a multiple of `world_size` (as DistributedSampler does)
and rank r takes positions r, r + W, r + 2W, ...: shards are disjoint up to the padding and cover the epoch, and
every rank gets ceil(N / W) samples, hence the same number of steps.
"""

from __future__ import annotations

import math

import numpy as np

from mixmask.errors import UserError


def check_rank(rank: int, world_size: int) -> None:
    """Raise unless 0 <= rank < world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def samples_per_rank(num_samples: int, world_size: int) -> int:
    return math.ceil(num_samples / world_size)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches each rank yields per epoch (identical on every rank)."""
    per_rank = samples_per_rank(num_samples, world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def epoch_order(num_samples: int, *, rank: int, world_size: int, seed: int, epoch: int,
                shuffle: bool = True) -> np.ndarray:
    """Dataset indices this rank visits in `epoch`, in order.

    Shape:
        returns (ceil(N / world_size),) int64
    """
    check_rank(rank, world_size)
    if num_samples < 1:
        raise UserError("the dataset is empty")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    total = samples_per_rank(num_samples, world_size) * world_size
    if total > num_samples:
        order = np.concatenate([order, np.resize(order, total - num_samples)])
    return order[rank::world_size].astype(np.int64)


def batch_seed(seed: int, epoch: int, rank: int, stream: int = 0, batch: int | None = None) -> int:
    """A 63-bit seed for a rank's augmentation stream in an epoch (distinct across ranks, epochs and streams).

    With `batch`, a seed for that batch alone: draws that depend only on the batch's position let an epoch start
    at any batch and still give the batches of an uninterrupted epoch.
    """
    key = [seed, epoch, rank, stream] + ([] if batch is None else [batch])
    mixed = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return int((int(mixed[0]) << 31) ^ int(mixed[1]))
