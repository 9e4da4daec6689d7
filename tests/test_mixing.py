"""`mix` and the permutations against the formula written out with F.interpolate, at sizes the grid does not divide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixmask.mixing import (
    erase,
    identity_permutation,
    mask_lambda,
    mix,
    nearest_indices,
    random_permutation,
    reverse_permutation,
    upsample_masks,
)


def reference_mix(images: torch.Tensor, masks: torch.Tensor, perm: torch.Tensor):
    """The official formula: float mask upsampled by F.interpolate, mask * x + (1 - mask) * x[perm], in float64."""
    up = F.interpolate(masks[:, None].double(), size=images.shape[-2:], mode="nearest")
    x = images.double()
    return up * x + (1 - up) * x[perm], masks.double().mean((1, 2))


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
    assert lam.dtype == torch.float32 and torch.equal(lam.double(), expected_lam.float().double())


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


def test_mask_lambda_is_the_mean():
    masks = torch.rand(10, 8, 8) < 0.3
    assert torch.allclose(mask_lambda(masks), masks.float().mean((1, 2)))


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


def test_erase_fills_masked_cells():
    images = torch.randn(4, 3, 12, 12) + 10.0  # far from any fill value
    masks = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    keep = upsample_masks(masks, 12, 12)
    for fill, expected_fill in [("zero", torch.zeros(3)), ("mean", torch.zeros(3)), (torch.tensor([1.0, 2, 3]), None)]:
        erased, lam = erase(images, masks, fill)
        expected_fill = fill if expected_fill is None else expected_fill
        expected = torch.where(keep, images, expected_fill.view(1, 3, 1, 1))
        assert torch.equal(erased, expected)
        assert torch.equal(lam, masks.float().mean((1, 2)))
    noisy, _ = erase(images, masks, "noise", torch.Generator().manual_seed(3))
    filled = noisy.masked_select(~keep.expand_as(noisy))
    assert torch.equal(noisy.masked_select(keep.expand_as(noisy)), images.masked_select(keep.expand_as(images)))
    assert abs(filled.mean().item()) < 0.15 and abs(filled.std().item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="erase fill"):
        erase(images, masks, "black")
