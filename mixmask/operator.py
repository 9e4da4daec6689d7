"""The mixing operator: one call per step turns the first views into the mixed batches a branch needs.

Branches (DESIGN.md `method.branch`): "vanilla" → [], "mixmask" → [MixMask], "unmix" → [Un-Mix],
"mixmask-unmix" (MixMask*) → [MixMask, Un-Mix], "erase" → [erase baseline]. Plain values in, no config object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixmask.config import BRANCHES  # the one list of branch names (plain constants, no config object)
from mixmask.masks import Ratio, block_masks, discrete_masks
from mixmask.mixing import ERASE_FILLS, erase, identity_permutation, mix, random_permutation, reverse_permutation
from mixmask.types import MixedBatch
from mixmask.unmix import unmix

MASK_KINDS: dict[str, Callable[..., torch.Tensor]] = {"block": block_masks, "discrete": discrete_masks}
PERMUTATIONS = ("reverse", "random")


def _choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


class MixingOperator:
    """Builds the mixed batches of one branch from `view1`, with every random draw taken from the caller's generator.

    Permutations: with `permutation="reverse"` a lone branch pairs i with n − 1 − i (the official `flip(0)`); in
    MixMask* ("mixmask-unmix") Un-Mix keeps the reverse pairing and MixMask draws a random permutation, so the two
    branches mix different partners as the paper requires. With "random" every branch draws its own. The erase
    branch uses the identity, so both loss weights (λ, 1 − λ) land on the sample's own target.
    """

    def __init__(
        self,
        branch: str,
        *,
        mask_kind: str = "block",
        grid_size: int = 8,
        mask_ratio: Ratio = 0.5,
        per_sample: bool = True,
        permutation: str = "reverse",
        unmix_prob: float = 0.5,
        unmix_beta: float = 1.0,
        erase_fill: str | torch.Tensor = "zero",
    ) -> None:
        _choice("branch", branch, BRANCHES)
        _choice("mask kind", mask_kind, MASK_KINDS)
        _choice("permutation", permutation, PERMUTATIONS)
        if isinstance(erase_fill, str):
            _choice("erase fill", erase_fill, ERASE_FILLS)
        self.branch = branch
        self.mask_kind = mask_kind
        self.grid_size = grid_size
        self.mask_ratio = mask_ratio
        self.per_sample = per_sample
        self.permutation = permutation
        self.unmix_prob = unmix_prob
        self.unmix_beta = unmix_beta
        self.erase_fill = erase_fill

    def __repr__(self) -> str:
        return (
            f"MixingOperator(branch={self.branch!r}, mask_kind={self.mask_kind!r}, grid_size={self.grid_size}, "
            f"mask_ratio={self.mask_ratio}, per_sample={self.per_sample}, permutation={self.permutation!r}, "
            f"unmix_prob={self.unmix_prob}, unmix_beta={self.unmix_beta}, erase_fill={self.erase_fill!r})"
        )

    def _masks(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        draw = MASK_KINDS[self.mask_kind]
        return draw(n, self.grid_size, self.mask_ratio, generator=generator, device=device, per_sample=self.per_sample)

    def _mixmask(self, view1: torch.Tensor, generator: torch.Generator | None) -> MixedBatch:
        n, device = view1.shape[0], view1.device
        if self.permutation == "reverse" and self.branch == "mixmask":
            perm = reverse_permutation(n, device)  # alone, MixMask follows the official flip(0)
        else:
            perm = random_permutation(n, generator, device)  # in MixMask* the reverse pairing belongs to Un-Mix
        images, lam = mix(view1, self._masks(n, generator, device), perm)
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
        n, device = view1.shape[0], view1.device
        fill = self.erase_fill
        if isinstance(fill, torch.Tensor) and (fill.device != device or fill.dtype != view1.dtype):
            fill = self.erase_fill = fill.to(device=device, dtype=view1.dtype)  # once: a per-step copy would sync
        images, lam = erase(view1, self._masks(n, generator, device), fill, generator)
        return MixedBatch(kind="erase", images=images, lam=lam, perm=identity_permutation(n, device))

    def __call__(self, view1: torch.Tensor, generator: torch.Generator | None = None) -> list[MixedBatch]:
        """Mixed batches for this branch, in the order the method's loss terms expect.

        Shape:
            view1: (B, 3, H, W) normalised first views on the training device
        """
        if self.branch == "vanilla":
            return []
        builders = {
            "mixmask": (self._mixmask,),
            "unmix": (self._unmix,),
            "mixmask-unmix": (self._mixmask, self._unmix),
            "erase": (self._erase,),
        }[self.branch]
        return [build(view1, generator) for build in builders]
