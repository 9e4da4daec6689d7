"""Typed configuration: dataclass sections, each field with a type, a default, a one-line doc and its valid values.

Resolution order (DESIGN.md): defaults → preset → YAML file → `key=value` overrides; see `mixmask.run.config_cli`.
Derived values (per-rank batch, scaled learning rate, steps per epoch) are computed in `derived()` and logged,
never written back over what the user typed.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from mixmask.errors import UserError
from mixmask.vocab import BRANCHES, ERASE_FILLS, MASK_KINDS, MASK_SHARES, METHOD_NAMES, PERMUTATIONS
from pipelines.backends import BACKEND_NAMES as BACKENDS
from pipelines.sources import SOURCES

ORDER_CHOICES = ("auto", "random", "quasi_random")  # pipelines.loaders.order's (a test pins them equal)
RECIPES = ("mocov1", "mocov2", "simclr", "byol")
__all__ = ["BACKENDS", "BRANCHES", "MASK_KINDS", "MASK_SHARES", "METHOD_NAMES", "PERMUTATIONS", "Config", "derived",
           "validate"]


def opt(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None, le: float | None = None,
        gt: float | None = None) -> Any:
    """A config field: default, one-line doc, and the constraints `validate` checks."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "le": le, "gt": gt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = opt("synthetic", "dataset source", choices=SOURCES)
    path: str = opt("", "training data: .beton for ffcv, dataset root or webdataset shards (folder or brace "
                    "pattern) for dali/torchvision; '' = synthetic default")
    val_path: str = opt("", "held-out split for the kNN monitor and eval; '' = derived from `path`")
    backend: str = opt("ffcv", "loader backend", choices=BACKENDS)
    resolution: int = opt(32, "training crop size in pixels", ge=8)
    batch_size: int = opt(512, "global batch size (all ranks together)", ge=2)
    workers: int = opt(8, "loader worker threads/processes per rank (lowered to the usable CPU cores)", ge=0)
    max_bad_fraction: float = opt(0.01, "dali/torchvision: share of an epoch's images that may be unreadable "
                                  "(skipped and listed) before the run stops", ge=0.0, le=1.0)
    os_cache: bool = opt(True, "ffcv: read the .beton through the OS page cache (else its own quasi-random cache)")
    order: str = opt("auto", "sample order: random, quasi_random (ffcv: a share of the .beton's pages per rank, "
                     "shuffled within order_window), auto (random while the file fits in ram_share of RAM)",
                     choices=ORDER_CHOICES)
    ram_share: float = opt(0.5, "data.order=auto: the share of this machine's RAM a .beton may fill and still be "
                           "read in random order", gt=0.0, le=1.0)
    order_window: int = opt(8192, "quasi_random: samples shuffled together (memory ~ 2 windows of pages per rank)",
                            ge=1)
    batches_ahead: int = opt(2, "ffcv/dali: batches prepared ahead of the step", ge=1)
    shuffle_buffer: int = opt(4096, "webdataset shards: samples in each rank's shuffle buffer (0 = stored order)",
                              ge=0)
    shard_url: str = opt("", "webdataset shards: where dali reads the .tar files (e.g. s3://bucket/prefix); "
                         "'' = beside the sidecar and .idx files in data.path")
    synthetic_images: int = opt(2000, "synthetic source: training images", ge=10)
    synthetic_val_images: int = opt(500, "synthetic source: held-out images", ge=10)
    synthetic_classes: int = opt(10, "synthetic source: classes", ge=2)
    data_dir: str = opt("data", "where the synthetic default is written (.beton and sidecar)")


@dataclass
class AugConfig:
    recipe: str = opt("mocov2", "two-view augmentation recipe (small-image variants without blur at <= 64 px)",
                      choices=RECIPES)
    crop_min_scale: float | None = opt(None, "random-resized-crop minimum area fraction (None = the recipe's own)",
                                       gt=0.0, le=1.0)


@dataclass
class MaskConfig:
    kind: str = opt("block", "mask generator: BEiT blocked, discrete (official: each cell the partner's with "
                    "probability ratio, all-own/all-partner redrawn), discrete_exact (exactly ratio of cells own)",
                    choices=MASK_KINDS)
    grid_size: int = opt(4, "mask grid G (G x G cells over the image)", ge=1)
    ratio: float = opt(0.5, "mask ratio: share of own cells (block, discrete_exact), partner probability of a cell "
                       "(discrete)", gt=0.0, le=1.0)
    ratio_max: float | None = opt(None, "if set, the ratio is drawn per sample uniformly in [ratio, ratio_max]",
                                  gt=0.0, le=1.0)
    share: str = opt("pair", "who shares a mask: batch (one per batch, official), pair (both members of a pair: "
                     "keeps the switched image; ours), sample (independent)", choices=MASK_SHARES)
    permutation: str = opt("reverse", "partner of sample i: reverse (i <-> n-1-i; MixMask* gives MixMask random "
                           "partners) or random (drawn every step)", choices=PERMUTATIONS)
    erase_fill: str = opt("zero", "erase branch: fill for masked cells (zero = black pixels, mean = dataset mean)",
                          choices=ERASE_FILLS)


@dataclass
class MethodConfig:
    name: str = opt("moco", "Siamese method", choices=METHOD_NAMES)
    branch: str = opt("mixmask", "mixing branch (mixmask-unmix is the paper's MixMask*)", choices=BRANCHES)
    arch: str = opt("resnet18", "backbone", choices=("resnet18", "resnet50"))
    cifar_stem: bool = opt(True, "3x3 stride-1 first conv and no max-pool (32 and 64 px images)")
    mlp_head: bool = opt(True, "MoCo: MLP projection head (v2) instead of a linear one (v1)")
    dim: int = opt(128, "output embedding dimension", ge=1)
    hidden_dim: int = opt(2048, "projector hidden dimension (SimCLR, BYOL, SimSiam; MoCo v2 uses the backbone width)",
                          ge=1)
    pred_dim: int = opt(512, "predictor hidden dimension (BYOL, SimSiam)", ge=1)
    proj_layers: int = opt(3, "SimSiam: projector layers (3 on ImageNet, 2 on CIFAR as in the SimSiam paper)", ge=1)
    queue_size: int = opt(4096, "MoCo: negative queue length K", ge=1)
    momentum: float = opt(0.99, "MoCo key-encoder momentum m / BYOL base EMA tau", ge=0.0, le=1.0)
    temperature: float = opt(0.1, "contrastive softmax temperature", gt=0.0)
    unmix_prob: float = opt(0.5, "Un-Mix: probability of global mixup (else region cutmix)", ge=0.0, le=1.0)
    unmix_beta: float = opt(1.0, "Un-Mix: lambda ~ Beta(beta, beta)", gt=0.0)
    shuffle_bn: bool = opt(True, "MoCo: shuffle BatchNorm across ranks for the key encoder (in one process: across "
                                 "the BN splits)")
    bn_splits: int = opt(1, "MoCo, one process only: split BatchNorm, statistics over S equal chunks of the batch (the "
                            "MoCo CIFAR recipe: 8); with more processes each rank's BN is a split and this is 1", ge=1)
    sync_bn: bool = opt(False, "convert BatchNorm to SyncBatchNorm")


@dataclass
class OptimConfig:
    name: str = opt("sgd", "optimizer", choices=("sgd", "adam", "adamw", "lars"))
    base_lr: float = opt(0.06, "learning rate at `base_batch` (scaled linearly with the global batch)", gt=0.0)
    base_batch: int = opt(512, "batch size `base_lr` is quoted for", ge=1)
    weight_decay: float = opt(5e-4, "weight decay (L2 for sgd/adam/lars, decoupled for adamw)", ge=0.0)
    decay_norm_and_bias: bool = opt(False, "also decay biases and norm parameters (the official code decays every "
                                           "parameter; False excludes them, ours)")
    momentum: float = opt(0.9, "SGD/LARS momentum", ge=0.0, le=1.0)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs", ge=0.0)
    milestones: list = opt([0.6, 0.8], "step schedule: epochs fractions where the lr drops by 10x")


@dataclass
class RunConfig:
    epochs: int = opt(1000, "training epochs", ge=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no cap; for smoke runs)", ge=0)
    out_dir: str = opt("", "run directory; '' = runs/<preset>")
    seed: int = opt(0, "random seed (data order, masks, initialisation)")
    resume: str = opt("auto", "auto (latest checkpoint in out_dir if any), none, or a checkpoint path")
    allow_config_change: bool = opt(False, "resume even though the model, data or schedule keys changed (deliberate)")
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:N")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32",
                         choices=("auto", "bf16", "fp32"))
    compile: bool = opt(False, "torch.compile the method (compiled before DDP wrapping)")
    channels_last: bool = opt(True, "channels_last memory format for images and the backbone")
    log_every: int = opt(20, "steps between metric logs (the only host-device sync in the loop)", ge=1)
    ckpt_every: int = opt(10, "epochs between periodic checkpoints (last.pt is written every epoch)", ge=1)
    keep_ckpts: int = opt(3, "periodic checkpoints kept", ge=1)
    knn_every: int = opt(10, "epochs between kNN monitor runs (0 = off)", ge=0)
    tensorboard: bool = opt(True, "write TensorBoard scalars")
    progress: bool = opt(True, "live progress display on rank 0")


@dataclass
class EvalConfig:
    epochs: int = opt(100, "linear / semi-supervised training epochs", ge=1)
    batch_size: int = opt(256, "global evaluation batch size", ge=1)
    knn_k: int = opt(200, "kNN neighbours", ge=1)
    knn_temperature: float = opt(0.1, "kNN vote temperature", gt=0.0)
    lr: float = opt(30.0, "linear probe learning rate (MoCo protocol)", gt=0.0)
    schedule: str = opt("step", "linear probe schedule", choices=("step", "cosine"))
    semisup_fraction: float = opt(0.01, "semi-supervised: labelled fraction (0.01 or 0.1 in the papers)", gt=0.0,
                                  le=1.0)
    semisup_lr: float = opt(0.01, "semi-supervised: backbone learning rate (head gets 10x)", gt=0.0)
    cached_features: bool = opt(True, "linear probe on cached centre-crop features (fast path)")


@dataclass
class BenchConfig:
    warmup: int = opt(3, "untimed warm-up repeats", ge=0)
    repeats: int = opt(10, "timed repeats (median and min-max reported)", ge=1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    preset: str = field(default="", metadata={"doc": "name of the preset this config started from"})


def _check_field(key: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        from mixmask.errors import did_you_mean

        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise UserError(f"{key}={value!r} is not valid{hint}; valid: {', '.join(map(str, choices))}")
    if value is None or isinstance(value, (bool, str, list)):
        return
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<="),
                            ("gt", lambda v, b: v > b, ">")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise UserError(f"{key}={value!r} is out of range: must be {word} {b}")


def validate(cfg: Config) -> Config:
    """Check every field against its constraints and the cross-field rules; raise UserError naming the key."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        if not is_dataclass(sub):
            continue
        for f in fields(sub):
            _check_field(f"{section.name}.{f.name}", getattr(sub, f.name), dict(f.metadata))
    if cfg.mask.ratio_max is not None and cfg.mask.ratio_max < cfg.mask.ratio:
        raise UserError(f"mask.ratio_max={cfg.mask.ratio_max} must be >= mask.ratio={cfg.mask.ratio}")
    _check_masks(cfg)
    if cfg.method.bn_splits > 1 and cfg.method.name != "moco":
        raise UserError(f"method.bn_splits={cfg.method.bn_splits} is for method.name=moco (split BatchNorm for "
                        f"shuffle-BN); set method.bn_splits=1 for {cfg.method.name}")
    if not all(0.0 < m < 1.0 for m in cfg.optim.milestones):
        raise UserError(f"optim.milestones={cfg.optim.milestones} must be fractions of training in (0, 1)")
    return cfg


def _check_masks(cfg: Config) -> None:
    """Refuse masks that can never reach their ratio (blocked at grid 2, discrete at grid 1) before any work."""
    if cfg.method.branch not in ("mixmask", "mixmask-unmix", "erase"):
        return
    from mixmask.core.masks import check_mask_config  # loads torch: only for branches that draw masks

    m = cfg.mask
    if m.grid_size > cfg.data.resolution:
        raise UserError(f"mask.grid_size={m.grid_size} is larger than data.resolution={cfg.data.resolution}: some "
                        "cells would cover no pixel; use a grid of at most the resolution")
    ratio = m.ratio if m.ratio_max is None else (m.ratio, m.ratio_max)
    try:
        check_mask_config(m.kind, m.grid_size, ratio)
    except ValueError as err:
        raise UserError(f"mask.kind={m.kind} at mask.grid_size={m.grid_size}: {err}") from None


def field_docs(section: type) -> dict[str, tuple[Any, str]]:
    """`{name: (default, doc)}` of a section, for help texts and the README."""
    out = {}
    for f in fields(section):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (default, f.metadata.get("doc", ""))
    return out


def bn_splits_in_use(cfg: Config, world_size: int) -> int:
    """Split BatchNorm stands in for several devices' BN in one process; with more processes every rank's BN
    already sees its own share of the batch and shuffle-BN applies, so it is off (1)."""
    return cfg.method.bn_splits if world_size == 1 else 1


def derived(cfg: Config, world_size: int, steps_per_epoch: int | None = None) -> dict[str, Any]:
    """Values computed from the config and the launch (logged in the run directory, never written back)."""
    if cfg.data.batch_size % world_size:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world_size}")
    out: dict[str, Any] = {
        "world_size": world_size,
        "global_batch": cfg.data.batch_size,
        "batch_size_per_rank": cfg.data.batch_size // world_size,
        "lr": cfg.optim.base_lr * cfg.data.batch_size / cfg.optim.base_batch,
    }
    out["bn_splits"] = bn_splits_in_use(cfg, world_size)
    if out["batch_size_per_rank"] % out["bn_splits"]:
        raise UserError(f"method.bn_splits={out['bn_splits']} must divide the batch per process "
                        f"{out['batch_size_per_rank']} (data.batch_size / world size)")
    if out["bn_splits"] > 1 and cfg.method.sync_bn:
        raise UserError(f"method.sync_bn=true and method.bn_splits={out['bn_splits']} exclude each other (one "
                        "normalises across processes, the other within one); set method.bn_splits=1")
    if steps_per_epoch is not None:
        out["steps_per_epoch"] = steps_per_epoch
        # The schedule always spans all epochs; run.max_steps only stops early (so a capped smoke run and the
        # first part of a full run take identical steps).
        out["total_steps"] = steps_per_epoch * cfg.run.epochs
        out["stop_step"] = min(out["total_steps"], cfg.run.max_steps) if cfg.run.max_steps else out["total_steps"]
    return out
