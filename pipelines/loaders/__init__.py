"""Two-view training loaders and single-view eval loaders behind one interface, picked by backend name.

    loader = build_two_view_loader("ffcv", source="imagefolder", path="train.beton", resolution=224, ...)
    loader.set_epoch(epoch)          # the order (and the augmentation draws) of that epoch
    loader.set_epoch(epoch, start_batch=k, state=saved)   # resume: batches k.. of that epoch, nothing before
    saved = loader.position_state()  # after leaving an epoch early: what a resume passes back (or None)
    for batch in loader: ...         # TwoViewBatch on `device`, normalised, channels_last
    len(loader)                      # steps per epoch, the same on every rank

`path` is the `.beton` for ffcv, and for dali / torchvision the folder `pipelines.sources.open_source` reads
(ImageFolder split folder, tiny-imagenet-200 root, CIFAR root) or webdataset shards (`pipelines.loaders.wds_shards`:
DALI's reader, or the `webdataset` package as the reference); the synthetic source needs no path (its images are
generated from the `synthetic` keyword arguments). Backends are imported on first use: ffcv and DALI are heavy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mixmask.batches import TwoViewBatch
from mixmask.errors import UserError, choice_error
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE_MAX, AugSpec, resolve
from pipelines.backends import BACKENDS
from pipelines.loaders.wds_shards import build_shard_loader, is_shard_path


class TwoViewLoader(Protocol):
    """What the training loop relies on, whatever the backend."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None: ...

    def position_state(self) -> dict | None: ...

    def __iter__(self) -> Iterator[TwoViewBatch]: ...


@dataclass
class SplitImages:
    """A split as the file-reading backends see it: file paths or an image array, and labels in class order.

    Shape:
        images: (N, H, W, 3) uint8 when array-backed; labels: (N,) int64
    """

    files: list[str] | None
    images: np.ndarray | None
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def open_split(source: str, path: str | None, split: str, synthetic: dict | None) -> SplitImages:
    """Open a split through `pipelines.sources` (labels in the converter's class order)."""
    from pipelines.sources import open_source

    kwargs = dict(synthetic or {})
    if source != "synthetic" and path is None:
        raise UserError(f"source {source!r} needs data.path (the dataset folder)")
    src = open_source(source, None if source == "synthetic" else path, split, **kwargs)
    arrays = src.arrays()
    if arrays is not None:
        images, labels = arrays
        return SplitImages(None, np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64),
                           list(src.class_names))
    files = [src.path(i) for i in range(len(src))]
    labels = np.fromiter((src.label(i) for i in range(len(src))), dtype=np.int64, count=len(src))
    if not files:
        raise UserError(f"no images found for source {source!r} split {split!r} at {path}")
    return SplitImages(files, None, labels, list(src.class_names))


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, which cgroups, SLURM and taskset narrow."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


def fit_workers(workers: int) -> int:
    """`workers` capped at the usable cores: FFCV's numba threads cannot exceed them, and more only contend."""
    return min(workers, usable_cores())


def _loader_class(backend: str, *, eval_loader: bool) -> Any:
    """The two-view (or eval) loader class of `backend`, its module imported now."""
    if backend not in BACKENDS:
        raise choice_error("loader backend", backend, BACKENDS)
    entry = BACKENDS[backend]
    return getattr(importlib.import_module(entry.module), entry.eval_class if eval_loader else entry.two_view_class)


def build_two_view_loader(backend: str, *, source: str, path: str | None, split: str = "train", resolution: int,
                          batch_size_per_rank: int, recipe: str | tuple[AugSpec, AugSpec], rank: int,
                          world_size: int, seed: int, workers: int, device: torch.device,
                          dtype: torch.dtype = torch.float32, channels_last: bool = True, drop_last: bool = True,
                          os_cache: bool = True, batches_ahead: int = 2, order: str = "random",
                          order_window: int = 8192, synthetic: dict | None = None, shuffle_buffer: int = 4096,
                          shard_url: str = "", max_bad_fraction: float = 0.01) -> TwoViewLoader:
    """A loader of `TwoViewBatch`es for this rank's shard; see the module docstring.

    `order`: `random` (every backend) or `quasi_random` (ffcv: pages, `pipelines.loaders.order`), with
    `order_window` samples shuffled together. dali / torchvision skip unreadable files and stop past
    `max_bad_fraction` of an epoch (`bad_files` lists them).
    """
    # Shards are read by the backend's shard reader (`build_shard_loader`).
    cls = None if is_shard_path(path) else _loader_class(backend, eval_loader=False)
    if order != "random" and backend != "ffcv":
        raise UserError(f"order {order!r} reads .beton pages: it needs the ffcv backend, not {backend}")
    if batch_size_per_rank < 1:
        raise UserError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
    views = resolve(recipe, resolution)
    common = dict(resolution=resolution, batch_size_per_rank=batch_size_per_rank, views=views, rank=rank,
                  world_size=world_size, seed=seed, workers=fit_workers(workers), device=torch.device(device),
                  dtype=dtype,
                  channels_last=channels_last, drop_last=drop_last, batches_ahead=batches_ahead)
    if is_shard_path(path):
        loader = build_shard_loader(backend, path, split, shuffle_buffer, shard_url, eval_loader=False, **common)
    elif backend == "ffcv":
        loader = cls(path, os_cache=os_cache, order=order, order_window=order_window, **common)
    else:
        loader = cls(open_split(source, path, split, synthetic), max_bad_fraction=max_bad_fraction, **common)
    if len(loader) == 0:
        raise UserError(f"batch_size_per_rank={batch_size_per_rank} x world_size={world_size} exceeds the "
                        f"{source} {split} split: no full batch per epoch")
    return loader


def build_eval_loader(backend: str, *, source: str, path: str | None, split: str, resolution: int,
                      batch_size_per_rank: int, train_aug: bool, rank: int, world_size: int, workers: int,
                      device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32,
                      channels_last: bool = True, mean: tuple[float, float, float] = IMAGENET_MEAN,
                      std: tuple[float, float, float] = IMAGENET_STD, os_cache: bool = True, batches_ahead: int = 2,
                      synthetic: dict | None = None, shuffle_buffer: int = 4096, shard_url: str = "",
                      max_bad_fraction: float = 0.01) -> Any:
    """Single-view (images, labels) batches, no drop_last: RRC + flip if `train_aug`, else (resize +) centre crop.

    With world_size > 1 the last shard is padded by wrapping (DistributedSampler semantics); the loader's
    `num_samples` (the split's size) and `rank_layout` (`strided`, or `contiguous` for webdataset shards) let
    `mixmask.evaluation.features.unshard` drop the duplicates after a gather.
    """
    cls = None if is_shard_path(path) else _loader_class(backend, eval_loader=True)
    common = dict(resolution=resolution, batch_size_per_rank=batch_size_per_rank, train_aug=train_aug, rank=rank,
                  world_size=world_size, workers=fit_workers(workers), device=torch.device(device), seed=seed,
                  mean=mean,
                  std=std, dtype=dtype, channels_last=channels_last, batches_ahead=batches_ahead,
                  small=resolution <= SMALL_IMAGE_MAX)
    if is_shard_path(path):
        return build_shard_loader(backend, path, split, shuffle_buffer, shard_url, eval_loader=True, **common)
    if backend == "ffcv":
        return cls(path, os_cache=os_cache, **common)
    return cls(open_split(source, path, split, synthetic), max_bad_fraction=max_bad_fraction, **common)


__all__ = ["BACKENDS", "SplitImages", "TwoViewLoader", "build_eval_loader", "build_two_view_loader", "fit_workers",
           "open_split", "usable_cores"]
