"""The pieces train.py joins: loaders, method and operator from the config, kNN monitor, artifacts.

This is the only module that maps config sections onto the plain keyword arguments of the library (loaders,
`build_method`, `MixingOperator`), so the library itself never sees a config object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mixmask.run import launch
from mixmask.run.config import Config
from pipelines.prepare import DataPaths, train_order


class KnnLoaders(NamedTuple):
    """The kNN monitor's data: the training split as the feature bank, the held-out split as the queries."""

    bank: Any  # pipelines.loaders eval loader: (images, labels) batches of this rank's shard
    query: Any
    num_classes: int
    val_label_map: list[int] | None  # held-out label → train label, when the splits' class lists differ


def build_loaders(cfg: Config, data: DataPaths, run: launch.Launch, batch_size_per_rank: int,
                  autocast: torch.dtype | None):
    """The two-view training loader and, when a held-out split exists and `run.knn_every` > 0, the `KnnLoaders`
    (else None). Images come in the autocast dtype (`mixmask.run.step.autocast_dtype`; None: fp32)."""
    from pipelines.augment import recipe
    from pipelines.loaders import build_eval_loader, build_two_view_loader

    dtype = autocast or torch.float32
    views = recipe(cfg.aug.recipe, cfg.data.resolution)
    if cfg.aug.crop_min_scale is not None:
        views = tuple(replace(v, crop_scale=(cfg.aug.crop_min_scale, v.crop_scale[1])) for v in views)
    common = dict(source=cfg.data.source, resolution=cfg.data.resolution, rank=run.rank,
                  world_size=run.world_size, workers=cfg.data.workers, device=run.device,
                  max_bad_fraction=cfg.data.max_bad_fraction)
    if cfg.data.shard_url:  # webdataset shards whose tars live elsewhere (an object store)
        common["shard_url"] = cfg.data.shard_url
    train = build_two_view_loader(
        cfg.data.backend, path=data.train, split="train", batch_size_per_rank=batch_size_per_rank,
        recipe=views, seed=cfg.run.seed, dtype=dtype, channels_last=cfg.run.channels_last,
        os_cache=cfg.data.os_cache, batches_ahead=cfg.data.batches_ahead, synthetic=data.synthetic_train or None,
        shuffle_buffer=cfg.data.shuffle_buffer, order=train_order(cfg.data, data.train),
        order_window=cfg.data.order_window, **common)
    if cfg.run.knn_every == 0 or (data.val is None and not data.synthetic_val):
        return train, None
    from mixmask.evaluation.features import eval_batch_per_rank

    # At most 256 images per rank: the monitor runs beside the training step's memory.
    eval_batch = min(256, eval_batch_per_rank(cfg.eval.batch_size, run.world_size))
    bank = build_eval_loader(cfg.data.backend, path=data.train, split="train", batch_size_per_rank=eval_batch,
                             train_aug=False, synthetic=data.synthetic_train or None, **common)
    query = build_eval_loader(cfg.data.backend, path=data.val, split="val", batch_size_per_rank=eval_batch,
                              train_aug=False, synthetic=data.synthetic_val or None, **common)
    return train, KnnLoaders(bank, query, data.num_classes, data.val_label_map)


def build_method_from_config(cfg: Config, *, world_size: int = 1) -> torch.nn.Module:
    """The Siamese method `cfg.method.name` around a fresh backbone, from its own section `method.<name>`.

    `world_size` is the launch's: MoCo's split BatchNorm applies in one process only (`MoCoParams.bn_splits_in_use`).
    """
    from mixmask.core.backbones import build_backbone
    from mixmask.core.methods import build_method_from_params

    m = cfg.method
    backbone, feature_dim = build_backbone(m.arch, cifar_stem=m.cifar_stem)
    return build_method_from_params(m.name, m.params, backbone=backbone, feature_dim=feature_dim,
                                    world_size=world_size, sync_bn=m.sync_bn)


def build_operator(cfg: Config):
    from mixmask.core.operator import MixingOperator
    from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD

    ratio = cfg.mask.ratio if cfg.mask.ratio_max is None else (cfg.mask.ratio, cfg.mask.ratio_max)
    fill: str | torch.Tensor = cfg.mask.erase_fill
    if fill == "zero":  # black pixels: 0 before normalisation is −mean/std after it (0 after it is the mean)
        fill = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    return MixingOperator(cfg.method.branch, mask_kind=cfg.mask.kind, grid_size=cfg.mask.grid_size,
                          mask_ratio=ratio, share=cfg.mask.share, permutation=cfg.mask.permutation,
                          unmix_prob=cfg.method.unmix_prob, unmix_beta=cfg.method.unmix_beta,
                          erase_fill=fill)


def knn_monitor(backbone: torch.nn.Module, loaders: KnnLoaders, cfg: Config, device: torch.device,
                autocast: torch.dtype | None) -> float:
    """kNN top-1 (%) of held-out images against the training set's features (every rank takes part)."""
    from mixmask.core.distributed import get_world_size
    from mixmask.evaluation.features import (
        accuracy,
        broadcast_buffers,
        extract_features,
        knn_predict,
        remap_labels,
        unshard,
    )

    world = get_world_size()
    broadcast_buffers(backbone)  # every rank evaluates the weights rank 0 saves (BN statistics are rank-local)
    bank_x, bank_y = extract_features(backbone, loaders.bank, device, dtype=autocast)
    query_x, query_y = extract_features(backbone, loaders.query, device, dtype=autocast)
    # Under torchrun the shards are padded by wrap-around: drop the duplicates so each image counts once.
    bank_x, bank_y = (unshard(t, world, loaders.bank.num_samples, loaders.bank.rank_layout) for t in (bank_x, bank_y))
    query_x, query_y = (unshard(t, world, loaders.query.num_samples, loaders.query.rank_layout)
                        for t in (query_x, query_y))
    query_y = remap_labels(query_y, loaders.val_label_map)
    pred = knn_predict(bank_x, bank_y, query_x, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       num_classes=loaders.num_classes)
    return accuracy(pred, query_y)


def write_run_artifacts(cfg: Config, method: torch.nn.Module, run_dir: Path, knn_loaders: KnnLoaders | None,
                        device: torch.device, autocast: torch.dtype | None, log: Callable[[str], None], *,
                        is_main: bool = True) -> dict:
    """backbone.pt, the loss curve and mask figure, and kNN of the trained backbone beside a random-init one.

    Every rank calls this (the kNN evaluations are collectives); rank 0 alone writes files.
    """
    out: dict = {}
    if knn_loaders is not None:
        trained = knn_monitor(method.backbone, knn_loaders, cfg, device, autocast)
        torch.manual_seed(cfg.run.seed)
        random_init = build_method_from_config(cfg).backbone.to(device)
        baseline = knn_monitor(random_init, knn_loaders, cfg, device, autocast)
        out.update(knn_top1=trained, knn_top1_random_init=baseline)
        log(f"kNN top-1 on the held-out split: trained {trained:.2f}% vs random init {baseline:.2f}% "
            f"(k={cfg.eval.knn_k}, {knn_loaders.num_classes} classes)")
    if not is_main:
        return out
    from mixmask.run.checkpoint import save_atomic
    from mixmask.run.report import plot_training_curves

    save_atomic({k: v.detach().cpu() for k, v in method.backbone.state_dict().items()}, run_dir / "backbone.pt")
    out["backbone"] = str(run_dir / "backbone.pt")
    out["loss_curve"] = str(plot_training_curves(run_dir, run_dir / "loss_curve.png",
                                                 knn_reference=out.get("knn_top1_random_init")))
    try:
        from mixmask.visualize import render_mask_figure

        res = max(cfg.data.resolution, 96)
        render_mask_figure(run_dir / "masks.png", grid_sizes=(2, 4, 8), resolution=res)
        out["masks"] = str(run_dir / "masks.png")
    except ImportError as err:  # scikit-image's bundled photographs are optional at run time
        log(f"mask figure skipped: {err}")
    if "knn_top1" in out:
        (run_dir / "final_knn.json").write_text(json.dumps(out, indent=2))
    log(f"wrote {', '.join(str(v) for k, v in out.items() if isinstance(v, str))}")
    return out
