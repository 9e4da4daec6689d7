"""Train-step benchmark: one full step (forward, backward, SGD step, `after_step`) per method × branch on synthetic
tensors, with the analytic cost in backbone forward-equivalents and the achieved FLOP rate.

The step is train.py's own (`mixmask.run.step.train_step` on a model from `prepare_model`), fed precomputed mixed
batches so the row times the method alone; `bench.py masks` times the operator and `bench.py e2e` the whole path.

Forward-equivalents count backbone passes per image with forward = 1 and backward = 2 (heads ignored): a view
that is trained costs 3, a view seen only by a momentum / EMA encoder costs 1, and each mixed batch is one more
trained view. So MoCo = 3 + 1 = 4, MoCo + MixMask = 7, MoCo + MixMask* (MixMask + Un-Mix) = 10 (DESIGN.md).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from mixmask.batches import MixedBatch
from mixmask.benchmarking.protocol import measure
from mixmask.core.backbones import build_backbone
from mixmask.core.methods import BRANCH_KINDS, build_method
from mixmask.run.step import prepare_model, train_step

# Per method: (views through the trained encoder, views through a no-gradient encoder only).
_VIEW_PASSES = {"moco": (1, 1), "simclr": (2, 0), "byol": (2, 2), "simsiam": (2, 0)}


def forward_equivalents(method: str, branch: str) -> int:
    """Backbone passes per image of one training step, forward = 1, backward = 2 (see the module docstring)."""
    trained, frozen = _VIEW_PASSES[method]
    return 3 * (trained + len(BRANCH_KINDS[branch])) + frozen


def backbone_flops_per_image(backbone: torch.nn.Module, resolution: int, device: torch.device) -> float:
    """Forward FLOPs of the backbone for one image (2 per multiply-add), counted by torch's FlopCounterMode."""
    x = torch.zeros(2, 3, resolution, resolution, device=device)  # 2 images: BN in training mode needs > 1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(x)
    return counter.get_total_flops() / 2


def synthetic_mixed(kind: str, view1: torch.Tensor, grid_size: int, generator: torch.Generator) -> MixedBatch:
    """A MixedBatch of `kind` from random cell masks (ratio ≈ 0.5): the operator's output shape, not its masks.

    Shape:
        view1: (B, 3, H, W) → MixedBatch with images like view1, lam (B,), perm (B,)
    """
    b, device = view1.shape[0], view1.device
    masks = torch.rand(b, grid_size, grid_size, generator=generator, device=device) < 0.5
    lam = masks.float().mean((1, 2))
    rows = torch.arange(view1.shape[-2], device=device) * grid_size // view1.shape[-2]
    cols = torch.arange(view1.shape[-1], device=device) * grid_size // view1.shape[-1]
    keep = masks[:, rows][:, :, cols][:, None]  # (B, 1, H, W) nearest upsampling
    if kind == "erase":
        perm = torch.arange(b, device=device)
        return MixedBatch(kind, view1 * keep, lam, perm)
    perm = torch.randperm(b, generator=generator, device=device)
    if kind == "unmix":  # Un-Mix's global mixup: one λ for the batch
        lam_value = float(torch.rand((), generator=generator, device=device))
        images = lam_value * view1 + (1 - lam_value) * view1[perm]
        return MixedBatch(kind, images, torch.full((b,), lam_value, device=device), perm)
    return MixedBatch(kind, torch.where(keep, view1, view1[perm]), lam, perm)


def _first_call_time(step, device: torch.device, compile_backend: str) -> dict:
    """The first compiled step's wall time (compilation included), as the row's `compile_s`."""
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: the compiled step has run
    return {"compile_s": time.perf_counter() - t0, "compile_backend": compile_backend}


def run_step_bench(
    methods: Sequence[str],
    branches: Sequence[str],
    *,
    arch: str,
    cifar_stem: bool,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    grid_size: int = 4,
    method_kwargs: dict[str, dict] | None = None,
    compile_backend: str | None = None,
) -> list[dict]:
    """Time one training step per method × branch; rows follow `Measurement.row` plus the cost model.

    `dtype` is the autocast dtype of the encoders (float32: no autocast); the losses stay fp32 either way. The
    model is channels_last (`run.channels_last`'s default), as the synthetic views are.
    Each row adds `method`, `branch`, `forward_equivalents`, `backbone_gflops_per_image` and `tflops` (achieved
    backbone FLOP rate = forward FLOPs × forward-equivalents × images / second). With `compile_backend` the method
    is `torch.compile`d (as `run.compile=true` does) and each row adds `compile_s`, the first step's wall time
    (compilation included), taken before the warm-up.
    """
    device = torch.device(device)
    autocast = None if dtype == torch.float32 else dtype
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in methods:
        backbone, feature_dim = build_backbone(arch, cifar_stem=cifar_stem)
        kwargs = (method_kwargs or {}).get(name, {})
        model = prepare_model(build_method(name, backbone=backbone, feature_dim=feature_dim, **kwargs), device,
                              channels_last=True, compile_backend=compile_backend)
        optimizer = torch.optim.SGD(model.method.parameters(), lr=0.01, momentum=0.9)
        flops = backbone_flops_per_image(model.method.backbone, resolution, device)
        shape = (batch_size, 3, resolution, resolution)
        view1 = torch.randn(shape, generator=generator, device=device).contiguous(memory_format=torch.channels_last)
        view2 = torch.randn(shape, generator=generator, device=device).contiguous(memory_format=torch.channels_last)
        for branch in branches:
            mixed = [synthetic_mixed(kind, view1, grid_size, generator) for kind in BRANCH_KINDS[branch]]

            step = functools.partial(train_step, model, optimizer, view1, view2, mixed, autocast=autocast,
                                     progress=0.5)
            extra = _first_call_time(step, device, compile_backend) if compile_backend else {}
            label = f"{name}/{branch}" + (" compiled" if compile_backend else "")
            m = measure(label, step, items_per_call=batch_size, warmup=warmup, repeats=repeats, device=device)
            fe = forward_equivalents(name, branch)
            rows.append(
                m.row(
                    method=name,
                    branch=branch,
                    forward_equivalents=fe,
                    backbone_gflops_per_image=flops / 1e9,
                    tflops=flops * fe * m.images_per_s / 1e12,
                    **extra,
                )
            )
    return rows
