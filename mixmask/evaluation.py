"""Evaluation protocols shared by the kNN monitor in train.py and by eval.py: features and weighted kNN."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mixmask import distributed as dist_utils


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 200, temperature: float = 0.1, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN on cosine similarity: each of the k nearest neighbours votes exp(sim / T) for its label.

    This is the monitor of the MoCo CIFAR demo and Un-Mix (Wu et al., 2018, instance discrimination). Features are
    L2-normalised here, so callers may pass raw backbone outputs. Test features are processed in chunks so the
    (chunk, N_train) similarity matrix bounds memory.

    Shape:
        train_features: (N, D); train_labels: (N,) long; test_features: (M, D) → (M,) long
    """
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].float().to(train.device), dim=1)
        sim = test @ train.T  # (chunk, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(test.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=train.device)
    return torch.cat(preds)


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device, *, dtype: torch.dtype | None = None,
                     gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels for every batch, in eval mode; gathered from all ranks when distributed.

    Every rank must call this (it runs collectives when a process group exists), each with its own shard.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in batches:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32):
            f = backbone(images)
        feats.append(f.float())
        labels.append(y.to(device))
    backbone.train(was_training)
    features = torch.cat(feats) if feats else torch.empty(0, device=device)
    label_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    if gather and dist_utils.is_distributed():
        features = gather_variable(features)
        label_t = gather_variable(label_t)
    return features, label_t


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (evaluation shards), in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]  # sync point: evaluation only
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)])


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (pred.cpu() == target.cpu()).float().mean().item() if target.numel() else float("nan")


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies in percent (k clipped to the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == target[:, None]).any(dim=1)
        out[k] = 100.0 * hit.float().mean().item()
    return out
