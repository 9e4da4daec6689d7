"""Grid masks for MixMask: BEiT blocked masks and discrete (random-cell) masks, one per row, on any device.

Convention: True marks the cells that keep the sample's own pixels. For blocked masks the True cells are the cells
BEiT's generator marks, so `ratio` is the share of own cells, exactly as in the official code (`mask = BEiT mask;
mixed = mask * x + (1 - mask) * flip(x)`). For discrete masks the official code draws `rand(g, g) > ratio`, so a
cell is the sample's own with probability 1 − ratio (the same thing at the paper's ratio 0.5).

Which rows share a mask (one per batch, per pair, per sample) is the operator's business (mixmask.core.operator); the
λ of a mixed image is the share of own *pixels* after upsampling (mixmask.core.mixing.mask_lambda).

Reference: MixMask (Vishniakov et al.), Sec. 3 and the official code (`utils.py`: `MaskingGenerator`,
`get_discrete_mask`); BEiT (Bao et al., 2021) `MaskingGenerator`.
"""

from __future__ import annotations

import functools
import math

import torch

Ratio = float | tuple[float, float]

# A configuration whose blocked masks reach a mean own share below this share of the requested ratio is refused.
REACHABLE_SHARE = 0.8
_REACHABLE_SAMPLES = 4096  # Monte Carlo masks per (grid, ratio); standard error of the mean below 0.003
_REACHABLE_SEED = 20240311
_LARGEST_GRID_SUGGESTED = 32  # how far `check_mask_config` looks for a grid that works


def _check(n: int, grid_size: int, ratio: Ratio) -> tuple[float, float]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    low, high = (ratio, ratio) if isinstance(ratio, (int, float)) else tuple(ratio)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio must be a float or a (low, high) range inside [0, 1], got {ratio}")
    return float(low), float(high)


def _ratios(
    rows: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """The ratio of each row: fixed, or drawn from U(low, high) for a range. Shape: (rows,) float64"""
    if low == high:
        return torch.full((rows,), low, dtype=torch.float64, device=device)
    return low + (high - low) * torch.rand(rows, generator=generator, device=device, dtype=torch.float64)


def _targets(
    n: int, cells: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Target counts `int(ratio * cells)`, with the ratio drawn per sample from U(low, high) for a range. Shape: (n,)"""
    if low == high:
        # Python arithmetic for a fixed ratio: int(ratio * g * g) exactly as BEiT / the official code compute it.
        return torch.full((n,), int(low * cells), dtype=torch.int32, device=device)
    return (_ratios(n, low, high, generator, device) * cells).floor().to(torch.int32)


def _device_of(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _draw_block_masks(
    n: int, grid_size: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Run the compiled kernel for `n` independent masks. Shape: returns (n, g, g) bool"""
    targets = _targets(n, grid_size * grid_size, low, high, generator, device)
    # Two 31-bit key words per mask seed the kernel's counter-based stream (mixmask.core.mask_kernels).
    keys = torch.randint(0, 2**31, (n, 2), generator=generator, device=device, dtype=torch.int64)
    out = torch.zeros((n, grid_size, grid_size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        from mixmask.core.mask_kernels_cuda import launch_block_masks_torch

        launch_block_masks_torch(keys, targets, out)
    else:
        from mixmask.core.mask_kernels import block_masks_cpu  # numba loads only when blocked masks are drawn

        block_masks_cpu(keys.cpu().numpy(), targets.cpu().numpy(), out.numpy())
    return out.view(torch.bool)


def mask_ratio_reachable(grid_size: int, ratio: Ratio) -> float:
    """Expected own share E[mean(M)] of blocked masks at this grid and ratio (Monte Carlo, fixed seed, cached).

    BEiT's rule (blocks of at least 4 cells that fit strictly inside the grid) cannot place anything at grid 2 and
    places few blocks at grid 3, so the achieved fraction can be far below the requested ratio there.
    """
    low, high = _check(0, grid_size, ratio)
    return _reachable(grid_size, low, high)


@functools.lru_cache(maxsize=256)
def _reachable(grid_size: int, low: float, high: float) -> float:
    generator = torch.Generator().manual_seed(_REACHABLE_SEED)
    masks = _draw_block_masks(_REACHABLE_SAMPLES, grid_size, low, high, generator, torch.device("cpu"))
    return float(masks.float().mean())


def _block_reaches(grid_size: int, low: float, high: float) -> bool:
    requested = (low + high) / 2
    return requested == 0 or _reachable(grid_size, low, high) >= REACHABLE_SHARE * requested


def check_mask_config(kind: str, grid_size: int, ratio: Ratio) -> None:
    """Refuse a mask configuration that can never give the masks it asks for; ValueError is one line naming the fix.

    Blocked masks must reach at least `REACHABLE_SHARE` of the requested ratio on average (BEiT's rule cannot place
    a block at grid 2 at all); discrete masks need two cells and a ratio below 1 (at 1 every cell is the partner's).
    """
    if kind not in MASK_GENERATORS:
        raise ValueError(f"unknown mask kind {kind!r}; valid: {', '.join(MASK_GENERATORS)}")
    low, high = _check(0, grid_size, ratio)
    if kind in ("discrete", "discrete_exact") and grid_size < 2:
        raise ValueError(f"{kind} masks at grid {grid_size} have no cell for the partner image; use a grid >= 2")
    if kind == "discrete" and high >= 1.0:
        raise ValueError(f"discrete masks make each cell the partner's with probability ratio, so ratio {high} "
                         "never keeps an own cell; use a ratio below 1")
    if kind == "block" and not _block_reaches(grid_size, low, high):
        requested = (low + high) / 2
        larger = next((g for g in range(grid_size + 1, _LARGEST_GRID_SUGGESTED + 1) if _block_reaches(g, low, high)),
                      None)
        fix = f"use mask kind discrete or a grid >= {larger}" if larger else "use mask kind discrete"
        raise ValueError(
            f"blocked masks at grid {grid_size} reach an own share λ≈{_reachable(grid_size, low, high):.3f}, far "
            f"below the ratio {requested:.3g} (BEiT blocks need >= 4 cells and must fit strictly inside the grid); "
            f"{fix}"
        )


def block_masks(
    n: int,
    grid_size: int,
    ratio: Ratio,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """BEiT blocked masks, one per row (True = keep the sample's own pixels).

    Reproducible from `generator` (which must live on `device`); on CUDA the kernel runs on torch's current stream
    with no host synchronisation. A grid where BEiT's rule cannot reach the ratio gives (nearly) empty masks; callers
    that take user settings refuse it first with `check_mask_config`.

    Shape:
        returns: (n, grid_size, grid_size) bool
    Reference: BEiT `MaskingGenerator` (see mixmask.core.mask_kernels); MixMask Sec. 3.
    """
    low, high = _check(n, grid_size, ratio)
    return _draw_block_masks(n, grid_size, low, high, generator, _device_of(generator, device))


def _uniform_subsets(kept: torch.Tensor, cells: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random subset of `kept[r]` cells per row. Shape: kept (rows,) long → (rows, cells) bool"""
    rows, device = kept.shape[0], kept.device
    # Rank of each cell in a uniform random order; the k lowest ranks are kept (a uniform k-subset).
    order = torch.rand(rows, cells, generator=generator, device=device).argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=device).expand(rows, cells))
    return ranks < kept[:, None]


def own_cell_counts(
    cells: int, own_prob: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Number of own cells of a mask whose cells are independently own with probability `own_prob`, given that the
    mask is neither all-own nor all-partner: Binomial(cells, p) truncated to [1, cells − 1], sampled by inverse CDF
    on the device (no redraw loop, no host synchronisation).

    Shape:
        own_prob: (rows,) float64 in (0, 1)
        returns: (rows,) long in [1, cells − 1]
    """
    k = torch.arange(cells + 1, dtype=torch.float64, device=own_prob.device)
    p = own_prob[:, None]
    log_pmf = (math.lgamma(cells + 1) - torch.lgamma(k + 1) - torch.lgamma(cells - k + 1)
               + k * torch.log(p) + (cells - k) * torch.log1p(-p))
    log_pmf[:, 0] = -math.inf  # all partner: redrawn by the official rule
    log_pmf[:, cells] = -math.inf  # all own: redrawn
    cdf = torch.softmax(log_pmf, dim=1).cumsum(dim=1)
    u = torch.rand(own_prob.shape[0], 1, generator=generator, device=own_prob.device, dtype=torch.float64)
    # First k with cdf[k] > u·total; cdf[0] = 0 and cdf[cells − 1] = total keep k in [1, cells − 1].
    return (cdf <= u * cdf[:, -1:]).sum(dim=1)


def discrete_masks(
    n: int,
    grid_size: int,
    ratio: Ratio,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Discrete masks by the official rule: each cell is the sample's own with probability 1 − ratio, and a mask that
    is all own or all partner is redrawn (at grid 2 and ratio 0.5: λ ∈ {1/4, 1/2, 3/4} with odds 4 : 6 : 4).

    The redraw is exact without a loop: the own-cell count is drawn from the binomial truncated to [1, g² − 1], then
    the own cells are a uniform subset of that size, which is the law of independent cells given the count. A
    `(low, high)` ratio is drawn per row.

    Shape:
        returns: (n, grid_size, grid_size) bool
    Reference: official MixMask `get_discrete_mask`: `m = rand(g, g) > mask_lam`, redrawn while `m.sum()` is 0 or g².
    """
    low, high = _check(n, grid_size, ratio)
    check_mask_config("discrete", grid_size, ratio)
    device = _device_of(generator, device)
    cells = grid_size * grid_size
    own_prob = 1.0 - _ratios(n, low, high, generator, device)
    kept = own_cell_counts(cells, own_prob, generator)
    return _uniform_subsets(kept, cells, generator).view(n, grid_size, grid_size)


def discrete_exact_masks(
    n: int,
    grid_size: int,
    ratio: Ratio,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Discrete masks with an exact count (ours, not the official rule): k = round(ratio · g²) own cells, clamped to
    [1, g² − 1], chosen uniformly; so the own-cell share is k / g² for a fixed ratio.

    Shape:
        returns: (n, grid_size, grid_size) bool
    """
    low, high = _check(n, grid_size, ratio)
    check_mask_config("discrete_exact", grid_size, ratio)
    device = _device_of(generator, device)
    cells = grid_size * grid_size
    if low == high:
        kept = torch.full((n,), round(low * cells), dtype=torch.int64, device=device)
    else:
        kept = (_ratios(n, low, high, generator, device) * cells).round().to(torch.int64)
    kept = kept.clamp(1, cells - 1)
    return _uniform_subsets(kept, cells, generator).view(n, grid_size, grid_size)


# The generator of each mask kind (`mask.kind`; mixmask.run.config.MASK_KINDS lists the same names).
MASK_GENERATORS = {"block": block_masks, "discrete": discrete_masks, "discrete_exact": discrete_exact_masks}
