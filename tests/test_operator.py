"""MixingOperator: each branch yields the batches the methods expect, with consistent images, λ and partners."""

from __future__ import annotations

import pytest
import torch

from mixmask.operator import BRANCHES, MixingOperator
from mixmask.types import MixedBatch


def _views(batch: int = 16, size: int = 32) -> torch.Tensor:
    # Sample i is the constant i (plus a channel offset) so every output pixel names its source image.
    base = torch.arange(batch, dtype=torch.float32)[:, None, None, None] * 10
    return (base + torch.arange(3.0)[None, :, None, None]).expand(batch, 3, size, size).contiguous()


def _source_of(batch: MixedBatch) -> torch.Tensor:
    """Index of the image each pixel came from (channel 0). Shape: (B, H, W) long"""
    return (batch.images[:, 0] / 10).round().long()


def test_vanilla_returns_nothing():
    assert MixingOperator("vanilla")(_views(), torch.Generator().manual_seed(0)) == []


@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_mixmask_batch_is_consistent(kind):
    views = _views().contiguous(memory_format=torch.channels_last)
    op = MixingOperator("mixmask", mask_kind=kind, grid_size=4, mask_ratio=0.5)
    (batch,) = op(views, torch.Generator().manual_seed(1))
    assert batch.kind == "mixmask" and batch.images.shape == views.shape
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.perm.tolist() == list(range(15, -1, -1))  # alone, "reverse" is the official flip(0)
    source = _source_of(batch)
    own = source == torch.arange(16)[:, None, None]
    assert (own | (source == batch.perm[:, None, None])).all()
    # 32 px on a grid of 4: each cell is 8x8 pixels, so the own-pixel share equals λ exactly.
    assert torch.allclose(own.float().mean((1, 2)), batch.lam)
    assert abs(batch.lam.mean().item() - 0.5) < 0.1


def test_mixmask_unmix_uses_different_permutations():
    op = MixingOperator("mixmask-unmix", grid_size=4, permutation="reverse")
    mixmask, unmix = op(_views(64), torch.Generator().manual_seed(2))
    assert (mixmask.kind, unmix.kind) == ("mixmask", "unmix")
    assert unmix.perm.tolist() == list(range(63, -1, -1))
    assert sorted(mixmask.perm.tolist()) == list(range(64))
    assert not torch.equal(mixmask.perm, unmix.perm)
    random_op = MixingOperator("mixmask-unmix", grid_size=4, permutation="random")
    first, second = random_op(_views(64), torch.Generator().manual_seed(3))
    assert not torch.equal(first.perm, second.perm)


def test_unmix_batch_lambda_is_the_own_share():
    op = MixingOperator("unmix", unmix_prob=0.0)
    (batch,) = op(_views(), torch.Generator().manual_seed(4))
    own = (_source_of(batch) == torch.arange(16)[:, None, None]).float().mean((1, 2))
    assert torch.allclose(own, batch.lam)


def test_erase_batch_uses_identity_and_fills_masked_cells():
    op = MixingOperator("erase", grid_size=4, mask_ratio=0.5, erase_fill="zero")
    views = _views() + 1.0  # no zero pixels in the views
    (batch,) = op(views, torch.Generator().manual_seed(5))
    assert batch.kind == "erase" and batch.perm.tolist() == list(range(16))
    kept = (batch.images == views).all(1)
    erased = (batch.images == 0).all(1)
    assert (kept | erased).all()
    assert torch.allclose(kept.float().mean((1, 2)), batch.lam)


def test_operator_is_reproducible_and_per_batch_masks_repeat():
    op = MixingOperator("mixmask", grid_size=4, per_sample=False, permutation="random")
    first = op(_views(), torch.Generator().manual_seed(6))[0]
    second = op(_views(), torch.Generator().manual_seed(6))[0]
    assert torch.equal(first.images, second.images) and torch.equal(first.perm, second.perm)
    assert (first.lam == first.lam[0]).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"branch": "mixmix"}, "branch"),
        ({"branch": "mixmask", "mask_kind": "blocks"}, "mask kind"),
        ({"branch": "mixmask", "permutation": "flip"}, "permutation"),
        ({"branch": "erase", "erase_fill": "black"}, "erase fill"),
    ],
)
def test_unknown_choices_list_the_valid_ones(kwargs, word):
    branch = kwargs.pop("branch")
    with pytest.raises(ValueError, match=word) as info:
        MixingOperator(branch, **kwargs)
    if word == "branch":
        assert all(name in str(info.value) for name in BRANCHES)
