"""Blocked and discrete masks: contract, reproducibility, refusal of unreachable settings, and statistical fidelity
to BEiT's generator and to the official discrete rule."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.measure import label

from mixmask.core.masks import (
    MASK_GENERATORS,
    block_masks,
    check_mask_config,
    discrete_exact_masks,
    discrete_masks,
    mask_ratio_reachable,
)
from mixmask.run.config import MASK_KINDS


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


@pytest.mark.parametrize(
    "kind, grid, ratio, words",
    [
        ("block", 2, 0.5, ("grid 2", "λ≈0.024", "use mask kind discrete or a grid >= 3")),
        ("block", 3, 0.75, ("grid 3", "a grid >= 4")),
        ("block", 2, (0.4, 0.6), ("grid 2",)),
        ("discrete", 1, 0.5, ("grid 1", "grid >= 2")),
        ("discrete_exact", 1, 0.5, ("grid 1", "grid >= 2")),
        ("discrete", 4, 1.0, ("ratio below 1",)),
        ("discrete", 4, (0.5, 1.0), ("ratio below 1",)),
    ],
)
def test_impossible_mask_settings_are_refused_in_one_line(kind, grid, ratio, words):
    with pytest.raises(ValueError) as info:
        check_mask_config(kind, grid, ratio)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("kind, grid, ratio", [("block", 4, 0.5), ("block", 8, 0.5), ("block", 3, 0.5),
                                               ("discrete", 2, 0.5), ("discrete_exact", 2, 0.99)])
def test_reachable_mask_settings_pass(kind, grid, ratio):
    check_mask_config(kind, grid, ratio)
    if kind == "block":  # "reachable" means at least 80% of the ratio on average
        assert mask_ratio_reachable(grid, ratio) >= 0.8 * ratio


def test_every_configured_kind_has_a_generator():
    assert tuple(MASK_GENERATORS) == MASK_KINDS


def official_discrete_counts(rng: np.random.Generator, grid: int, ratio: float, n: int) -> np.ndarray:
    """Own-cell counts of the official rule written out: `rand(g, g) > ratio`, redrawn while all 0 or all 1."""
    counts = np.empty(n, dtype=np.int64)
    for i in range(n):
        m = rng.random((grid, grid)) > ratio
        while m.sum() == 0 or m.sum() == grid * grid:
            m = rng.random((grid, grid)) > ratio
        counts[i] = m.sum()
    return counts


def _count_z(ours: np.ndarray, ref: np.ndarray, cells: int) -> float:
    """Largest z-score between two samples' frequencies of each own-cell count."""
    worst = 0.0
    for k in range(cells + 1):
        p1, p2 = (ours == k).mean(), (ref == k).mean()
        pooled = (p1 * len(ours) + p2 * len(ref)) / (len(ours) + len(ref))
        se = math.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(ref))) + 1e-12
        worst = max(worst, abs(p1 - p2) / se)
    return worst


@pytest.mark.parametrize("grid, ratio", [(2, 0.5), (2, 0.2), (3, 0.3), (4, 0.5), (3, 0.85)])
def test_discrete_masks_follow_the_official_rule(grid, ratio):
    n = 6000
    m = discrete_masks(n, grid, ratio, generator=torch.Generator().manual_seed(grid * 10 + int(ratio * 100)))
    ours = m.sum((1, 2)).numpy()
    ref = official_discrete_counts(np.random.default_rng(grid), grid, ratio, n)
    cells = grid * grid
    assert ours.min() >= 1 and ours.max() <= cells - 1  # all-own and all-partner masks are redrawn
    assert _count_z(ours, ref, cells) < Z_LIMIT
    # Given the count, the own cells are uniform: every cell is own equally often.
    marginal = m.float().mean(0)
    assert (marginal - marginal.mean()).abs().max() < 5 * math.sqrt(0.25 / n)


def test_count_comparison_detects_a_rule_without_the_redraw():
    # The same comparison must reject plain Binomial counts (no redraw of all-own / all-partner masks).
    rng = np.random.default_rng(3)
    plain = (rng.random((6000, 2, 2)) > 0.5).sum((1, 2))
    assert _count_z(plain, official_discrete_counts(rng, 2, 0.5, 6000), 4) > 3 * Z_LIMIT


def test_discrete_masks_at_grid_2_take_the_three_official_lambdas():
    # Binomial(4, 1/2) without 0 and 4: counts 1, 2, 3 with odds 4 : 6 : 4, mean 1/2.
    m = discrete_masks(14000, 2, 0.5, generator=torch.Generator().manual_seed(8))
    values, counts = m.float().mean((1, 2)).unique(return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75]
    expected = np.array([4, 6, 4]) / 14 * 14000
    assert np.abs(counts.numpy() - expected).max() < 5 * math.sqrt(14000 * (6 / 14) * (8 / 14))
    # The ratio is the partner's probability (official `rand > ratio`): ratio 0.2 keeps about 80% own cells.
    own = discrete_masks(4000, 8, 0.2, generator=torch.Generator().manual_seed(9)).float().mean()
    assert abs(own.item() - 0.8) < 0.01


def test_discrete_ratio_range_is_drawn_per_row():
    m = discrete_masks(4000, 8, (0.1, 0.9), generator=torch.Generator().manual_seed(10))
    own = m.float().mean((1, 2))
    assert own.min() < 0.2 and own.max() > 0.8 and abs(own.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("grid, ratio", [(2, 0.5), (2, 0.01), (2, 0.99), (8, 0.5), (14, 0.3), (8, (0.0, 1.0))])
def test_discrete_exact_masks_are_never_degenerate(grid, ratio):
    m = discrete_exact_masks(500, grid, ratio, generator=torch.Generator().manual_seed(5))
    kept = m.sum((1, 2))
    assert m.shape == (500, grid, grid)
    assert (kept >= 1).all() and (kept <= grid * grid - 1).all()


def test_discrete_exact_masks_keep_exactly_k_uniform_cells():
    n, grid = 4000, 8
    m = discrete_exact_masks(n, grid, 0.5, generator=torch.Generator().manual_seed(6))
    assert (m.sum((1, 2)) == 32).all()
    marginal = m.float().mean(0)
    # Each cell kept with probability 1/2; 5 sigma of a binomial proportion.
    assert (marginal - 0.5).abs().max() < 5 * math.sqrt(0.25 / n)


def test_discrete_masks_are_reproducible_from_the_generator():
    first = discrete_masks(64, 4, 0.5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, discrete_masks(64, 4, 0.5, generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(first, discrete_masks(64, 4, 0.5, generator=torch.Generator().manual_seed(12)))


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


def test_config_refuses_unreachable_masks_before_any_work(tmp_path, repo_root):
    from mixmask.errors import UserError
    from mixmask.run.config_cli import resolve

    with pytest.raises(UserError, match="mask.kind=block at mask.grid_size=2: .*use mask kind discrete"):
        resolve("demo", None, ["mask.kind=block", "mask.grid_size=2"])
    with pytest.raises(UserError, match="mask.grid_size=1"):
        resolve("demo", None, ["mask.kind=discrete", "mask.grid_size=1"])
    with pytest.raises(UserError, match="mask.grid_size=40 is larger than data.resolution=32"):
        resolve("demo", None, ["mask.grid_size=40"])
    assert resolve("demo", None, ["mask.kind=discrete", "mask.grid_size=2"]).mask.share == "pair"
    assert resolve("demo", None, ["method.branch=unmix", "mask.kind=block", "mask.grid_size=2"])  # no grid mask
    done = subprocess.run(
        [sys.executable, "train.py", "--preset", "demo", "--print-config", "mask.kind=block", "mask.grid_size=2",
         f"run.out_dir={tmp_path / 'run'}"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mask.kind=block at mask.grid_size=2"), done.stderr
    assert not (tmp_path / "run").exists()
