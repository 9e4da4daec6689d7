"""Registry of the Siamese methods: each class declares its hyper-parameters (`Params`, the config section
`method.<name>`) and builds itself from them (`from_params`); `build_method` takes plain keyword arguments."""

from __future__ import annotations

import torch.nn as nn

from mixmask.core.methods.base import MIXED_KINDS, MethodParams, RunShape, SiameseMethod
from mixmask.core.methods.byol import BYOL
from mixmask.core.methods.moco import MoCo
from mixmask.core.methods.simclr import SimCLR
from mixmask.core.methods.simsiam import SimSiam
from mixmask.errors import choice_error
from mixmask.vocab import BRANCH_KINDS

# Adding a method: its module (a SiameseMethod with its Params) and one entry here; the config, the CLI and the
# registry build pick it up from this table (its presets go in mixmask/run/preset_table.py).
METHODS: dict[str, type[SiameseMethod]] = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method_class(name: str) -> type[SiameseMethod]:
    if name not in METHODS:
        raise choice_error("method", name, METHODS)
    return METHODS[name]


def build_method(name: str, *, backbone: nn.Module, feature_dim: int, **hparams) -> SiameseMethod:
    """The method `name` around `backbone` (feature width `feature_dim`), with its keyword hyper-parameters."""
    return get_method_class(name)(backbone=backbone, feature_dim=feature_dim, **hparams)


def build_method_from_params(name: str, params: MethodParams, *, backbone: nn.Module, feature_dim: int,
                             world_size: int = 1, sync_bn: bool = False) -> SiameseMethod:
    """The method `name` from its settings dataclass (its config section) and the launch."""
    cls = get_method_class(name)
    if not isinstance(params, cls.Params):
        raise TypeError(f"{name} takes {cls.Params.__name__}, got {type(params).__name__}")
    return cls.from_params(params, backbone=backbone, feature_dim=feature_dim, world_size=world_size,
                           sync_bn=sync_bn)


__all__ = [
    "BRANCH_KINDS",
    "BYOL",
    "METHODS",
    "METHOD_NAMES",
    "MIXED_KINDS",
    "MethodParams",
    "MoCo",
    "RunShape",
    "SiameseMethod",
    "SimCLR",
    "SimSiam",
    "build_method",
    "build_method_from_params",
    "get_method_class",
]
