"""Linear evaluation of a frozen backbone: the MoCo protocol (He et al. 2020, `main_lincls.py`).

A linear classifier on the features of a frozen backbone kept in eval mode (BatchNorm uses its running statistics),
trained with SGD (lr 30, momentum 0.9, no weight decay) and a step schedule (÷10 at 60% and 80% of the epochs) or
a cosine one. Two paths: on cached features of centre crops (fast: the backbone runs once), or on augmented images
(random-resized-crop + flip, the backbone runs every epoch). MoCo v3's sanity check confirms afterwards that the
frozen weights did not change.

Every rank calls the training functions: on cached features each rank does the same work on all of them; on
images each trains on its shard and DDP averages the head's gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixmask.core.schedule import lr_at
from mixmask.evaluation.features import topk_accuracy


def linear_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """The classifier, initialised as MoCo's `main_lincls.py` (weights N(0, 0.01), bias 0)."""
    head = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def freeze(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Freeze `backbone` (no gradients, eval mode) and return a CPU copy of its state for `assert_unchanged`."""
    backbone.eval()
    backbone.requires_grad_(False)
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


def changed_keys(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """State-dict entries (weights and BN buffers) of `backbone` that differ from `reference`, or are missing."""
    state = backbone.state_dict()
    changed = [k for k in reference if k not in state or not torch.equal(state[k].detach().cpu(), reference[k])]
    return changed + [k for k in state if k not in reference]


def assert_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """MoCo v3's `sanity_check`: the frozen backbone, running BN statistics included, is bit-identical.

    A failure is a bug in the protocol (a parameter left trainable, BN left in train mode), hence AssertionError.
    """
    changed = changed_keys(backbone, reference)
    assert not changed, f"the frozen backbone changed during linear evaluation: {changed[:5]}"


def sgd_epochs(optimizer: torch.optim.Optimizer, epoch_batches: Callable[[int], Iterable], steps: int,
               step_loss: Callable[[Any, torch.Tensor], torch.Tensor], *, epochs: int, schedule: str,
               device: torch.device) -> list[float]:
    """The training loop both probes and the fine-tuning share: `epochs` passes over `epoch_batches(epoch)` (of
    `steps` batches each), the learning rate of every parameter group set each step from its `base_lr` (no
    warm-up, as MoCo's `main_lincls.py`). Returns the mean loss of each epoch."""
    losses = []
    for epoch in range(epochs):
        total, count = torch.zeros((), device=device), 0
        for i, (inputs, labels) in enumerate(epoch_batches(epoch)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + i, total_steps=epochs * steps, warmup_steps=0,
                                    peak_lr=group["base_lr"], schedule=schedule)
            loss = step_loss(inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        losses.append(total.item() / max(1, count))  # sync point: once per epoch
    return losses


def _sgd(head: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": list(head.parameters()), "base_lr": lr}], lr=lr, momentum=0.9,
                           weight_decay=0.0)


def train_on_features(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear, *, epochs: int, lr: float,
                      schedule: str, batch_size: int, generator: torch.Generator | None = None) -> list[float]:
    """Train `head` on cached features (every rank holds all of them and does the same, identical work).

    Returns the mean training loss of each epoch.

    Shape:
        features: (N, D) float; labels: (N,) long
    """

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        return ((features[idx], labels[idx]) for idx in order.split(batch_size))

    return sgd_epochs(_sgd(head, lr), epoch_batches, max(1, math.ceil(features.shape[0] / batch_size)),
                      lambda x, y: F.cross_entropy(head(x), y), epochs=epochs, schedule=schedule,
                      device=features.device)


def train_on_images(backbone: nn.Module, head: nn.Module, loader: Iterable, *, epochs: int, lr: float,
                    schedule: str, device: torch.device, dtype: torch.dtype | None = None) -> list[float]:
    """Train `head` on frozen-backbone features of augmented images; the loader yields this rank's shard.

    When distributed, `head` is DDP-wrapped by the caller (as for `semisup.finetune`): DDP averages its gradients
    over the ranks' shards, which keeps the replicas identical. `loader` may have `set_epoch(epoch)` (reshuffles
    and redraws the augmentation); the backbone stays in eval mode.
    """

    def epoch_batches(epoch: int) -> Iterable:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        backbone.eval()
        return loader

    def step_loss(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats = backbone(images.to(device, non_blocking=True))
        return F.cross_entropy(head(feats.float()), y.to(device))

    return sgd_epochs(_sgd(head, lr), epoch_batches, max(1, len(loader)),  # type: ignore[arg-type]
                      step_loss, epochs=epochs, schedule=schedule, device=device)


@torch.no_grad()
def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """`{"top1": ..., "top5": ...}` in percent.

    Shape:
        logits: (N, C); labels: (N,) long
    """
    acc = topk_accuracy(logits.float(), labels.to(logits.device), ks=(1, 5))
    return {"top1": acc[1], "top5": acc[5]}
