"""Semi-supervised evaluation: fine-tune the whole network on 1% or 10% of the labels (SimCLR, Chen et al. 2020,
section 6; BYOL and MoCo report the same protocol).

The labelled subset is either class-balanced and seeded (the same fraction of every class, at least one image per
class) or read from a file with one image per line, like SimCLR's `1percent.txt` / `10percent.txt` (file names such
as `n01440764_10026.JPEG`) or plain dataset indices. The subset's images come straight from the dataset source
(`pipelines.sources`), decoded and augmented per image with torchvision (random-resized-crop + flip), since a 1-10%
subset is small; validation uses the configured loader backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixmask.errors import UserError
from mixmask.evaluation.linear_probe import sgd_epochs


def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-balanced subset: round(fraction · n_c) images of each class c, at least 1.

    Shape:
        labels: (N,) int → (M,) int64
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"eval.semisup_fraction={fraction} must be in (0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(len(members), max(1, round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def read_subset_file(path: str | Path, num_samples: int, names: Sequence[str | None] | None = None) -> np.ndarray:
    """Indices listed in a subset file: one dataset index or image file name per line (`#` comments, blanks ok).

    File names are matched on their base name (SimCLR's split files list `n01440764_10026.JPEG`) against `names`,
    the dataset's file paths in index order. Duplicates are kept once; the result is sorted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"subset file {str(path)!r} does not exist")
    entries = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise UserError(f"subset file {str(path)!r} lists no images")
    by_name: dict[str, int] | None = None
    out = []
    for lineno, entry in enumerate(entries, 1):
        if entry.isdigit():
            index = int(entry)
            if index >= num_samples:
                raise UserError(f"subset file {str(path)!r}: index {index} is out of range (the dataset has "
                                f"{num_samples} images)")
            out.append(index)
            continue
        if by_name is None:
            by_name = {Path(n).name: i for i, n in enumerate(names or []) if n is not None}
            if not by_name:
                raise UserError(f"subset file {str(path)!r} lists file names ({entry!r}) but this dataset has no "
                                "files (synthetic / array source): list image indices instead")
        key = Path(entry).name
        if key not in by_name:
            raise UserError(f"subset file {str(path)!r}: {entry!r} (entry {lineno}) is not an image of the dataset")
        out.append(by_name[key])
    return np.unique(np.asarray(out, dtype=np.int64))


class SubsetDataset(torch.utils.data.Dataset):
    """The labelled subset of a `pipelines.sources.Source` to fine-tune on: (image tensor, label) pairs, augmented
    per image with random-resized-crop (scale 0.08-1) + horizontal flip, normalised with `mean` / `std`.

    Validation does not come through here: it uses the configured eval loader, whose centre crop every backend
    shares (`pipelines.augment.EVAL_CROP_RATIO`).
    """

    def __init__(self, source, indices: np.ndarray, *, resolution: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float]):
        from torchvision import transforms as T

        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        geometric = [T.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip()]
        self.transform = T.Compose([T.ToTensor(), *geometric, T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        return self.transform(np.ascontiguousarray(self.source.load(index))), self.source.label(index)


def subset_loader(dataset: SubsetDataset, *, batch_size_per_rank: int, rank: int, world_size: int, workers: int,
                  seed: int) -> torch.utils.data.DataLoader:
    """A shuffled loader of this rank's shard of the subset (DistributedSampler with explicit rank, no group needed).

    Batches smaller than 2 are dropped when possible: BatchNorm in train mode cannot normalise a single image.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed)
    per_rank = math.ceil(len(dataset) / world_size)
    drop_last = per_rank > batch_size_per_rank and per_rank % batch_size_per_rank == 1
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size_per_rank, sampler=sampler, num_workers=workers,
                                       drop_last=drop_last, persistent_workers=workers > 0)


def finetune(model: nn.Module, loader: Iterable, *, epochs: int, backbone_lr: float, head_lr: float,
             device: torch.device, head_prefix: str = "1.", dtype: torch.dtype | None = None) -> list[float]:
    """Fine-tune every parameter of `model` (train mode, BN included): SGD, momentum 0.9, no weight decay, cosine.

    `model` may be DDP-wrapped; parameters whose name starts with `head_prefix` (after DDP's `module.`) get
    `head_lr`, the rest `backbone_lr`. `loader` may have `set_epoch` (DistributedSampler's). Returns epoch losses.
    """
    head, body = [], []
    for name, p in model.named_parameters():
        (head if name.removeprefix("module.").startswith(head_prefix) else body).append(p)
    optimizer = torch.optim.SGD([{"params": body, "base_lr": backbone_lr}, {"params": head, "base_lr": head_lr}],
                                lr=backbone_lr, momentum=0.9, weight_decay=0.0)

    def epoch_batches(epoch: int) -> Iterable:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        model.train()
        return loader

    def step_loss(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        return F.cross_entropy(logits.float(), y.to(device))

    return sgd_epochs(optimizer, epoch_batches, max(1, len(loader)), step_loss,  # type: ignore[arg-type]
                      epochs=epochs, schedule="cosine", device=device)
