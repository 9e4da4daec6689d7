"""Grid masks for MixMask: BEiT blocked masks and discrete (random-cell) masks, one per sample, on any device.

Convention: True marks the cells that keep the sample's own pixels, and λ_i = mean(M_i). For blocked masks the True
cells are the cells BEiT's generator marks, so `ratio` is the mask ratio exactly as in the paper and the official
code (`mask = BEiT mask; mixed = mask * x + (1 - mask) * flip(x); lam = mask.mean()`).

Reference: MixMask (Vishniakov et al.), Sec. 3 and the official code; BEiT (Bao et al., 2021) `MaskingGenerator`.
"""

from __future__ import annotations

import functools
import warnings

import torch

from mixmask.mask_kernels import block_masks_cpu

Ratio = float | tuple[float, float]

# A blocked mask whose achieved mean kept fraction is below this share of the requested ratio triggers a warning.
REACHABLE_SHARE = 0.8
_REACHABLE_SAMPLES = 4096  # Monte Carlo masks per (grid, ratio); standard error of the mean below 0.003
_REACHABLE_SEED = 20240311

_warned: set[tuple[int, float, float]] = set()


def _check(n: int, grid_size: int, ratio: Ratio) -> tuple[float, float]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    low, high = (ratio, ratio) if isinstance(ratio, (int, float)) else tuple(ratio)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio must be a float or a (low, high) range inside [0, 1], got {ratio}")
    return float(low), float(high)


def _targets(
    n: int, cells: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Target counts `int(ratio * cells)`, with the ratio drawn per sample from U(low, high) for a range. Shape: (n,)"""
    if low == high:
        # Python arithmetic for a fixed ratio: int(ratio * g * g) exactly as BEiT / the official code compute it.
        return torch.full((n,), int(low * cells), dtype=torch.int32, device=device)
    ratios = low + (high - low) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return (ratios * cells).floor().to(torch.int32)


def _device_of(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _draw_block_masks(
    n: int, grid_size: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Run the compiled kernel for `n` independent masks. Shape: returns (n, g, g) bool"""
    targets = _targets(n, grid_size * grid_size, low, high, generator, device)
    # Two 31-bit key words per mask seed the kernel's counter-based stream (mixmask.mask_kernels).
    keys = torch.randint(0, 2**31, (n, 2), generator=generator, device=device, dtype=torch.int64)
    out = torch.zeros((n, grid_size, grid_size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        from mixmask.mask_kernels_cuda import launch_block_masks_torch

        launch_block_masks_torch(keys, targets, out)
    else:
        block_masks_cpu(keys.cpu().numpy(), targets.cpu().numpy(), out.numpy())
    return out.view(torch.bool)


def mask_ratio_reachable(grid_size: int, ratio: Ratio) -> float:
    """Expected kept fraction E[mean(M)] of blocked masks at this grid and ratio (Monte Carlo, fixed seed, cached).

    BEiT's rule (blocks of at least 4 cells that fit strictly inside the grid) cannot place anything at grid 2 and
    places few blocks at grid 3, so the achieved fraction can be far below the requested ratio there.
    """
    low, high = _check(0, grid_size, ratio)
    return _reachable(grid_size, low, high)


@functools.lru_cache(maxsize=256)
def _reachable(grid_size: int, low: float, high: float) -> float:
    generator = torch.Generator().manual_seed(_REACHABLE_SEED)
    cpu = torch.device("cpu")
    masks = _draw_block_masks(_REACHABLE_SAMPLES, grid_size, low, high, generator, cpu)
    return float(masks.float().mean())


def _warn_if_unreachable(grid_size: int, low: float, high: float) -> None:
    key = (grid_size, low, high)
    if key in _warned:
        return
    requested = (low + high) / 2
    achieved = _reachable(grid_size, low, high)
    if requested > 0 and achieved < REACHABLE_SHARE * requested:
        _warned.add(key)
        warnings.warn(
            f"blocked masks at grid {grid_size} reach a mean kept fraction λ≈{achieved:.3f}, far below the requested "
            f"mask ratio {requested:.3f} (BEiT blocks need >= 4 cells and must fit strictly inside the grid); "
            "use a larger grid or discrete masks",
            UserWarning,
            stacklevel=3,
        )


def block_masks(
    n: int,
    grid_size: int,
    ratio: Ratio,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    per_sample: bool = True,
) -> torch.Tensor:
    """BEiT blocked masks, one per sample (True = keep the sample's own pixels); `per_sample=False` repeats one mask.

    Reproducible from `generator` (which must live on `device`); on CUDA the kernel runs on torch's current stream
    with no host synchronisation. Warns once per (grid, ratio) when the blocked rule cannot reach the ratio.

    Shape:
        returns: (n, grid_size, grid_size) bool
    Reference: BEiT `MaskingGenerator` (see mixmask.mask_kernels); MixMask Sec. 3.
    """
    low, high = _check(n, grid_size, ratio)
    _warn_if_unreachable(grid_size, low, high)
    device = _device_of(generator, device)
    if per_sample:
        return _draw_block_masks(n, grid_size, low, high, generator, device)
    one = _draw_block_masks(1, grid_size, low, high, generator, device)
    return one.expand(n, grid_size, grid_size).contiguous()


def discrete_masks(
    n: int,
    grid_size: int,
    ratio: Ratio,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    per_sample: bool = True,
) -> torch.Tensor:
    """Discrete masks: exactly k = round(ratio · g²) cells kept, clamped to [1, g² − 1], chosen uniformly.

    Every cell is kept with probability k / g² and λ_i = k / g² is fixed for a fixed ratio. The clamp keeps every
    mask mixed (never all-True or all-False); a 1×1 grid has no such mask and is an error.

    Shape:
        returns: (n, grid_size, grid_size) bool
    """
    low, high = _check(n, grid_size, ratio)
    cells = grid_size * grid_size
    if cells < 2:
        raise ValueError("discrete masks need at least 2 cells (grid_size >= 2)")
    device = _device_of(generator, device)
    rows = n if per_sample else 1
    if low == high:
        kept = torch.full((rows, 1), round(low * cells), dtype=torch.int64, device=device)
    else:
        ratios = low + (high - low) * torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)
        kept = (ratios * cells).round().to(torch.int64)
    kept = kept.clamp(1, cells - 1)
    # Rank of each cell in a uniform random order; the k lowest ranks are kept (a uniform k-subset).
    order = torch.rand(rows, cells, generator=generator, device=device).argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=device).expand(rows, cells))
    masks = (ranks < kept).view(rows, grid_size, grid_size)
    return masks if per_sample else masks.expand(n, grid_size, grid_size).contiguous()
