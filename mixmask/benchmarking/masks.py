"""Mask-operator micro-benchmark behind `bench.py masks`: per-sample masks and mix versus the official per-batch path.

The official MixMask code draws one BEiT mask per batch with Python's `random` on the CPU, moves it to the device,
upsamples it with `F.interpolate` and mixes with `mask * x + (1 - mask) * x.flip(0)`. We draw a mask per sample
with the compiled kernel on the device and mix by gathering. Both are timed side by side in one run, and each of our
rows carries `ratio_vs_official` (our images/s over the official images/s at the same batch, resolution and grid).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from mixmask.benchmarking.protocol import Measurement, measure
from mixmask.core.masks import block_masks, discrete_masks
from mixmask.core.mixing import mix, reverse_permutation


class OfficialMaskingGenerator:
    """BEiT's MaskingGenerator as the official MixMask code runs it: Python `random`, a numpy grid, one per batch."""

    def __init__(self, grid_size: int, ratio: float, seed: int = 0) -> None:
        self.grid_size = grid_size
        self.target = int(ratio * grid_size * grid_size)
        self.rng = random.Random(seed)
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def _block(self, mask: np.ndarray, max_patches: int) -> int:
        g, delta = self.grid_size, 0
        for _ in range(10):
            area = self.rng.uniform(4, max_patches)
            aspect = math.exp(self.rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < g and h < g:
                top, left = self.rng.randint(0, g - h), self.rng.randint(0, g - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    def __call__(self) -> np.ndarray:
        mask = np.zeros((self.grid_size, self.grid_size), dtype=np.int64)
        count = 0
        while count < self.target:
            delta = self._block(mask, self.target - count)
            if delta == 0:
                break
            count += delta
        return mask


def official_mask(generator: OfficialMaskingGenerator, device: torch.device) -> torch.Tensor:
    """One mask per batch, drawn on the CPU and moved to the device as the official code does. Shape: (1, 1, g, g)"""
    return torch.from_numpy(generator()).float()[None, None].to(device)


def official_mix(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official mixing: a full-resolution float mask, `mask * x + (1 - mask) * x.flip(0)`, λ = mask.mean()."""
    full = F.interpolate(mask, size=images.shape[-2:], mode="nearest").to(images.dtype)
    return full * images + (1 - full) * images.flip(0), mask.mean()


def _pair(
    name: str,
    ours: Callable[[], object],
    official: Callable[[], object],
    *,
    items: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int,
    extra: dict,
) -> list[dict]:
    """Time ours and the official side by side and return both rows with the speed ratio."""
    timed: list[Measurement] = [
        measure(
            f"{name}/per-sample", ours, items_per_call=items, warmup=warmup, repeats=repeats, device=device, inner=inner
        ),
        measure(
            f"{name}/official",
            official,
            items_per_call=items,
            warmup=warmup,
            repeats=repeats,
            device=device,
            inner=inner,
        ),
    ]
    ratio = timed[0].images_per_s / timed[1].images_per_s
    return [timed[0].row(**extra, ratio_vs_official=ratio), timed[1].row(**extra, ratio_vs_official=1.0)]


def run_masks_bench(
    device: torch.device | str = "cpu",
    batch_sizes: Iterable[int] = (256,),
    resolutions: Iterable[int] = (32, 64, 224),
    grids: Iterable[int] = (2, 4, 8),
    warmup: int = 3,
    repeats: int = 10,
    *,
    ratio: float = 0.5,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict]:
    """Benchmark mask generation (blocked, discrete) and mixing, ours per sample versus the official per batch.

    Rows (protocol.Measurement.row): `masks-block`, `masks-discrete` (generation only, per grid), `mix` (mixing
    given masks) and `mask+mix` (both) per resolution and grid, each as `/per-sample` and `/official`.
    """
    # Blocked masks at grid 2 are benchmarked on purpose: `block_masks` draws them, only configs refuse them.
    return _run(torch.device(device), batch_sizes, resolutions, grids, warmup, repeats, ratio, dtype, seed)


def _run(
    device: torch.device,
    batch_sizes: Iterable[int],
    resolutions: Iterable[int],
    grids: Iterable[int],
    warmup: int,
    repeats: int,
    ratio: float,
    dtype: torch.dtype,
    seed: int,
) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: list[dict] = []
    grids = tuple(grids)
    for batch in batch_sizes:
        for grid in grids:
            official_generator = OfficialMaskingGenerator(grid, ratio, seed)
            extra = {"batch_size": batch, "grid_size": grid, "device": str(device), "mask_ratio": ratio}
            timing = {"items": batch, "device": device, "warmup": warmup, "repeats": repeats, "inner": 20}
            rows += _pair(
                "masks-block",
                lambda b=batch, g=grid: block_masks(b, g, ratio, generator=generator, device=device),
                lambda gen=official_generator: official_mask(gen, device),
                extra=extra,
                **timing,
            )
            rows += _pair(
                "masks-discrete",
                lambda b=batch, g=grid: discrete_masks(b, g, ratio, generator=generator, device=device),
                lambda gen=official_generator: official_mask(gen, device),
                extra=extra,
                **timing,
            )
        for resolution in resolutions:
            images = torch.randn(batch, 3, resolution, resolution, generator=generator, device=device).to(dtype)
            images = images.contiguous(memory_format=torch.channels_last)
            perm = reverse_permutation(batch, device)
            inner = max(1, 2**20 // images.numel())  # sub-millisecond work is repeated inside each sample
            for grid in grids:
                official_generator = OfficialMaskingGenerator(grid, ratio, seed)
                masks = block_masks(batch, grid, ratio, generator=generator, device=device)
                one_mask = official_mask(official_generator, device)
                extra = {
                    "batch_size": batch,
                    "resolution": resolution,
                    "grid_size": grid,
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": str(device),
                    "mask_ratio": ratio,
                }
                timing = {"items": batch, "device": device, "warmup": warmup, "repeats": repeats, "inner": inner}
                rows += _pair(
                    "mix",
                    lambda x=images, m=masks, p=perm: mix(x, m, p),
                    lambda x=images, m=one_mask: official_mix(x, m),
                    extra=extra,
                    **timing,
                )
                rows += _pair(
                    "mask+mix",
                    lambda x=images, b=batch, g=grid, p=perm: mix(
                        x, block_masks(b, g, ratio, generator=generator, device=device), p
                    ),
                    lambda x=images, gen=official_generator: official_mix(x, official_mask(gen, device)),
                    extra=extra,
                    **timing,
                )
            del images
    return rows
