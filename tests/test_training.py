"""The config → library mapping in mixmask.run.build (operator and method built from a resolved config)."""

from __future__ import annotations

import torch

from mixmask.run.build import build_method_from_config, build_operator
from mixmask.run.config_cli import resolve
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD


def test_erase_zero_fill_is_black_pixels_after_normalisation():
    op = build_operator(resolve("demo", None, ["method.branch=erase", "mask.kind=discrete", "mask.grid_size=4"]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    (batch,) = op(x, gen)
    assert batch.kind == "erase" and torch.equal(batch.perm, torch.arange(6))
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    erased = ~torch.isclose(batch.images, x)
    assert erased.any()
    torch.testing.assert_close(batch.images[erased], black.expand_as(x)[erased])
    mean_op = build_operator(resolve("demo", None, ["method.branch=erase", "mask.erase_fill=mean"]))
    (mean_batch,) = mean_op(x, torch.Generator().manual_seed(0))
    assert (mean_batch.images[~torch.isclose(mean_batch.images, x)] == 0).all()  # the mean is 0 once normalised


def test_moco_v2_head_width_follows_the_backbone():
    method = build_method_from_config(resolve("imagenet-moco-mixmask", None, ["method.moco.queue_size=256"]))
    assert method.head[0].in_features == 2048 and method.head[0].out_features == 2048
    small = build_method_from_config(resolve("demo"))
    assert small.head[0].out_features == 512
