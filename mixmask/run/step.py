"""One training step, the model it runs on and its precision, written once for train.py and bench.py.

A benchmark that re-implements the step measures something else the day the two drift (STYLE.md, "One copy of the
step"), so `train.py`, `bench.py step` and `bench.py e2e` all call `train_step` on a model made by `prepare_model`,
under the dtype `autocast_dtype` picks: compile, autocast and channels_last included.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mixmask.batches import MixedBatch

PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `run.precision` on `device`: bf16 for `bf16`, and for `auto` on CUDA; None = fp32.

    bf16 keeps fp32's exponent range, so it needs no GradScaler (and the checkpoints hold none).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def enable_fast_kernels(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on CUDA (fp32 ops outside autocast); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class TrainModel:
    """The method twice: `method` is the plain module (the optimizer's parameters, `after_step`, what checkpoints
    save, without the `_orig_mod.` / `module.` prefixes), `module` is what the step calls (`method` compiled and / or
    DDP-wrapped, or `method` itself)."""

    method: nn.Module
    module: nn.Module


def prepare_model(method: nn.Module, device: torch.device, *, channels_last: bool, compile_backend: str | None = None,
                  sync_bn: bool = False, distributed: bool = False) -> TrainModel:
    """Move `method` to `device` and wrap it for training, in nanoGPT's order: SyncBN, channels_last, compile, DDP.

    Call it before building the optimizer (SyncBN conversion replaces the BatchNorm modules) and before loading a
    checkpoint into `.method` (DDP broadcasts rank 0's weights when it wraps; every rank then loads the same file).
    `compile_backend`: a `torch.compile` backend (`inductor` for `run.compile=true`), None for eager.
    """
    method = method.to(device)
    if sync_bn and distributed:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    module: nn.Module = method
    if compile_backend:  # before DDP, so DDP's hooks stay outside the graph (as nanoGPT and the torch docs do)
        module = torch.compile(module, backend=compile_backend)
    if distributed:
        with warnings.catch_warnings():
            # Each rank's buffers (BN statistics, MoCo's queue, built from a per-rank seed) stay its own, from the
            # wrap on. torch 2.13 deprecates `broadcast_buffers` for `forward_sync_buffers`, which still copies
            # rank 0's buffers at the wrap; its warning itself says to keep `broadcast_buffers=False` for
            # rank-local buffers until an init-only switch exists, so that one warning is silenced here.
            warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return TrainModel(method=method, module=module)


def train_step(model: TrainModel, optimizer: torch.optim.Optimizer, view1: torch.Tensor, view2: torch.Tensor,
               mixed: Sequence[MixedBatch], *, autocast: torch.dtype | None,
               progress: float) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the loss terms detached, still on the device (no host-device sync here).

    `mixed` is the mixing operator's output for `view1`, made by the caller just before (train.py and
    `bench.py e2e`: `operator(view1, generator)`): passing it in lets `bench.py step` time the step alone on
    precomputed mixed batches, the operator being timed by `bench.py masks`, while what runs here stays one copy.
    `autocast`: the encoders' dtype from `autocast_dtype` (None: fp32); the losses compute in fp32 either way.
    `progress`: step / total steps after this step, for `after_step` (momentum and EMA schedules).

    Shape:
        view1, view2: (B, 3, H, W); each MixedBatch: images (B, 3, H, W), lam (B,), perm (B,)
    """
    with torch.autocast(view1.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        terms = model.module(view1, view2, mixed)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    model.method.after_step(progress)
    return {name: value.detach() for name, value in terms.items()}
