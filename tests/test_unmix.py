"""Un-Mix: the CutMix box against a direct transcription of `rand_bbox`, both branches, λ's distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixmask.core.mixing import reverse_permutation
from mixmask.core.unmix import cutmix_box, sample_beta, unmix


def rand_bbox_reference(height: int, width: int, lam: float, centre_row: int, centre_col: int):
    """CutMix's rand_bbox with the centre given (the official draws it with np.random.randint)."""
    cut_ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    row0 = np.clip(centre_row - cut_h // 2, 0, height)
    row1 = np.clip(centre_row + cut_h // 2, 0, height)
    col0 = np.clip(centre_col - cut_w // 2, 0, width)
    col1 = np.clip(centre_col + cut_w // 2, 0, width)
    return int(row0), int(row1), int(col0), int(col1)


def test_cutmix_box_matches_rand_bbox():
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 80, size=2))
        lam = float(rng.uniform())
        u_row, u_col = rng.uniform(size=2)
        centre_row, centre_col = int(u_row * height), int(u_col * width)
        box = cutmix_box(
            torch.tensor(lam, dtype=torch.float64), height, width, torch.tensor(u_row), torch.tensor(u_col)
        )
        assert tuple(int(v) for v in box) == rand_bbox_reference(height, width, lam, centre_row, centre_col)


def _constant_images(batch: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(batch, dtype=torch.float32)[:, None, None, None].expand(batch, 3, height, width).to(dtype)


def test_cutmix_branch_pastes_a_box_and_lambda_is_the_corrected_share():
    batch, height, width = 6, 31, 40
    images = _constant_images(batch, height, width)
    perm = reverse_permutation(batch)
    seen_clipped = False
    for seed in range(60):
        mixed, lam = unmix(images, perm, mixup_prob=0.0, generator=torch.Generator().manual_seed(seed))
        from_partner = mixed[:, 0] == perm[:, None, None].float()
        own = mixed[:, 0] == torch.arange(batch, dtype=torch.float32)[:, None, None]
        assert (from_partner | own).all()  # a selection, no blending
        pasted = from_partner[0]
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if pasted.any():  # the pasted region is one rectangle
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        share = 1.0 - pasted.float().mean().item()
        assert lam.shape == (batch,) and lam.dtype == torch.float32
        assert torch.allclose(lam, torch.full((batch,), share), atol=1e-6)
        assert (from_partner == pasted).all()  # one box for the whole batch
        seen_clipped |= bool(pasted[0].any() or pasted[-1].any() or pasted[:, 0].any() or pasted[:, -1].any())
    assert seen_clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixup_branch_blends_globally(dtype):
    images = torch.randn(5, 3, 9, 11).to(dtype)
    perm = torch.tensor([3, 0, 4, 1, 2])
    mixed, lam = unmix(images, perm, mixup_prob=1.0, generator=torch.Generator().manual_seed(2))
    expected = lam[0].double() * images.double() + (1 - lam[0].double()) * images[perm].double()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert mixed.dtype == dtype
    assert torch.allclose(mixed.double(), expected, atol=tolerance)
    assert (lam == lam[0]).all() and 0.0 < lam[0] < 1.0


def test_mixup_probability_is_respected():
    images = _constant_images(2, 8, 8)
    perm = reverse_permutation(2)
    mixups = 0
    trials = 600
    gen = torch.Generator().manual_seed(3)
    for _ in range(trials):
        mixed, _ = unmix(images, perm, mixup_prob=0.3, generator=gen)
        blended = ((mixed > 0) & (mixed < 1)).any()  # mixup blends 0 and 1; cutmix only selects
        mixups += int(blended)
    assert abs(mixups / trials - 0.3) < 4 * math.sqrt(0.3 * 0.7 / trials)


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_lambda_follows_beta(beta):
    gen = torch.Generator().manual_seed(int(beta * 10))
    draws = torch.stack([sample_beta(beta, gen) for _ in range(6000)]).numpy()
    mean, var = 0.5, 1.0 / (4 * (2 * beta + 1))
    assert abs(draws.mean() - mean) < 4 * math.sqrt(var / len(draws))
    assert abs(draws.var() - var) < 0.1 * var
    # CDF at 0.25 against numpy's Beta sampler, an independent implementation.
    reference = np.random.default_rng(0).beta(beta, beta, size=200000)
    p = (reference < 0.25).mean()
    assert abs((draws < 0.25).mean() - p) < 4 * math.sqrt(p * (1 - p) / len(draws))
    # The whole CDF: two-sample Kolmogorov-Smirnov distance to that reference, under its 0.1 % critical value.
    points = np.concatenate([draws, reference])
    ks = np.abs(_ecdf(draws, points) - _ecdf(reference, points)).max()
    assert ks < 1.95 * math.sqrt(1 / len(draws) + 1 / len(reference))


def _ecdf(samples: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(samples), points, side="right") / len(samples)


def test_unmix_is_reproducible_and_keeps_layout_and_uint8():
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    perm = reverse_permutation(4)
    first = unmix(images, perm, generator=torch.Generator().manual_seed(9))
    second = unmix(images, perm, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].is_contiguous(memory_format=torch.channels_last)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mixed, _ = unmix(pixels, perm, mixup_prob=1.0, generator=torch.Generator().manual_seed(9))
    assert mixed.dtype == torch.uint8


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta"):
        sample_beta(0.0)
    with pytest.raises(ValueError, match="probability"):
        unmix(torch.zeros(2, 3, 4, 4), reverse_permutation(2), mixup_prob=1.5)


@pytest.mark.parametrize("mixup_prob", [0.0, 1.0])
def test_odd_batch_middle_sample_is_itself_with_lambda_one(mixup_prob):
    # The reverse pairing of 5 fixes sample 2: mixup or cutmix with itself leaves it unchanged, all its own pixels.
    images = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(10))
    mixed, lam = unmix(images, reverse_permutation(5), mixup_prob=mixup_prob,
                       generator=torch.Generator().manual_seed(11))
    assert torch.equal(mixed[2], images[2]) and lam[2].item() == 1.0
    others = lam[torch.tensor([0, 1, 3, 4])]
    assert (others == others[0]).all() and others[0].item() < 1.0
