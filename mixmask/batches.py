"""Batches that travel between the loader, the mixing operator and the methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TwoViewBatch:
    """Two augmented views of the same images, on the training device, normalized, channels_last.

    Shape:
        view1, view2: (B, 3, H, W) float (fp32 or bf16)
        labels, index: (B,) long; index is the sample's position in the dataset
    """

    view1: torch.Tensor
    view2: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


@dataclass
class MixedBatch:
    """Images built from `view1` by a mixing branch, with the share λ_i of each sample's own image.

    The soft loss weights the mixed embedding z_i against the target of image i by `lam[i]` and against the
    target of image `perm[i]` by `1 - lam[i]` (DESIGN.md). The erase branch uses the identity permutation.

    Shape:
        images: (B, 3, H, W), same dtype and layout as the views
        lam: (B,) float32 in [0, 1]
        perm: (B,) long
    """

    kind: str  # "mixmask" | "unmix" | "erase"
    images: torch.Tensor
    lam: torch.Tensor
    perm: torch.Tensor
