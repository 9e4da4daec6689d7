"""MixMask mixing: `mixed_i = M_i ⊙ x_i + (1 − M_i) ⊙ x_π(i)` with the grid mask upsampled by nearest neighbour.

The full-resolution mask is never built in float: the (B, g, g) grid is gathered with precomputed row and column
index vectors into a (B, 1, H, W) bool, and `torch.where` selects pixels, so any dtype (uint8, fp32, bf16) passes
through unchanged and nothing is rounded. λ_i is the share of sample i's own *pixels*, computed from the pixel
area of each cell under the same nearest mapping, so it is exact at grids that do not divide the image.

Pairings: `reverse_permutation` (i ↔ n − 1 − i, the official `flip(0)`) and `random_matching` are involutions
(π(π(i)) = i); with one mask per pair they give the switched image (DESIGN.md). `random_permutation` is not.
With an odd batch an involution leaves one sample paired with itself: its mixed image is itself and λ = 1.

Reference: MixMask (Vishniakov et al.), Eq. for the mixed image and λ; official code `mask * x + (1 - mask) * flip(x)`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mixmask.vocab import ERASE_FILLS  # the one list of fills (re-exported for callers of `erase`)


def nearest_indices(grid_size: int, out_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source index of each output position for nearest upsampling, as `F.interpolate(mode="nearest")` computes it.

    PyTorch's rule (aten `nearest_idx`): `min(floor(i * (in / out)), in - 1)` with the scale and the product in
    float32, so sizes the grid does not divide map exactly like the reference. Built on the device (no host-to-device
    copy, which would synchronise) and cached per (grid, size, device).

    Shape:
        returns: (out_size,) long
    """
    return _nearest_indices(grid_size, out_size, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=128)
def _nearest_indices(grid_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    scale = float(np.float32(grid_size) / np.float32(out_size))  # float32 division, exact as a Python float
    positions = torch.arange(out_size, dtype=torch.float32, device=device) * scale  # float32 product
    return positions.floor_().long().clamp_(max=grid_size - 1)


def upsample_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-upsample bool grid masks to the image size by gathering rows then columns (no float mask).

    Shape:
        masks: (B, gh, gw) bool
        returns: (B, 1, H, W) bool
    """
    rows = nearest_indices(masks.shape[1], height, masks.device)
    cols = nearest_indices(masks.shape[2], width, masks.device)
    return masks.index_select(1, rows).index_select(2, cols).unsqueeze(1)


def mix(images: torch.Tensor, masks: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with its partner `perm[i]` under its grid mask; return the mixed batch and λ.

    True cells keep the sample's own pixels. λ_i is the share of sample i's own pixels in `mixed[i]`: the pixel
    share of its True cells after nearest upsampling, and 1 where `perm[i] == i` (every pixel is its own). The output
    keeps the input's dtype and memory format (channels_last).

    Shape:
        images: (B, C, H, W) float or uint8
        masks: (B, g, g) bool
        perm: (B,) long
        returns: mixed (B, C, H, W) like `images`; lam (B,) float32
    Reference: MixMask Sec. 3, mixed_i = M_i ⊙ x_i + (1 − M_i) ⊙ x_π(i); official λ = mean of the upsampled mask.
    """
    if images.dim() != 4 or masks.dim() != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images (B, C, H, W) and masks (B, g, g), got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be bool, got {masks.dtype}")
    height, width = images.shape[2], images.shape[3]
    keep_own = upsample_masks(masks, height, width)
    # One buffer: gather the partners into it (empty_like keeps channels_last), then select own pixels in place.
    # Two passes over the batch instead of the official five, and no extra full-size allocation.
    mixed = torch.empty_like(images)
    torch.index_select(images, 0, perm, out=mixed)
    torch.where(keep_own, images, mixed, out=mixed)
    self_paired = perm == torch.arange(perm.shape[0], device=perm.device)
    return mixed, mask_lambda(masks, height, width).masked_fill_(self_paired, 1.0)


def cell_areas(grid_h: int, grid_w: int, height: int, width: int, device: torch.device | str | None = None):
    """Pixels each grid cell covers after nearest upsampling to (height, width), with `nearest_indices`' mapping.

    Built on the device by `index_add_` (no `bincount`, which would synchronise) and cached per size and device.

    Shape:
        returns: (grid_h, grid_w) long
    """
    on = torch.device(device) if device is not None else torch.device("cpu")
    return _cell_areas(grid_h, grid_w, height, width, on)


@functools.lru_cache(maxsize=128)
def _cell_areas(grid_h: int, grid_w: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    def counts(grid: int, size: int) -> torch.Tensor:
        index = nearest_indices(grid, size, device)
        return torch.zeros(grid, dtype=torch.long, device=device).index_add_(0, index, torch.ones_like(index))

    return counts(grid_h, height)[:, None] * counts(grid_w, width)[None, :]


def mask_lambda(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """λ_i: the share of the (height, width) image that mask i keeps after nearest upsampling, from cell areas.

    Exact: an integer pixel count divided by H·W (the same float32 value as averaging the upsampled mask), and it
    equals the cell share mean(M_i) only when the grid divides the image.

    Shape:
        masks: (B, gh, gw) bool
        returns: (B,) float32
    """
    areas = cell_areas(masks.shape[1], masks.shape[2], height, width, masks.device)
    own_pixels = (masks * areas).sum(dim=(1, 2))  # int64: exact
    return own_pixels.float() / float(height * width)


def reverse_permutation(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """π(i) = n − 1 − i, the official MixMask / Un-Mix partner (`flip(0)` of the batch). Shape: returns (n,) long"""
    return torch.arange(n - 1, -1, -1, device=device)


def random_permutation(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uniformly random permutation drawn from `generator` on `device`. Shape: returns (n,) long"""
    if device is None and generator is not None:
        device = generator.device
    return torch.randperm(n, generator=generator, device=device)


def random_matching(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uniformly random perfect matching as an involution without fixed points (π(π(i)) = i ≠ π(i)).

    Consecutive entries of a random permutation σ are paired (σ0 ↔ σ1, σ2 ↔ σ3, ...), which is uniform over the
    matchings; with odd n the leftover σ[n − 1] is paired with itself. Drawn on the device from `generator`.

    Shape:
        returns: (n,) long
    """
    order = random_permutation(n, generator, device)
    pairs = n // 2
    first, second = order[0 : 2 * pairs : 2], order[1 : 2 * pairs : 2]
    perm = torch.empty_like(order)
    perm[first] = second
    perm[second] = first
    perm[order[2 * pairs :]] = order[2 * pairs :]  # the leftover of an odd batch is paired with itself
    return perm


def identity_permutation(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """π(i) = i: both loss terms land on the sample's own target (erase baseline). Shape: returns (n,) long"""
    return torch.arange(n, device=device)




def erase(
    images: torch.Tensor,
    masks: torch.Tensor,
    fill: str | torch.Tensor = "zero",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase baseline (MixMask Table 4): cells where the mask is False are filled instead of mixed.

    `fill`: "zero" writes 0; "mean" writes the dataset mean, which is 0 in normalised space (so on normalised inputs
    it equals "zero"; pass a (C,) tensor such as `-mean / std` for black pixels); "noise" writes standard Gaussian
    noise from `generator` (unit-variance noise in normalised space); a (C,) tensor writes per-channel values.
    λ_i is the kept pixel share, as for mixing; the caller pairs it with the identity permutation.

    Shape:
        images: (B, C, H, W) float; masks: (B, g, g) bool; fill tensor: (C,)
        returns: erased (B, C, H, W) like `images`; lam (B,) float32
    """
    keep_own = upsample_masks(masks, images.shape[2], images.shape[3])
    if isinstance(fill, torch.Tensor):
        filler = fill.to(device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    elif fill in ("zero", "mean"):
        filler = torch.zeros((), device=images.device, dtype=images.dtype)
    elif fill == "noise":
        filler = torch.empty_like(images).normal_(generator=generator)
    else:
        raise ValueError(f"unknown erase fill {fill!r}; valid: {', '.join(ERASE_FILLS)} or a (C,) tensor")
    erased = torch.empty_like(images)
    torch.where(keep_own, images, filler, out=erased)
    return erased, mask_lambda(masks, images.shape[2], images.shape[3])
