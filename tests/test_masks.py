"""Blocked and discrete masks: contract, reproducibility, the small-grid warning, and statistical fidelity to BEiT."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from skimage.measure import label

from mixmask import masks as masks_mod
from mixmask.masks import block_masks, discrete_masks, mask_ratio_reachable


def beit_reference(rng: random.Random, g: int, target: int, *, inclusive_randint: bool = True) -> np.ndarray:
    """BEiT's MaskingGenerator written out directly with Python `random` (independent of the library kernel).

    `inclusive_randint=False` is a deliberately wrong variant (top in [0, g - h - 1]) used to show the statistical
    comparison has power.
    """
    mask = np.zeros((g, g), dtype=np.uint8)
    count = 0
    while count < target:
        max_patches = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(4, max_patches)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < g and h < g:
                span_h, span_w = (g - h, g - w) if inclusive_randint else (max(g - h - 1, 0), max(g - w - 1, 0))
                top, left = rng.randint(0, span_h), rng.randint(0, span_w)
                already = int(mask[top : top + h, left : left + w].sum())
                if 0 < h * w - already <= max_patches:
                    delta += h * w - already
                    mask[top : top + h, left : left + w] = 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def _stats(masks: np.ndarray) -> dict:
    kept = masks.reshape(len(masks), -1).mean(axis=1)
    components = np.array([label(m, connectivity=1).max() for m in masks], dtype=np.float64)
    return {"kept": kept, "components": components, "marginal": masks.mean(axis=0), "n": len(masks)}


def _worst_z(ours: dict, ref: dict) -> dict:
    """z-scores of the differences between two independent samples, for each compared statistic."""
    n1, n2 = ours["n"], ref["n"]

    def mean_z(a, b):
        se = math.sqrt(a.var() / n1 + b.var() / n2) + 1e-12
        return abs(a.mean() - b.mean()) / se

    # Standard error of a sample std, via the delta method on the variance: Var(s²) ≈ (m4 - s⁴) / n.
    def std_z(a, b):
        def se_std(x, n):
            s2 = x.var()
            m4 = ((x - x.mean()) ** 4).mean()
            return math.sqrt(max(m4 - s2**2, 1e-12) / n) / (2 * math.sqrt(s2) + 1e-12)

        return abs(a.std() - b.std()) / (math.hypot(se_std(a, n1), se_std(b, n2)) + 1e-12)

    p1, p2 = ours["marginal"], ref["marginal"]
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)) + 1e-12
    return {
        "kept_mean": mean_z(ours["kept"], ref["kept"]),
        "kept_std": std_z(ours["kept"], ref["kept"]),
        "components": mean_z(ours["components"], ref["components"]),
        "marginal": float((np.abs(p1 - p2) / se).max()),
    }


Z_LIMIT = 4.5  # |z| bound; with fixed seeds the test is deterministic, and a real bias shows z >> 10


def _reference_masks(g: int, ratio, n: int, seed: int, **kwargs) -> np.ndarray:
    rng = random.Random(seed)
    low, high = (ratio, ratio) if isinstance(ratio, float) else ratio
    return np.stack([beit_reference(rng, g, int(rng.uniform(low, high) * g * g), **kwargs) for _ in range(n)])


@pytest.mark.parametrize(
    "grid, ratio, n",
    [(4, 0.5, 4000), (8, 0.5, 3000), (8, 0.25, 3000), (8, (0.3, 0.7), 3000), (14, 0.4, 1500), (3, 0.5, 4000)],
)
def test_block_masks_match_beit_statistics(grid, ratio, n):
    gen = torch.Generator().manual_seed(grid * 1000 + n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _stats(block_masks(n, grid, ratio, generator=gen).numpy().astype(np.uint8))
    ref = _stats(_reference_masks(grid, ratio, n, seed=grid))
    z = _worst_z(ours, ref)
    assert max(z.values()) < Z_LIMIT, z


def test_statistical_comparison_detects_an_off_by_one_placement():
    # The same comparison must reject a reference whose blocks never touch the last row/column.
    n, grid = 3000, 8
    ref = _stats(_reference_masks(grid, 0.5, n, seed=1))
    wrong = _stats(_reference_masks(grid, 0.5, n, seed=2, inclusive_randint=False))
    assert _worst_z(wrong, ref)["marginal"] > 3 * Z_LIMIT


def test_block_masks_contract_and_reproducibility():
    gen = torch.Generator().manual_seed(0)
    m = block_masks(64, 8, 0.5, generator=gen)
    assert m.shape == (64, 8, 8) and m.dtype == torch.bool
    assert (m.sum((1, 2)) <= 32).all()  # never more than int(ratio * g * g) cells
    assert len({tuple(x.flatten().tolist()) for x in m}) > 50  # per-sample: masks differ
    again = block_masks(64, 8, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def test_block_masks_per_batch_repeats_one_mask():
    m = block_masks(16, 8, 0.5, generator=torch.Generator().manual_seed(3), per_sample=False)
    assert m.shape == (16, 8, 8) and m.any()
    assert (m == m[:1]).all()


def test_ratio_range_is_sampled_per_sample():
    m = block_masks(2000, 8, (0.2, 0.8), generator=torch.Generator().manual_seed(4))
    kept = m.float().mean((1, 2))
    assert kept.min() < 0.25 and kept.max() > 0.7
    assert abs(kept.mean().item() - 0.5) < 0.03


def test_invalid_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask ratio"):
        block_masks(4, 8, 1.5)
    with pytest.raises(ValueError, match="mask ratio"):
        discrete_masks(4, 8, (0.7, 0.2))


def test_reachable_ratio_matches_direct_simulation():
    rng = random.Random(7)
    ref = np.mean([beit_reference(rng, 2, 2).mean() for _ in range(20000)])
    assert abs(mask_ratio_reachable(2, 0.5) - ref) < 0.01
    assert mask_ratio_reachable(2, 0.5) < 0.06  # the BEiT rule can barely place a block at grid 2
    assert abs(mask_ratio_reachable(8, 0.5) - 0.5) < 0.02


def test_unreachable_ratio_warns_once_with_the_achieved_fraction():
    masks_mod._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block_masks(8, 2, 0.5)
        block_masks(8, 2, 0.5)
        block_masks(8, 8, 0.5)  # reachable: no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "grid 2" in messages[0] and f"{mask_ratio_reachable(2, 0.5):.3f}" in messages[0]


@pytest.mark.parametrize("grid, ratio", [(2, 0.5), (2, 0.01), (2, 0.99), (8, 0.5), (14, 0.3), (8, (0.0, 1.0))])
def test_discrete_masks_are_never_degenerate(grid, ratio):
    m = discrete_masks(500, grid, ratio, generator=torch.Generator().manual_seed(5))
    kept = m.sum((1, 2))
    assert m.shape == (500, grid, grid)
    assert (kept >= 1).all() and (kept <= grid * grid - 1).all()


def test_discrete_masks_keep_exactly_k_uniform_cells():
    n, grid = 4000, 8
    m = discrete_masks(n, grid, 0.5, generator=torch.Generator().manual_seed(6))
    assert (m.sum((1, 2)) == 32).all()
    marginal = m.float().mean(0)
    # Each cell kept with probability 1/2; 5 sigma of a binomial proportion.
    assert (marginal - 0.5).abs().max() < 5 * math.sqrt(0.25 / n)
    one = discrete_masks(8, grid, 0.5, generator=torch.Generator().manual_seed(6), per_sample=False)
    assert (one == one[:1]).all()


def test_masks_benchmark_rows_pair_ours_with_the_official_path():
    from mixmask.benchmarking.masks import OfficialMaskingGenerator, run_masks_bench

    rows = run_masks_bench("cpu", batch_sizes=(8,), resolutions=(16,), grids=(4,), warmup=1, repeats=2)
    names = [row["name"] for row in rows]
    for stage in ("masks-block", "masks-discrete", "mix", "mask+mix"):
        assert f"{stage}/per-sample" in names and f"{stage}/official" in names
    ours = next(row for row in rows if row["name"] == "mix/per-sample")
    official = next(row for row in rows if row["name"] == "mix/official")
    assert ours["ratio_vs_official"] == pytest.approx(ours["images_per_s"] / official["images_per_s"])
    assert ours["resolution"] == 16 and ours["grid_size"] == 4 and ours["images_per_s"] > 0
    # The official-path generator is BEiT too: same mean kept fraction as the library at grid 8.
    official_masks = np.stack([OfficialMaskingGenerator(8, 0.5, seed)() for seed in range(300)])
    assert abs(official_masks.mean() - mask_ratio_reachable(8, 0.5)) < 0.01
