"""MixingOperator: each branch yields the batches the methods expect, with consistent images, λ and partners."""

from __future__ import annotations

import pytest
import torch

from mixmask.batches import MixedBatch
from mixmask.core.operator import BRANCHES, MixingOperator


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


def assert_switch_property(batch: MixedBatch, n: int) -> None:
    """For every pair (i, j = π(i)), j ≠ i: each pixel of image i is in exactly one of mixed_i and mixed_j, mixed_j
    is mixed_i with the two images swapped, and λ_j = λ_i."""
    perm, source = batch.perm, _source_of(batch)
    assert torch.equal(perm[perm], torch.arange(n)), "the pairing is not an involution"
    for i in range(n):
        j = int(perm[i])
        if j == i:
            continue
        in_own_mix, in_partner_mix = source[i] == i, source[j] == i
        assert (in_own_mix ^ in_partner_mix).all(), (i, j)
        assert torch.equal(source[j], torch.where(in_own_mix, j, i))
    assert torch.equal(batch.lam[perm], batch.lam)


@pytest.mark.parametrize("kind", ["block", "discrete", "discrete_exact"])
@pytest.mark.parametrize("branch, share", [("mixmask", "pair"), ("mixmask-unmix", "pair"), ("mixmask", "batch")])
def test_switch_property(branch, share, kind):
    op = MixingOperator(branch, mask_kind=kind, grid_size=4, mask_ratio=0.5, share=share)
    mixmask = op(_views(16), torch.Generator().manual_seed(7))[0]
    assert_switch_property(mixmask, 16)
    if branch == "mixmask":
        assert mixmask.perm.tolist() == list(range(15, -1, -1))  # alone: the official reverse pairing
    else:  # MixMask*: a random perfect matching, other than Un-Mix's reverse pairing
        assert (mixmask.perm != torch.arange(16)).all()
        assert not torch.equal(mixmask.perm, torch.arange(15, -1, -1))
    own = _source_of(mixmask) == torch.arange(16)[:, None, None]
    masks_differ = len({tuple(mask.flatten().tolist()) for mask in own}) > 1
    assert masks_differ == (share == "pair")  # every pair has its own mask; "batch": one for all


def test_independent_masks_break_the_switch_property():
    # The check above has power: per-sample masks (share="sample") do not give switched images.
    op = MixingOperator("mixmask", grid_size=4, share="sample")
    with pytest.raises(AssertionError):
        assert_switch_property(op(_views(16), torch.Generator().manual_seed(8))[0], 16)


def test_mixmask_star_with_one_mask_per_batch_follows_the_official_randperm():
    # Official MixMask*: one mask, `torch.randperm` partners for the MixMask branch: no switched image.
    op = MixingOperator("mixmask-unmix", grid_size=4, share="batch")
    draws = [op(_views(16), torch.Generator().manual_seed(seed))[0] for seed in range(10)]
    for b in draws:
        assert sorted(b.perm.tolist()) == list(range(16))
        mixed_with_another = b.perm != torch.arange(16)  # a randperm may fix a sample: λ = 1 there
        assert (b.lam[mixed_with_another] == b.lam[mixed_with_another][0]).all()
    assert not all(torch.equal(b.perm[b.perm], torch.arange(16)) for b in draws)  # not always an involution


@pytest.mark.parametrize("branch", ["mixmask", "mixmask-unmix"])
@pytest.mark.parametrize("share", ["pair", "batch", "sample"])
def test_odd_batch_pairs_one_sample_with_itself(branch, share):
    # Rule: the middle sample of the reverse pairing (or the leftover of a matching) keeps its own image, λ = 1.
    op = MixingOperator(branch, grid_size=4, share=share)
    batches = op(_views(7), torch.Generator().manual_seed(9))
    for batch in batches:
        fixed = (batch.perm == torch.arange(7)).nonzero().flatten()
        if batch.kind == "unmix" or (branch == "mixmask") or share == "pair":
            assert len(fixed) == 1  # reverse pairing or matching: exactly one
        for i in fixed.tolist():
            assert torch.equal(batch.images[i], _views(7)[i]) and batch.lam[i].item() == 1.0
    if share == "pair":
        assert_switch_property(batches[0], 7)


@pytest.mark.parametrize("share, involution", [("pair", True), ("sample", False), ("batch", False)])
def test_random_permutation_option(share, involution):
    # permutation="random": partners drawn every step; a matching under "pair" (so the pair shares its mask).
    op = MixingOperator("mixmask", grid_size=4, share=share, permutation="random")
    gen = torch.Generator().manual_seed(10)
    draws = [op(_views(16), gen)[0] for _ in range(5)]
    assert not torch.equal(draws[0].perm, draws[1].perm)
    assert all(torch.equal(b.perm[b.perm], torch.arange(16)) for b in draws) == involution
    if share == "pair":
        assert_switch_property(draws[0], 16)


def test_lambda_is_the_own_pixel_share_when_the_grid_does_not_divide_the_image():
    op = MixingOperator("mixmask", mask_kind="discrete", grid_size=3, share="sample")
    (batch,) = op(_views(16, size=32), torch.Generator().manual_seed(11))
    own = (_source_of(batch) == torch.arange(16)[:, None, None]).float().mean((1, 2))
    assert torch.equal(own, batch.lam)


def test_unreachable_masks_are_refused():
    with pytest.raises(ValueError, match="grid 2"):
        MixingOperator("mixmask", mask_kind="block", grid_size=2)
    with pytest.raises(ValueError, match="grid 1"):
        MixingOperator("erase", mask_kind="discrete", grid_size=1)
    MixingOperator("unmix", mask_kind="block", grid_size=2)  # Un-Mix draws no grid mask


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
    op = MixingOperator("mixmask", grid_size=4, share="batch", permutation="random")
    first = op(_views(), torch.Generator().manual_seed(6))[0]
    second = op(_views(), torch.Generator().manual_seed(6))[0]
    assert torch.equal(first.images, second.images) and torch.equal(first.perm, second.perm)
    mixed_with_another = first.perm != torch.arange(16)  # a random permutation may fix a sample: λ = 1 there
    assert (first.lam[mixed_with_another] == first.lam[mixed_with_another][0]).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"branch": "mixmix"}, "branch"),
        ({"branch": "mixmask", "mask_kind": "blocks"}, "mask kind"),
        ({"branch": "mixmask", "permutation": "flip"}, "permutation"),
        ({"branch": "mixmask", "share": "pairs"}, "mask share"),
        ({"branch": "erase", "erase_fill": "black"}, "erase fill"),
    ],
)
def test_unknown_choices_list_the_valid_ones(kwargs, word):
    branch = kwargs.pop("branch")
    with pytest.raises(ValueError, match=word) as info:
        MixingOperator(branch, **kwargs)
    if word == "branch":
        assert all(name in str(info.value) for name in BRANCHES)
