"""`mix` and the permutations against the formula written out with F.interpolate, at sizes the grid does not divide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixmask.core.mixing import (
    cell_areas,
    erase,
    identity_permutation,
    mask_lambda,
    mix,
    nearest_indices,
    random_matching,
    random_permutation,
    reverse_permutation,
    upsample_masks,
)


def reference_mix(images: torch.Tensor, masks: torch.Tensor, perm: torch.Tensor):
    """The official formula: float mask upsampled by F.interpolate, mask * x + (1 - mask) * x[perm], in float64,
    and λ: the mean of the upsampled mask (float32, as the official `mask.sum() / (H * W)`), or 1 for a sample
    paired with itself, whose mixed image is all its own pixels (the loss is the same for any λ there)."""
    up = F.interpolate(masks[:, None].double(), size=images.shape[-2:], mode="nearest")
    x = images.double()
    self_paired = perm == torch.arange(len(perm))
    return up * x + (1 - up) * x[perm], torch.where(self_paired, 1.0, up.float().mean((1, 2, 3)))


SIZES = [(32, 32), (33, 50), (7, 5), (224, 224), (225, 223), (3, 2), (64, 97)]


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (4, 4), (8, 8), (14, 14), (3, 5)])
@pytest.mark.parametrize("size", SIZES)
def test_upsampling_matches_f_interpolate(grid, size):
    masks = torch.rand(3, *grid, generator=torch.Generator().manual_seed(sum(size))) < 0.5
    expected = F.interpolate(masks[:, None].float(), size=size, mode="nearest").bool()
    assert torch.equal(upsample_masks(masks, *size), expected)


def test_nearest_indices_for_every_size_up_to_300():
    for grid in (2, 3, 7, 8, 14):
        probe = torch.arange(grid, dtype=torch.float32)[None, None, :, None]
        for size in range(1, 301):
            expected = F.interpolate(probe, size=(size, 1), mode="nearest")[0, 0, :, 0].long()
            assert torch.equal(nearest_indices(grid, size), expected), (grid, size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8])
def test_mix_matches_the_official_formula(size, dtype):
    gen = torch.Generator().manual_seed(1)
    batch = 6
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (batch, 3, *size), generator=gen, dtype=torch.uint8)
    else:
        images = torch.randn(batch, 3, *size, generator=gen).to(dtype)
    masks = torch.rand(batch, 4, 4, generator=gen) < 0.4
    perm = random_permutation(batch, gen)
    mixed, lam = mix(images, masks, perm)
    expected, expected_lam = reference_mix(images, masks, perm)
    assert mixed.dtype == dtype and mixed.shape == images.shape
    assert torch.equal(mixed.double(), expected)  # a selection: exact in every dtype
    assert lam.dtype == torch.float32 and torch.equal(lam, expected_lam)


def test_mix_keeps_channels_last():
    images = torch.randn(4, 3, 20, 30).contiguous(memory_format=torch.channels_last)
    masks = torch.rand(4, 4, 4) < 0.5
    mixed, _ = mix(images, masks, reverse_permutation(4))
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(mixed, reference_mix(images, masks, reverse_permutation(4))[0].float())


def test_pixels_come_from_own_image_where_true_and_partner_where_false():
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 8, 8).contiguous()  # image i is constant i
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    perm = torch.tensor([2, 0, 3, 1])
    mixed, lam = mix(images, masks, perm)
    assert torch.equal(mixed[:, 0, 0, 0], torch.arange(4.0))  # top-left quarter: own
    assert torch.equal(mixed[:, 0, 7, 7], perm.float())  # elsewhere: partner
    assert torch.equal(lam, torch.full((4,), 0.25))


@pytest.mark.parametrize("grid", [(14, 14), (3, 3), (2, 2), (8, 8), (5, 3), (7, 7)])
@pytest.mark.parametrize("size", [(32, 32), (33, 50), (224, 224), (64, 97), (5, 7)])
def test_mask_lambda_is_the_pixel_share_of_the_upsampled_mask(grid, size):
    masks = torch.rand(40, *grid, generator=torch.Generator().manual_seed(sum(grid) * 7 + size[0])) < 0.5
    reference = F.interpolate(masks[:, None].float(), size=size, mode="nearest").mean((1, 2, 3))
    assert torch.equal(mask_lambda(masks, *size), reference)


def test_pixel_share_differs_from_the_cell_share_where_the_grid_does_not_divide():
    # Grid 14 on 32 px: 32 = 14·2 + 4, so some rows/columns of cells cover 3 pixels and others 2.
    areas = cell_areas(14, 14, 32, 32)
    assert areas.sum() == 32 * 32 and set(areas.unique().tolist()) == {4, 6, 9}
    masks = torch.rand(500, 14, 14, generator=torch.Generator().manual_seed(3)) < 0.5
    gap = (mask_lambda(masks, 32, 32) - masks.float().mean((1, 2))).abs().max().item()
    assert gap > 0.01
    assert torch.equal(mask_lambda(masks, 28, 28), masks.float().mean((1, 2)))  # 28 = 14·2: equal shares


def test_mix_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match="masks"):
        mix(torch.zeros(2, 3, 8, 8), torch.zeros(3, 2, 2, dtype=torch.bool), reverse_permutation(2))
    with pytest.raises(TypeError, match="bool"):
        mix(torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 2), reverse_permutation(2))


def test_permutations():
    assert reverse_permutation(5).tolist() == [4, 3, 2, 1, 0]
    assert identity_permutation(3).tolist() == [0, 1, 2]
    first = random_permutation(100, torch.Generator().manual_seed(0))
    assert sorted(first.tolist()) == list(range(100))
    assert torch.equal(first, random_permutation(100, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, random_permutation(100, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 64, 65])
def test_random_matching_is_an_involution_with_at_most_one_fixed_point(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        perm = random_matching(n, gen)
        assert sorted(perm.tolist()) == list(range(n))
        assert torch.equal(perm[perm], torch.arange(n))  # π(π(i)) = i
        fixed = (perm == torch.arange(n)).sum().item()
        assert fixed == n % 2  # a perfect matching; an odd batch leaves exactly one sample paired with itself


def test_random_matching_is_uniform_over_the_matchings():
    # 4 samples have 3 perfect matchings; each should come up a third of the time.
    gen = torch.Generator().manual_seed(5)
    draws = [tuple(random_matching(4, gen).tolist()) for _ in range(3000)]
    counts = sorted(draws.count(m) for m in set(draws))
    assert len(counts) == 3 and max(abs(c - 1000) for c in counts) < 5 * (3000 * (1 / 3) * (2 / 3)) ** 0.5
    # An odd batch: the sample left over is each one equally often.
    leftovers = [int((p == torch.arange(5)).nonzero()) for p in (random_matching(5, gen) for _ in range(2500))]
    assert max(abs(leftovers.count(i) - 500) for i in range(5)) < 5 * (2500 * 0.2 * 0.8) ** 0.5


def test_a_sample_paired_with_itself_is_unchanged_with_lambda_one():
    # The middle of an odd batch under the reverse pairing: every pixel of its mixed image is its own.
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    masks = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    mixed, lam = mix(images, masks, reverse_permutation(5))
    assert torch.equal(mixed[2], images[2]) and lam[2].item() == 1.0
    others = torch.tensor([0, 1, 3, 4])
    assert torch.equal(lam[others], mask_lambda(masks, 8, 8)[others])


def test_erase_fills_masked_cells():
    images = torch.randn(4, 3, 12, 12) + 10.0  # far from any fill value
    masks = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    keep = upsample_masks(masks, 12, 12)
    for fill, expected_fill in [("zero", torch.zeros(3)), ("mean", torch.zeros(3)), (torch.tensor([1.0, 2, 3]), None)]:
        erased, lam = erase(images, masks, fill)
        expected_fill = fill if expected_fill is None else expected_fill
        expected = torch.where(keep, images, expected_fill.view(1, 3, 1, 1))
        assert torch.equal(erased, expected)
        assert torch.equal(lam, masks.float().mean((1, 2)))  # 12 px on a grid of 3: cell share = pixel share
    noisy, _ = erase(images, masks, "noise", torch.Generator().manual_seed(3))
    filled = noisy.masked_select(~keep.expand_as(noisy))
    assert torch.equal(noisy.masked_select(keep.expand_as(noisy)), images.masked_select(keep.expand_as(images)))
    assert abs(filled.mean().item()) < 0.15 and abs(filled.std().item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="erase fill"):
        erase(images, masks, "black")
