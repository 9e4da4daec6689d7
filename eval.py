"""Evaluate a MixMask checkpoint: `python eval.py {knn,linear,semisup} --checkpoint PATH [key=value ...]`.

The backbone is rebuilt from the checkpoint's stored config; `key=value` overrides apply on top of it (e.g.
`eval.epochs=20`, or `data.*` to evaluate on other data). Runs single-process or under
`torchrun --nproc_per_node N eval.py ...` (every rank takes part; rank 0 prints and writes). Results: a table on
stdout and `eval_<protocol>.json` in the checkpoint's run directory (or `--out FILE`).
`python eval.py report RUN_DIR [RUN_DIR ...] [--out DIR]` draws the runs' curves and λ histograms and compares runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mixmask.errors import UserError, cli_entry
from mixmask.evaluation.features import (
    accuracy,
    backbone_state,
    check_labels,
    eval_batch_per_rank,
    extract_features,
    find_checkpoint,
    knn_scores,
    load_backbone,
    remap_labels,
    run_dir_of,
    topk_accuracy,
    unshard,
)
from mixmask.evaluation.linear_probe import (
    assert_unchanged,
    evaluate_logits,
    freeze,
    linear_head,
    train_on_features,
    train_on_images,
)
from mixmask.evaluation.semisup import SubsetDataset, balanced_subset, finetune, read_subset_file, subset_loader
from mixmask.run import launch
from mixmask.run.checkpoint import load_checkpoint
from mixmask.run.config import Config
from mixmask.run.config_cli import from_dict, resolve, to_dict
from mixmask.run.provenance import provenance
from mixmask.run.step import autocast_dtype
from pipelines.prepare import DataPaths, prepare_data, synthetic_kwargs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("knn", "weighted kNN (k=eval.knn_k, T=eval.knn_temperature) on backbone features"),
                            ("linear", "linear probe on the frozen backbone (MoCo protocol)"),
                            ("semisup", "fine-tune on eval.semisup_fraction of the labels")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="checkpoints/last.pt (or another .pt) or a run directory")
        p.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/eval_<protocol>.json)")
        p.add_argument("--num-classes", type=int, default=None,
                       help="classes the evaluation data must have (checked against the dataset)")
        if name == "semisup":
            p.add_argument("--subset", type=Path, default=None,
                           help="file with one image index or file name per line (e.g. SimCLR's 1percent.txt)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.epochs=20")
    p = sub.add_parser("report", help="curves, λ histogram and a comparison table of runs")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the run dir, or report/)")
    # Overrides may come before, between or after the flags (argparse alone stops at the first flag).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command == "report"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


@dataclass
class Context:
    """What every protocol needs: the resolved config, the launch, the loaded backbone and the data."""

    cfg: Config
    run: launch.Launch
    backbone: nn.Module
    feature_dim: int
    data: DataPaths
    dtype: torch.dtype | None  # autocast dtype (bf16 on CUDA), None for fp32
    args: argparse.Namespace
    log: Callable[[str], None]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "report":
        return report(args)
    ckpt_path = find_checkpoint(args.checkpoint)
    # The result's folder is checked before any work, not after minutes of evaluation.
    launch.check_writable_dir((args.out or run_dir_of(ckpt_path) / "eval.json").parent, "--out")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{ckpt_path} has no stored config dict; it was not written by train.py")
    cfg = resolve(None, None, args.overrides, base=from_dict(ckpt["config"]))
    state = backbone_state(ckpt["method"], source=str(ckpt_path))
    backbone, feature_dim = load_backbone(state, cfg.method.arch, cifar_stem=cfg.method.cifar_stem,
                                          source=str(ckpt_path))
    trained_for = {"checkpoint_epoch": ckpt.get("epoch"), "checkpoint_step": ckpt.get("step")}
    del ckpt, state  # the optimizer state and the rest are not needed: free the memory before the data arrives

    run = launch.init(cfg.run.device)
    console = Console(stderr=True)
    log: Callable[[str], None] = (lambda m: console.print(m, highlight=False)) if run.is_main else (lambda m: None)
    try:
        torch.manual_seed(cfg.run.seed)
        autocast = autocast_dtype(cfg.run.precision, run.device)
        data = prepare_data(cfg.data, is_main=run.is_main, barrier=launch.barrier, log=log)
        if data.val is None and cfg.data.source != "synthetic":
            raise UserError("no held-out split found: set data.val_path (a .beton for ffcv, a dataset root otherwise)")
        if args.num_classes is not None and args.num_classes != data.num_classes:
            raise UserError(f"--num-classes {args.num_classes} but the dataset ({cfg.data.source}, "
                            f"{cfg.data.path or 'synthetic default'}) has {data.num_classes} classes")
        if run.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        backbone = backbone.to(run.device)
        if cfg.run.channels_last:  # the loaders hand over channels_last batches
            backbone = backbone.to(memory_format=torch.channels_last)
        ctx = Context(cfg, run, backbone, feature_dim, data, autocast, args, log)
        t0 = time.perf_counter()
        results, extra = {"knn": knn, "linear": linear, "semisup": semisup}[args.command](ctx)
        seconds = time.perf_counter() - t0
        if run.is_main:
            out = args.out or run_dir_of(ckpt_path) / f"eval_{args.command}.json"
            record = {"protocol": args.command, "checkpoint": str(ckpt_path), "results": results, **extra,
                      **trained_for, "num_classes": data.num_classes, "world_size": run.world_size,
                      "device": str(run.device), "seconds": seconds, "overrides": list(args.overrides),
                      "config": to_dict(cfg), "provenance": provenance()}
            print_results(args.command, ckpt_path, results, extra, seconds)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
            tmp.replace(out)
            log(f"wrote {out}")
    finally:
        launch.shutdown()
    return 0


def print_results(protocol: str, ckpt_path: Path, results: dict, extra: dict, seconds: float) -> None:
    table = Table(title=f"{protocol} evaluation", caption=str(ckpt_path))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in {**results, **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))}}.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    table.add_row("seconds", f"{seconds:.1f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)


# ---- data


def _eval_loader(ctx: Context, split: str, *, train_aug: bool):
    from pipelines.loaders import build_eval_loader

    cfg, run = ctx.cfg, ctx.run
    path = ctx.data.train if split == "train" else ctx.data.val
    synthetic = ctx.data.synthetic_train if split == "train" else ctx.data.synthetic_val
    return build_eval_loader(cfg.data.backend, source=cfg.data.source, path=path, split=split,
                             resolution=cfg.data.resolution,
                             batch_size_per_rank=eval_batch_per_rank(cfg.eval.batch_size, run.world_size),
                             train_aug=train_aug, rank=run.rank, world_size=run.world_size,
                             workers=cfg.data.workers, device=run.device, synthetic=synthetic or None)


def _features(ctx: Context, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of `model` on the centre crops of a split, every sample once (no distributed padding), on every
    rank; labels on the train split's class list."""
    loader = _eval_loader(ctx, split, train_aug=False)
    x, y = extract_features(model, loader, ctx.run.device, dtype=ctx.dtype)
    world, n, layout = ctx.run.world_size, loader.num_samples, loader.rank_layout
    x, y = unshard(x, world, n, layout), unshard(y, world, n, layout)
    if split == "val":
        y = remap_labels(y, ctx.data.val_label_map)
    check_labels(y, ctx.data.num_classes, split)
    return x, y


def _ddp(module: nn.Module, run: launch.Launch) -> nn.Module:
    """`module` DDP-wrapped when distributed (DDP averages the gradients of the ranks' shards), else itself."""
    if not run.distributed:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == "cuda"
                                               else None)


# ---- protocols: each returns (results, extra facts for the JSON)


def knn(ctx: Context) -> tuple[dict, dict]:
    """Weighted kNN of the held-out split against the training split's features (k, T from eval.*)."""
    bank_x, bank_y = _features(ctx, ctx.backbone, "train")
    query_x, query_y = _features(ctx, ctx.backbone, "val")
    votes = knn_scores(bank_x, bank_y, query_x, k=ctx.cfg.eval.knn_k, temperature=ctx.cfg.eval.knn_temperature,
                       num_classes=ctx.data.num_classes)
    top = topk_accuracy(votes, query_y.to(votes.device), ks=(1, 5))
    results = {"top1": accuracy(votes.argmax(1), query_y), "top5": top[5]}
    return results, {"k": ctx.cfg.eval.knn_k, "temperature": ctx.cfg.eval.knn_temperature,
                     "num_train": bank_x.shape[0], "num_val": query_x.shape[0]}


def linear(ctx: Context) -> tuple[dict, dict]:
    """Linear probe on the frozen backbone; cached centre-crop features or augmented images (eval.cached_features)."""
    cfg, device = ctx.cfg, ctx.run.device
    reference = freeze(ctx.backbone)
    torch.manual_seed(cfg.run.seed)  # same head initialisation on every rank
    head = linear_head(ctx.feature_dim, ctx.data.num_classes).to(device)
    common = dict(epochs=cfg.eval.epochs, lr=cfg.eval.lr, schedule=cfg.eval.schedule)
    if cfg.eval.cached_features:
        train_x, train_y = _features(ctx, ctx.backbone, "train")
        val_x, val_y = _features(ctx, ctx.backbone, "val")
        generator = torch.Generator().manual_seed(cfg.run.seed)
        losses = train_on_features(train_x, train_y, head, batch_size=cfg.eval.batch_size, generator=generator,
                                   **common)
        with torch.no_grad():
            logits = head(val_x)
        num_train, num_val = train_x.shape[0], val_x.shape[0]
    else:
        train_loader = _eval_loader(ctx, "train", train_aug=True)
        losses = train_on_images(ctx.backbone, _ddp(head, ctx.run), train_loader, device=device, dtype=ctx.dtype,
                                 **common)
        logits, val_y = _features(ctx, nn.Sequential(ctx.backbone, head).eval(), "val")
        num_train, num_val = train_loader.num_samples, logits.shape[0]
    assert_unchanged(ctx.backbone, reference)
    results = evaluate_logits(logits, val_y)
    return results, {"epochs": cfg.eval.epochs, "lr": cfg.eval.lr, "schedule": cfg.eval.schedule,
                     "cached_features": cfg.eval.cached_features, "final_train_loss": losses[-1],
                     "num_train": num_train, "num_val": num_val, "frozen_backbone_check": "passed"}


def _train_source(cfg: Config):
    from pipelines.sources import open_source

    if cfg.data.source == "synthetic":
        return open_source("synthetic", split="train", **synthetic_kwargs(cfg.data, "train"))
    if cfg.data.path.endswith(".beton"):
        raise UserError("semisup reads its labelled subset from the dataset itself, not a .beton: pass "
                        "data.path=<dataset root> with data.backend=torchvision (or dali)")
    return open_source(cfg.data.source, cfg.data.path, "train")


def semisup(ctx: Context) -> tuple[dict, dict]:
    """Fine-tune backbone + linear head on a labelled subset (balanced and seeded, or --subset FILE)."""
    from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD

    cfg, run = ctx.cfg, ctx.run
    source = _train_source(cfg)
    labels = np.fromiter((source.label(i) for i in range(len(source))), dtype=np.int64, count=len(source))
    if ctx.args.subset is not None:
        indices = read_subset_file(ctx.args.subset, len(source), [source.path(i) for i in range(len(source))])
        subset_name = str(ctx.args.subset)
    else:
        indices = balanced_subset(labels, cfg.eval.semisup_fraction, cfg.run.seed)
        subset_name = f"balanced {cfg.eval.semisup_fraction:g}, seed {cfg.run.seed}"
    check_labels(torch.from_numpy(labels[indices]), ctx.data.num_classes, "labelled subset")
    dataset = SubsetDataset(source, indices, resolution=cfg.data.resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    # At least 2 a rank: BatchNorm in train mode cannot normalise a single image.
    per_rank = eval_batch_per_rank(cfg.eval.batch_size, run.world_size, minimum=2)
    loader = subset_loader(dataset, batch_size_per_rank=per_rank, rank=run.rank, world_size=run.world_size,
                           workers=cfg.data.workers, seed=cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = nn.Sequential(ctx.backbone, linear_head(ctx.feature_dim, ctx.data.num_classes)).to(run.device)
    ctx.backbone.requires_grad_(True)
    losses = finetune(_ddp(model, run), loader, epochs=cfg.eval.epochs, backbone_lr=cfg.eval.semisup_lr,
                      head_lr=10 * cfg.eval.semisup_lr, device=run.device, dtype=ctx.dtype)
    logits, val_y = _features(ctx, model, "val")
    results = evaluate_logits(logits, val_y)
    digest = hashlib.sha256(np.ascontiguousarray(indices).tobytes()).hexdigest()[:16]
    return results, {"subset": subset_name, "labelled_images": len(indices),
                     "labelled_fraction": len(indices) / len(source), "subset_sha256": digest,
                     "epochs": cfg.eval.epochs, "backbone_lr": cfg.eval.semisup_lr,
                     "final_train_loss": losses[-1], "num_val": logits.shape[0]}


# ---- report


def report(args: argparse.Namespace) -> int:
    from mixmask.run.report import format_cell, write_report

    for d in args.run_dirs:
        if not d.is_dir():
            raise UserError(f"run directory {str(d)!r} does not exist")
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{str(d)!r} has no metrics.jsonl: is it a run directory of train.py?")
    out = write_report(args.run_dirs, args.out)
    table = Table(title="runs compared (accuracies in %)")
    for col in out["columns"]:
        table.add_column(col, justify="left" if col in ("run", "preset", "method", "branch") else "right")
    for row in out["rows"]:
        table.add_row(*(format_cell(row.get(c)) for c in out["columns"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    Console(stderr=True).print("wrote " + ", ".join(out["files"]), highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
