"""The mixing operator: one call per step turns the first views into the mixed batches a branch needs.

Branches (DESIGN.md `method.branch`): "vanilla" → [], "mixmask" → [MixMask], "unmix" → [Un-Mix],
"mixmask-unmix" (MixMask*) → [MixMask, Un-Mix], "erase" → [erase baseline]. Plain values in, no config object.
"""

from __future__ import annotations

import torch

from mixmask.batches import MixedBatch
from mixmask.core.masks import MASK_GENERATORS, Ratio, check_mask_config
from mixmask.core.mixing import (
    erase,
    identity_permutation,
    mix,
    random_matching,
    random_permutation,
    reverse_permutation,
)
from mixmask.core.unmix import unmix
from mixmask.vocab import BRANCH_KINDS, BRANCHES, ERASE_FILLS, MASK_SHARES, PERMUTATIONS  # no config object

MASK_KINDS = tuple(MASK_GENERATORS)
_MASKED_BRANCHES = ("mixmask", "mixmask-unmix", "erase")


def _choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


class MixingOperator:
    """Builds the mixed batches of one branch from `view1`, with every random draw taken from the caller's generator.

    Mask sharing (`share`): "batch" draws one mask for the whole batch (official); "pair" one mask per pair of an
    involutive pairing, used by both members, so mixed_π(i) is mixed_i with the two images swapped (the switched
    image); "sample" one independent mask per sample. For the erase branch the pairing is the identity, so "pair"
    means one mask per sample there.

    Partners (`permutation`):
    - "reverse": a lone MixMask branch pairs i with n − 1 − i (the official `flip(0)`, an involution). In MixMask*
      ("mixmask-unmix") Un-Mix keeps the reverse pairing and MixMask draws other partners, as the paper requires:
      a random perfect matching under "pair" (an involution, so its switched images are in the batch), a random
      permutation under "batch" and "sample" (the official code's `randperm`, which has no switched image).
    - "random": every branch draws its partners each step: MixMask a random matching under "pair", a random
      permutation otherwise; Un-Mix a random permutation.
    Odd batches: an involution leaves one sample paired with itself; its mixed image is itself and λ = 1.
    The erase branch uses the identity, so both loss weights (λ, 1 − λ) land on the sample's own target.

    A mask configuration that cannot give its masks (blocked at grid 2, discrete at grid 1) is a ValueError here.
    """

    def __init__(
        self,
        branch: str,
        *,
        mask_kind: str = "block",
        grid_size: int = 8,
        mask_ratio: Ratio = 0.5,
        share: str = "pair",
        permutation: str = "reverse",
        unmix_prob: float = 0.5,
        unmix_beta: float = 1.0,
        erase_fill: str | torch.Tensor = "zero",
    ) -> None:
        _choice("branch", branch, BRANCHES)
        _choice("mask kind", mask_kind, MASK_KINDS)
        _choice("mask share", share, MASK_SHARES)
        _choice("permutation", permutation, PERMUTATIONS)
        if isinstance(erase_fill, str):
            _choice("erase fill", erase_fill, ERASE_FILLS)
        if branch in _MASKED_BRANCHES:
            check_mask_config(mask_kind, grid_size, mask_ratio)
        self.branch = branch
        self.mask_kind = mask_kind
        self.grid_size = grid_size
        self.mask_ratio = mask_ratio
        self.share = share
        self.permutation = permutation
        self.unmix_prob = unmix_prob
        self.unmix_beta = unmix_beta
        self.erase_fill = erase_fill

    def __repr__(self) -> str:
        return (
            f"MixingOperator(branch={self.branch!r}, mask_kind={self.mask_kind!r}, grid_size={self.grid_size}, "
            f"mask_ratio={self.mask_ratio}, share={self.share!r}, permutation={self.permutation!r}, "
            f"unmix_prob={self.unmix_prob}, unmix_beta={self.unmix_beta}, erase_fill={self.erase_fill!r})"
        )

    def _masks(self, perm: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Masks shared as `self.share` says; under "pair", `perm` must be an involution. Shape: (B, g, g) bool"""
        n, device, g = perm.shape[0], perm.device, self.grid_size
        draw = MASK_GENERATORS[self.mask_kind]
        if self.share == "batch":
            return draw(1, g, self.mask_ratio, generator=generator, device=device).expand(n, g, g)
        masks = draw(n, g, self.mask_ratio, generator=generator, device=device)
        if self.share == "pair":
            # Both members of pair (i, π(i)) take the mask drawn for the smaller index (a gather: no host sync).
            masks = masks[torch.minimum(torch.arange(n, device=device), perm)]
        return masks

    def mixmask_partners(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """The MixMask partner of each sample (see the class docstring). Shape: returns (n,) long"""
        if self.permutation == "reverse" and self.branch == "mixmask":
            return reverse_permutation(n, device)  # alone, MixMask follows the official flip(0)
        if self.share == "pair":
            return random_matching(n, generator, device)  # an involution, so the pair's mask is well defined
        return random_permutation(n, generator, device)  # in MixMask* the official code draws a randperm

    def _mixmask(self, view1: torch.Tensor, generator: torch.Generator | None) -> MixedBatch:
        perm = self.mixmask_partners(view1.shape[0], generator, view1.device)
        images, lam = mix(view1, self._masks(perm, generator), perm)
        return MixedBatch(kind="mixmask", images=images, lam=lam, perm=perm)

    def _unmix(self, view1: torch.Tensor, generator: torch.Generator | None) -> MixedBatch:
        n, device = view1.shape[0], view1.device
        if self.permutation == "reverse":
            perm = reverse_permutation(n, device)
        else:
            perm = random_permutation(n, generator, device)
        images, lam = unmix(view1, perm, mixup_prob=self.unmix_prob, beta=self.unmix_beta, generator=generator)
        return MixedBatch(kind="unmix", images=images, lam=lam, perm=perm)

    def _erase(self, view1: torch.Tensor, generator: torch.Generator | None) -> MixedBatch:
        perm = identity_permutation(view1.shape[0], view1.device)
        fill = self.erase_fill
        if isinstance(fill, torch.Tensor) and (fill.device != view1.device or fill.dtype != view1.dtype):
            fill = self.erase_fill = fill.to(device=view1.device, dtype=view1.dtype)  # once: a per-step copy would sync
        images, lam = erase(view1, self._masks(perm, generator), fill, generator)
        return MixedBatch(kind="erase", images=images, lam=lam, perm=perm)

    def __call__(self, view1: torch.Tensor, generator: torch.Generator | None = None) -> list[MixedBatch]:
        """Mixed batches for this branch, in the order the method's loss terms expect.

        Shape:
            view1: (B, 3, H, W) normalised first views on the training device
        """
        build = {"mixmask": self._mixmask, "unmix": self._unmix, "erase": self._erase}
        return [build[kind](view1, generator) for kind in BRANCH_KINDS[self.branch]]
