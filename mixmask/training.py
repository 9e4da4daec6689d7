"""The pieces train.py joins: data preparation, loaders, method and operator from the config, kNN monitor, artifacts.

This is the only module that maps config sections onto the plain keyword arguments of the library (loaders,
`build_method`, `MixingOperator`), so the library itself never sees a config object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mixmask import launch
from mixmask.config import Config
from mixmask.errors import UserError


@dataclass
class DataPaths:
    """Where the training and held-out data live, and how many classes they have."""

    train: str | None
    val: str | None
    num_classes: int
    synthetic_train: dict = field(default_factory=dict)
    synthetic_val: dict = field(default_factory=dict)
    # Train label id of each held-out class (`pipelines.sidecar.label_map`); None when both splits list the same
    # classes. Labels come from one class list, the train split's.
    val_label_map: list[int] | None = None


def synthetic_kwargs(cfg: Config, split: str) -> dict:
    """Generator arguments of the synthetic default (fixed data seed: the dataset does not change with run.seed)."""
    n = cfg.data.synthetic_images if split == "train" else cfg.data.synthetic_val_images
    return dict(num_images=n, num_classes=cfg.data.synthetic_classes, resolution=cfg.data.resolution, seed=0)


def synthetic_beton(cfg: Config, split: str) -> Path:
    from pipelines.synthetic import GENERATOR_VERSION

    kw = synthetic_kwargs(cfg, split)
    name = f"synthetic-v{GENERATOR_VERSION}-{kw['resolution']}px-{kw['num_images']}x{kw['num_classes']}-{split}.beton"
    return Path(cfg.data.data_dir) / name


def _class_names_from_sidecar(beton: Path) -> list[str]:
    from pipelines.sidecar import read_sidecar

    names = read_sidecar(beton).get("class_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{beton}.json (the converter's sidecar) lists no class_names: the class list is unknown")
    return [str(n) for n in names]


def _val_label_map(train_classes: list[str], val_classes: list[str], log: Callable[[str], None]) -> list[int] | None:
    """The held-out split's labels on the train split's class list; a note when it lacks some classes."""
    from pipelines.sidecar import label_map, lacking_note

    mapping, lacking = label_map(train_classes, val_classes, other="held-out (val)")
    if lacking:
        log(lacking_note(lacking, other="held-out (val)"))
    return mapping


def prepare_data(cfg: Config, run: launch.Launch, log: Callable[[str], None]) -> DataPaths:
    """Resolve the data paths; convert the synthetic default to .beton on first use (rank 0, others wait)."""
    from pipelines.loaders.wds_shards import is_shard_path

    if cfg.data.path and is_shard_path(cfg.data.path):  # webdataset shards, whatever data.source says
        return _shard_paths(cfg, log)
    if cfg.data.source == "synthetic":
        paths = DataPaths(train=None, val=None, num_classes=cfg.data.synthetic_classes,
                          synthetic_train=synthetic_kwargs(cfg, "train"), synthetic_val=synthetic_kwargs(cfg, "val"))
        if cfg.data.backend == "ffcv":
            from pipelines.convert import convert

            for split in ("train", "val"):
                out = synthetic_beton(cfg, split)
                if run.is_main and not out.is_file():
                    summary = convert("synthetic", out, split=split, **synthetic_kwargs(cfg, split))
                    log(f"wrote {out}: {summary.num_written} images in {summary.seconds:.1f}s")
            launch.barrier()
            paths.train, paths.val = str(synthetic_beton(cfg, "train")), str(synthetic_beton(cfg, "val"))
        return paths

    if not cfg.data.path:
        raise UserError(f"data.path is required for data.source={cfg.data.source!r} "
                        "(a .beton for data.backend=ffcv, the dataset root for dali/torchvision)")
    train = Path(cfg.data.path)
    if not train.exists():
        raise UserError(f"data.path={cfg.data.path!r} does not exist")
    if cfg.data.backend == "ffcv":
        if train.suffix != ".beton":
            raise UserError(f"data.backend=ffcv reads .beton files, got data.path={cfg.data.path!r}; convert with "
                            f"`python -m pipelines.convert {cfg.data.source} --root DIR --split train --out X.beton`")
        val = Path(cfg.data.val_path) if cfg.data.val_path else train.with_name(train.name.replace("train", "val"))
        train_classes = _class_names_from_sidecar(train)
        has_val = val.is_file() and val != train
        mapping = _val_label_map(train_classes, _class_names_from_sidecar(val), log) if has_val else None
        return DataPaths(train=str(train), val=str(val) if has_val else None, num_classes=len(train_classes),
                         val_label_map=mapping)
    from pipelines.sources import open_source

    source = open_source(cfg.data.source, train, "train")
    val_root = cfg.data.val_path or cfg.data.path
    try:
        val_classes: list[str] | None = list(open_source(cfg.data.source, val_root, "val").class_names)
    except UserError:  # no held-out split here: the loaders say so if one is needed
        val_classes = None
    mapping = _val_label_map(list(source.class_names), val_classes, log) if val_classes is not None else None
    return DataPaths(train=str(train), val=val_root, num_classes=len(source.class_names), val_label_map=mapping)


def _shard_paths(cfg: Config, log: Callable[[str], None]) -> DataPaths:
    """Webdataset shards: classes from their sidecar; held-out shards from data.val_path or the folder's val split."""
    from pipelines.loaders.wds_shards import is_shard_path, open_shards

    if cfg.data.backend not in ("dali", "torchvision"):
        raise UserError(f"data.path={cfg.data.path!r} holds webdataset shards: use data.backend=dali (or "
                        "torchvision, the reference reader); ffcv reads a .beton")
    train = open_shards(cfg.data.path, "train", cfg.data.shard_url)
    if train.num_missing:
        log(f"{train.num_missing} of {train.num_expected} samples are missing from the shards of "
            f"{cfg.data.path} (lost shard, truncated tar or member): skipped")
    val = cfg.data.val_path or None
    if val is None and Path(cfg.data.path).is_dir() and (Path(cfg.data.path) / "val.json").is_file():
        val = cfg.data.path
    if val is not None and not is_shard_path(val):
        raise UserError(f"data.val_path={val!r} must be webdataset shards too when data.path holds shards")
    mapping = None
    if val is not None:
        mapping = _val_label_map(list(train.class_names), list(open_shards(val, "val", cfg.data.shard_url).class_names),
                                 log)
    return DataPaths(train=cfg.data.path, val=val, num_classes=len(train.class_names), val_label_map=mapping)


def train_order(cfg: Config, path: str | None) -> str:
    """`data.order` resolved against the training file's size and this machine's RAM (`pipelines.loaders.order`)."""
    import psutil

    from pipelines.loaders.order import resolve_order

    file_bytes = Path(path).stat().st_size if cfg.data.backend == "ffcv" and path and Path(path).is_file() else 0
    return resolve_order(cfg.data.order, file_bytes=file_bytes, ram_bytes=psutil.virtual_memory().total,
                         ram_share=cfg.data.ram_share, os_cache=cfg.data.os_cache, backend=cfg.data.backend)


def build_loaders(cfg: Config, data: DataPaths, run: launch.Launch, batch_size_per_rank: int, use_bf16: bool):
    """The two-view training loader and, when a held-out split exists, the (bank, query) kNN monitor loaders."""
    from pipelines.augment import recipe
    from pipelines.loaders import build_eval_loader, build_two_view_loader

    dtype = torch.bfloat16 if use_bf16 else torch.float32
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
        shuffle_buffer=cfg.data.shuffle_buffer, order=train_order(cfg, data.train),
        order_window=cfg.data.order_window, **common)
    if cfg.run.knn_every == 0 or (data.val is None and not data.synthetic_val):
        return train, None
    eval_batch = max(1, min(256, cfg.eval.batch_size // run.world_size))
    bank = build_eval_loader(cfg.data.backend, path=data.train, split="train", batch_size_per_rank=eval_batch,
                             train_aug=False, synthetic=data.synthetic_train or None, **common)
    query = build_eval_loader(cfg.data.backend, path=data.val, split="val", batch_size_per_rank=eval_batch,
                              train_aug=False, synthetic=data.synthetic_val or None, **common)
    return train, (bank, query, data.num_classes, data.val_label_map)


def build_method_from_config(cfg: Config, num_classes: int | None = None, *, world_size: int = 1) -> torch.nn.Module:
    """The Siamese method of `cfg.method` around a fresh backbone (num_classes is unused by the methods).

    `world_size` decides whether MoCo's split BatchNorm applies (`config.bn_splits_in_use`: one process only).
    """
    from mixmask.backbones import build_backbone
    from mixmask.config import bn_splits_in_use
    from mixmask.methods import build_method

    m = cfg.method
    backbone, feature_dim = build_backbone(m.arch, cifar_stem=m.cifar_stem)
    hparams: dict
    if m.name == "moco":
        # MoCo v2's MLP hidden width is the backbone's feature width (512 for ResNet-18, 2048 for ResNet-50), as
        # in the official code; method.hidden_dim sizes the other methods' projectors.
        hparams = dict(version=2 if m.mlp_head else 1, dim=m.dim, mlp_hidden_dim=None,
                       queue_size=m.queue_size, momentum=m.momentum, temperature=m.temperature,
                       shuffle_bn=m.shuffle_bn and not m.sync_bn, sync_bn=m.sync_bn,
                       bn_splits=bn_splits_in_use(cfg, world_size))
    elif m.name == "simclr":
        hparams = dict(proj_hidden_dim=m.hidden_dim, proj_dim=m.dim, temperature=m.temperature)
    elif m.name == "byol":
        hparams = dict(proj_hidden_dim=m.hidden_dim, proj_dim=m.dim, pred_hidden_dim=m.pred_dim, base_tau=m.momentum)
    else:
        hparams = dict(proj_dim=m.dim, proj_hidden_dim=m.hidden_dim, proj_layers=m.proj_layers,
                       pred_hidden_dim=m.pred_dim)
    return build_method(m.name, backbone=backbone, feature_dim=feature_dim, **hparams)


def build_operator(cfg: Config):
    from mixmask.operator import MixingOperator
    from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD

    ratio = cfg.mask.ratio if cfg.mask.ratio_max is None else (cfg.mask.ratio, cfg.mask.ratio_max)
    fill: str | torch.Tensor = cfg.mask.erase_fill
    if fill == "zero":  # black pixels: 0 before normalisation is −mean/std after it (0 after it is the mean)
        fill = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    return MixingOperator(cfg.method.branch, mask_kind=cfg.mask.kind, grid_size=cfg.mask.grid_size,
                          mask_ratio=ratio, share=cfg.mask.share, permutation=cfg.mask.permutation,
                          unmix_prob=cfg.method.unmix_prob, unmix_beta=cfg.method.unmix_beta,
                          erase_fill=fill)


def knn_monitor(backbone: torch.nn.Module, loaders, cfg: Config, device: torch.device, use_bf16: bool) -> float:
    """kNN top-1 (%) of held-out images against the training set's features (every rank takes part)."""
    from mixmask.distributed import get_world_size
    from mixmask.evaluation import accuracy, broadcast_buffers, extract_features, knn_predict, remap_labels, unshard

    bank_loader, query_loader, num_classes, val_label_map = loaders
    dtype = torch.bfloat16 if use_bf16 else None
    world = get_world_size()
    broadcast_buffers(backbone)  # every rank evaluates the weights rank 0 saves (BN statistics are rank-local)
    bank_x, bank_y = extract_features(backbone, bank_loader, device, dtype=dtype)
    query_x, query_y = extract_features(backbone, query_loader, device, dtype=dtype)
    # Under torchrun the shards are padded by wrap-around: drop the duplicates so each image counts once.
    bank_x, bank_y = (unshard(t, world, bank_loader.num_samples, bank_loader.rank_layout) for t in (bank_x, bank_y))
    query_x, query_y = (unshard(t, world, query_loader.num_samples, query_loader.rank_layout)
                        for t in (query_x, query_y))
    query_y = remap_labels(query_y, val_label_map)
    pred = knn_predict(bank_x, bank_y, query_x, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       num_classes=num_classes)
    return accuracy(pred, query_y)


def write_run_artifacts(cfg: Config, method: torch.nn.Module, run_dir: Path, knn_loaders, device: torch.device,
                        use_bf16: bool, log: Callable[[str], None], *, is_main: bool = True) -> dict:
    """backbone.pt, the loss curve and mask figure, and kNN of the trained backbone beside a random-init one.

    Every rank calls this (the kNN evaluations are collectives); rank 0 alone writes files.
    """
    out: dict = {}
    if knn_loaders is not None:
        trained = knn_monitor(method.backbone, knn_loaders, cfg, device, use_bf16)
        torch.manual_seed(cfg.run.seed)
        random_init = build_method_from_config(cfg).backbone.to(device)
        baseline = knn_monitor(random_init, knn_loaders, cfg, device, use_bf16)
        out.update(knn_top1=trained, knn_top1_random_init=baseline)
        log(f"kNN top-1 on the held-out split: trained {trained:.2f}% vs random init {baseline:.2f}% "
            f"(k={cfg.eval.knn_k}, {knn_loaders[2]} classes)")
    if not is_main:
        return out
    from mixmask.checkpoint import save_atomic
    from mixmask.report import plot_training_curves

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
