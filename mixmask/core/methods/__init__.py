"""Registry of the Siamese methods: `build_method(name, backbone=..., feature_dim=..., **hparams)`."""

from __future__ import annotations

import torch.nn as nn

from mixmask.core.methods.base import MIXED_KINDS, SiameseMethod
from mixmask.core.methods.byol import BYOL
from mixmask.core.methods.moco import MoCo
from mixmask.core.methods.simclr import SimCLR
from mixmask.core.methods.simsiam import SimSiam
from mixmask.errors import choice_error
from mixmask.vocab import BRANCH_KINDS

METHODS: dict[str, type[SiameseMethod]] = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam}



def build_method(name: str, *, backbone: nn.Module, feature_dim: int, **hparams) -> SiameseMethod:
    """The method `name` around `backbone` (feature width `feature_dim`), with its keyword hyper-parameters."""
    if name not in METHODS:
        raise choice_error("method", name, METHODS)
    return METHODS[name](backbone=backbone, feature_dim=feature_dim, **hparams)


__all__ = [
    "BRANCH_KINDS",
    "BYOL",
    "METHODS",
    "MIXED_KINDS",
    "MoCo",
    "SiameseMethod",
    "SimCLR",
    "SimSiam",
    "build_method",
]
