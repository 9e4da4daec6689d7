"""Un-Mix: global mixup with probability p, else region cutmix, with one λ ~ Beta(β, β) per batch.

Both branches are one formula, `mixed = w ⊙ x + (1 − w) ⊙ x_π` with a per-pixel weight map w (the scalar λ for mixup,
0 inside the pasted box and 1 outside for cutmix), chosen on the device by `torch.where`. So the mixup-or-cutmix
coin, λ and the box never leave the device: no host synchronisation, and one pass over the batch either way.

Reference: Shen et al., "Un-Mix: Rethinking Image Mixtures for Unsupervised Visual Representation Learning"
(AAAI 2022) and its official code (`rand_bbox` from CutMix, Yun et al. 2019). The loss weights the mixed embedding
against the sample's own target by λ and against the partner's by 1 − λ, with λ corrected to the box actually
pasted after clipping. The official MixMask fork's `--method unmix` path reads λ before assigning it; we do not
reproduce that bug.
"""

from __future__ import annotations

import torch


def sample_beta(
    beta: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """One draw of λ ~ Beta(β, β) from `generator`, as a 0-dim float64 tensor on `device`: X / (X + Y) with X, Y ~
    Gamma(β, 1) independent.

    `torch.distributions.Beta.sample` takes no generator but `Gamma.sample` does, so λ stays a draw of the caller's
    (mask) generator and a run reproduces it. `validate_args=False`: `beta` is checked here, on the host, because the
    distribution's own check would read a device tensor back (a host sync every step).
    """
    if beta <= 0:
        raise ValueError(f"Un-Mix beta must be > 0, got {beta}")
    one = torch.ones((), dtype=torch.float64, device=device)
    gammas = torch.distributions.Gamma(one * beta, one, validate_args=False).sample((2,), generator=generator)
    return gammas[0] / gammas.sum()


def cutmix_box(
    lam: torch.Tensor, height: int, width: int, u_row: torch.Tensor, u_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix's `rand_bbox`: a box of side ratio sqrt(1 − λ) centred at a uniform pixel, clipped to the image.

    `u_row`, `u_col` in [0, 1) stand for `randint(H)`, `randint(W)`. Returns row0, row1, col0, col1 (half-open) as
    0-dim long tensors; the clipped box can be smaller than (1 − λ)·H·W, hence the corrected λ in `unmix_lambda`.
    Reference: Yun et al., CutMix (2019), `rand_bbox`; Un-Mix official code.
    """
    cut_ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * cut_ratio).floor().long()
    cut_w = (width * cut_ratio).floor().long()
    centre_row = (u_row * height).floor().long().clamp(max=height - 1)
    centre_col = (u_col * width).floor().long().clamp(max=width - 1)
    row0 = (centre_row - cut_h // 2).clamp(0, height)
    row1 = (centre_row + cut_h // 2).clamp(0, height)
    col0 = (centre_col - cut_w // 2).clamp(0, width)
    col1 = (centre_col + cut_w // 2).clamp(0, width)
    return row0, row1, col0, col1


def unmix_lambda(
    use_mixup: torch.Tensor, lam: torch.Tensor, box: tuple[torch.Tensor, ...], height: int, width: int
) -> torch.Tensor:
    """Share of the sample's own image: λ for mixup, 1 − (pasted box area) / (H·W) for cutmix (0-dim float64)."""
    row0, row1, col0, col1 = box
    pasted = ((row1 - row0) * (col1 - col0)).double() / float(height * width)
    return torch.where(use_mixup, lam, 1.0 - pasted)


def unmix(
    images: torch.Tensor,
    perm: torch.Tensor,
    *,
    mixup_prob: float = 0.5,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-Mix a batch with its partners `perm`: mixup with probability `mixup_prob`, else cutmix; one λ per batch.

    Float images keep their dtype and memory format; uint8 images are mixed in float32 and rounded back.

    Shape:
        images: (B, C, H, W); perm: (B,) long
        returns: mixed (B, C, H, W) like `images`; lam (B,) float32, the same value for every sample except
            one paired with itself (`perm[i] == i`), whose λ is 1
    """
    if not 0.0 <= mixup_prob <= 1.0:
        raise ValueError(f"Un-Mix mixup probability must be in [0, 1], got {mixup_prob}")
    batch, _, height, width = images.shape
    device = images.device
    uniforms = torch.rand(3, generator=generator, device=device, dtype=torch.float64)  # coin, box row, box col
    lam = sample_beta(beta, generator, device)
    use_mixup = uniforms[0] < mixup_prob
    box = cutmix_box(lam, height, width, uniforms[1], uniforms[2])
    row0, row1, col0, col1 = box
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    inside = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)  # (H, W)
    work_dtype = images.dtype if images.is_floating_point() else torch.float32
    own_weight = torch.where(use_mixup, lam, (~inside).double()).to(work_dtype)  # (H, W)

    partners = torch.empty_like(images)
    torch.index_select(images, 0, perm, out=partners)
    if images.is_floating_point():
        # lerp(start, end, w) returns `end` exactly at w = 1 and `start` at w = 0: cutmix stays an exact selection.
        mixed = torch.lerp(partners, images, own_weight)
    else:
        mixed = torch.lerp(partners.float(), images.float(), own_weight).round_().to(images.dtype)
    mixed = mixed.contiguous(memory_format=_memory_format(images))
    # Report the λ the pixels were actually mixed with (bf16 rounds it).
    own_share = unmix_lambda(use_mixup, lam.to(work_dtype).double(), box, height, width)
    # A sample paired with itself (the middle of an odd batch under the reverse pairing) is all its own pixels.
    self_paired = perm == torch.arange(batch, device=device)
    return mixed, own_share.float().expand(batch).masked_fill(self_paired, 1.0)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
