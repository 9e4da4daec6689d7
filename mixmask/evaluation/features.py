"""Evaluation pieces shared by the kNN monitor of training (`mixmask.run.build`) and by eval.py: features, weighted
kNN, accuracies, batch sizes and sharding, and rebuilding a backbone from a training checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixmask.core import distributed as dist_utils
from mixmask.errors import UserError


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
               k: int = 200, temperature: float = 0.1, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Class votes of weighted kNN on cosine similarity: each of the k nearest neighbours votes exp(sim / T).

    This is the monitor of the MoCo CIFAR demo and Un-Mix (Wu et al., 2018, instance discrimination). Features are
    L2-normalised here, so callers may pass raw backbone outputs. Test features are processed in chunks so the
    (chunk, N_train) similarity matrix bounds memory; k is clipped to N_train.

    Shape:
        train_features: (N, D); train_labels: (N,) long; test_features: (M, D) → (M, num_classes) float32
    """
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].float().to(train.device), dim=1)
        sim = test @ train.T  # (chunk, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(test.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    if not scores:
        return torch.empty(0, num_classes, device=train.device)
    return torch.cat(scores)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 200, temperature: float = 0.1, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN predictions: the class with the most `knn_scores` votes.

    Shape:
        train_features: (N, D); train_labels: (N,) long; test_features: (M, D) → (M,) long
    """
    votes = knn_scores(train_features, train_labels, test_features, k=k, temperature=temperature,
                       num_classes=num_classes, chunk_size=chunk_size)
    return votes.argmax(dim=1)


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    if dist_utils.is_distributed():
        features = gather_variable(features)
        label_t = gather_variable(label_t)
    return features, label_t


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank; nothing without a process group.

    Training runs DDP with `broadcast_buffers=False`, so each rank's running statistics follow its own batches,
    while a checkpoint holds rank 0's. Evaluating every shard with rank 0's buffers evaluates the saved model, and
    gives the same numbers after a resume (which loads rank 0's buffers on every rank).
    """
    if not dist_utils.is_distributed():
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


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


RANK_LAYOUTS = ("strided", "contiguous")


def eval_batch_per_rank(global_batch: int, world_size: int, *, minimum: int = 1) -> int:
    """This rank's share of the global evaluation batch (`eval.batch_size`), at least `minimum`: a world larger
    than the batch still gives every rank a batch."""
    return max(minimum, global_batch // world_size)


def unshard(x: torch.Tensor, world_size: int, num_samples: int, layout: str = "strided") -> torch.Tensor:
    """Undo the sharding of an unshuffled evaluation epoch after `gather_variable`, dropping the padding.

    Every rank yields ceil(N / W) samples. `strided` (`pipelines.loaders.sharding`): rank r visits positions
    r, r + W, r + 2W, ... of an order padded by wrap-around to a multiple of W, so the rank-major gathered tensor,
    viewed as (W, P) and transposed, is the dataset order and its first N rows are the dataset once. `contiguous`
    (webdataset shards): rank r reads positions [N·r // W, N·(r+1) // W) and pads the end of its share, so each
    rank's leading rows are kept. A gathered size that does not fit is a bug: it raises rather than count twice.

    Shape:
        x: (W·P, ...) → (num_samples, ...)
    """
    if layout not in RANK_LAYOUTS:
        raise ValueError(f"unknown rank layout {layout!r}; valid: {RANK_LAYOUTS}")
    if world_size <= 1:
        if x.shape[0] != num_samples:
            raise RuntimeError(f"an evaluation epoch yielded {x.shape[0]} samples, the split has {num_samples}")
        return x
    per_rank = -(-num_samples // world_size)
    if x.shape[0] != per_rank * world_size:
        raise RuntimeError(f"gathered {x.shape[0]} evaluation samples from {world_size} ranks, expected "
                           f"{per_rank * world_size} ({num_samples} padded to a multiple of the world size)")
    if layout == "contiguous":
        spans = [num_samples * (r + 1) // world_size - num_samples * r // world_size for r in range(world_size)]
        return torch.cat([x[r * per_rank: r * per_rank + n] for r, n in enumerate(spans)])
    return x.view(world_size, per_rank, *x.shape[1:]).transpose(0, 1).reshape(x.shape)[:num_samples]


def remap_labels(labels: torch.Tensor, label_map: list[int] | None) -> torch.Tensor:
    """A held-out split's labels on the train split's class list (`pipelines.sidecar.label_map`); None = same list.

    Shape:
        labels: (N,) long → (N,) long
    """
    if label_map is None or not labels.numel():
        return labels
    table = torch.as_tensor(label_map, dtype=torch.long, device=labels.device)
    if int(labels.min()) < 0 or int(labels.max()) >= len(label_map):
        raise RuntimeError(f"held-out labels up to {int(labels.max())} but its class list has {len(label_map)}")
    return table[labels.long()]


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """UserError when the data holds a label outside [0, num_classes) (a dataset with more classes than expected)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"the {what} data has labels up to {int(labels.max())} but {num_classes} classes were "
                        "expected: the dataset's class count differs from the one the evaluation was set up for")


# ---- checkpoints → backbone


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user named: a .pt file, or a run directory (its `checkpoints/last.pt`)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"run directory {str(path)!r} holds no checkpoints/last.pt (was the run started?)")
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist (pass checkpoints/last.pt or the run directory)")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint (`RUN/checkpoints/last.pt` → `RUN`)."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def describe_backbone(state: dict[str, torch.Tensor]) -> str:
    """'resnet50, ImageNet stem' style description of a torchvision ResNet state dict, for error messages."""
    if "conv1.weight" not in state:
        return "an unknown architecture"
    arch = "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"
    if arch == "resnet18" and "layer4.1.conv2.weight" not in state:
        arch = "a small ResNet"
    stem = "CIFAR stem" if state["conv1.weight"].shape[-1] == 3 else "ImageNet stem"
    return f"{arch} ({stem})"


def backbone_state(method_state: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The `backbone.*` entries of a method state dict, prefix removed (torchvision names, no `fc.*`); UserError
    naming `source` when there are none."""
    state = {k[len("backbone."):]: v for k, v in method_state.items() if k.startswith("backbone.")}
    if not state:
        raise UserError(f"{source} holds no backbone.* weights; it was not written by train.py")
    return state


def load_backbone(state: dict[str, torch.Tensor], arch: str, *, cifar_stem: bool, source: str
                  ) -> tuple[nn.Module, int]:
    """A fresh `arch` backbone holding `state`, and its feature width; UserError naming both architectures
    when they do not match.

    The load is non-strict only to turn a mismatch into a clear message: missing and unexpected keys are checked
    to be exactly none (the MoCo v3 habit of asserting the exact missing keys).
    """
    from mixmask.core.backbones import build_backbone

    backbone, feature_dim = build_backbone(arch, cifar_stem=cifar_stem)
    expected = backbone.state_dict()
    wanted = f"{arch} ({'CIFAR' if cifar_stem else 'ImageNet'} stem)"
    mismatch = UserError(f"{source} holds a {describe_backbone(state)} backbone but method.arch={arch} "
                         f"method.cifar_stem={cifar_stem} asks for a {wanted}; drop the method.* overrides "
                         "(the architecture comes from the checkpoint)")
    if any(k in expected and expected[k].shape != v.shape for k, v in state.items()):
        raise mismatch
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise mismatch
    return backbone, feature_dim
