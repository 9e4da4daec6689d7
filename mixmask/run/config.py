"""Typed configuration: dataclass sections, each field with a type, a default, a one-line doc and its valid values.

Resolution order (DESIGN.md): defaults → preset → YAML file → `key=value` overrides; see `mixmask.run.config_cli`.
Derived values (per-rank batch, scaled learning rate, steps per epoch) are computed in `derived()` and logged,
never written back over what the user typed. Each method's own settings are a section `method.<name>` declared by
the method (`mixmask.core.methods`, its `Params`), so adding a method does not touch this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from mixmask.core.methods import METHOD_NAMES, METHODS, MethodParams, RunShape
from mixmask.errors import UserError
from mixmask.fields import check_settings, setting
from mixmask.vocab import BRANCHES, ERASE_FILLS, MASK_KINDS, MASK_SHARES, PERMUTATIONS
from pipelines.augment import RECIPES as _RECIPE_BUILDERS
from pipelines.backends import BACKEND_NAMES as BACKENDS
from pipelines.sources import SOURCES

ORDER_CHOICES = ("auto", "random", "quasi_random")  # pipelines.loaders.order's (a test pins them equal)
RECIPES = tuple(_RECIPE_BUILDERS)  # the augmentation recipes pipelines.augment defines
__all__ = ["BACKENDS", "BRANCHES", "MASK_KINDS", "MASK_SHARES", "METHOD_NAMES", "PERMUTATIONS", "Config", "derived",
           "method_shape", "upgrade_saved_config", "validate"]


@dataclass
class DataConfig:
    source: str = setting("synthetic", "dataset source", choices=SOURCES)
    path: str = setting("", "training data: .beton for ffcv, dataset root or webdataset shards (folder or brace "
                        "pattern) for dali/torchvision; '' = synthetic default")
    val_path: str = setting("", "held-out split for the kNN monitor and eval; '' = derived from `path`")
    backend: str = setting("ffcv", "loader backend", choices=BACKENDS)
    resolution: int = setting(32, "training crop size in pixels", ge=8)
    batch_size: int = setting(512, "global batch size (all ranks together)", ge=2)
    workers: int = setting(8, "loader worker threads/processes per rank (lowered to the usable CPU cores)", ge=0)
    max_bad_fraction: float = setting(0.01, "dali/torchvision: share of an epoch's images that may be unreadable "
                                      "(skipped and listed) before the run stops", ge=0.0, le=1.0)
    os_cache: bool = setting(True, "ffcv: read the .beton through the OS page cache (else its own quasi-random cache)")
    order: str = setting("auto", "sample order: random, quasi_random (ffcv: a share of the .beton's pages per rank, "
                         "shuffled within order_window), auto (random while the file fits in ram_share of RAM)",
                         choices=ORDER_CHOICES)
    ram_share: float = setting(0.5, "data.order=auto: the share of this machine's RAM a .beton may fill and still be "
                               "read in random order", gt=0.0, le=1.0)
    order_window: int = setting(8192, "quasi_random: samples shuffled together (memory ~ 2 windows of pages per rank)",
                                ge=1)
    batches_ahead: int = setting(2, "ffcv/dali: batches prepared ahead of the step", ge=1)
    shuffle_buffer: int = setting(4096, "webdataset shards: samples in each rank's shuffle buffer (0 = stored order)",
                                  ge=0)
    shard_url: str = setting("", "webdataset shards: where dali reads the .tar files (e.g. s3://bucket/prefix); "
                             "'' = beside the sidecar and .idx files in data.path")
    synthetic_images: int = setting(2000, "synthetic source: training images", ge=10)
    synthetic_val_images: int = setting(500, "synthetic source: held-out images", ge=10)
    synthetic_classes: int = setting(10, "synthetic source: classes", ge=2)
    data_dir: str = setting("data", "where the synthetic default is written (.beton and sidecar)")


@dataclass
class AugConfig:
    recipe: str = setting("mocov2", "two-view augmentation recipe (small-image variants without blur at <= 64 px)",
                          choices=RECIPES)
    crop_min_scale: float | None = setting(None, "random-resized-crop minimum area fraction (None = the recipe's own)",
                                           gt=0.0, le=1.0)


@dataclass
class MaskConfig:
    kind: str = setting("block", "mask generator: BEiT blocked, discrete (official: each cell the partner's with "
                        "probability ratio, all-own/all-partner redrawn), discrete_exact (exactly ratio of cells own)",
                        choices=MASK_KINDS)
    grid_size: int = setting(4, "mask grid G (G x G cells over the image)", ge=1)
    ratio: float = setting(0.5, "mask ratio: share of own cells (block, discrete_exact), partner probability of a cell "
                           "(discrete)", gt=0.0, le=1.0)
    ratio_max: float | None = setting(None, "if set, the ratio is drawn per sample uniformly in [ratio, ratio_max]",
                                      gt=0.0, le=1.0)
    share: str = setting("pair", "who shares a mask: batch (one per batch, official), pair (both members of a pair: "
                         "keeps the switched image; ours), sample (independent)", choices=MASK_SHARES)
    permutation: str = setting("reverse", "partner of sample i: reverse (i <-> n-1-i; MixMask* gives MixMask random "
                               "partners) or random (drawn every step)", choices=PERMUTATIONS)
    erase_fill: str = setting("zero", "erase branch: fill for masked cells (zero = black pixels, mean = dataset mean)",
                              choices=ERASE_FILLS)


@dataclass
class _MethodCommon:
    name: str = setting("moco", "Siamese method (its own settings are the section method.<name>)", choices=METHOD_NAMES)
    branch: str = setting("mixmask", "mixing branch (mixmask-unmix is the paper's MixMask*)", choices=BRANCHES)
    arch: str = setting("resnet18", "backbone", choices=("resnet18", "resnet50"))
    cifar_stem: bool = setting(True, "3x3 stride-1 first conv and no max-pool (32 and 64 px images)")
    unmix_prob: float = setting(0.5, "Un-Mix: probability of global mixup (else region cutmix)", ge=0.0, le=1.0)
    unmix_beta: float = setting(1.0, "Un-Mix: lambda ~ Beta(beta, beta)", gt=0.0)
    sync_bn: bool = setting(False, "convert BatchNorm to SyncBatchNorm")

    @property
    def params(self) -> MethodParams:
        """The settings of the selected method (`method.<name>`)."""
        return getattr(self, self.name)


# The keys every method shares, then one section per registered method, typed by the method's own Params.
MethodConfig = make_dataclass(
    "MethodConfig",
    [(name, cls.Params, field(default_factory=cls.Params, metadata={"doc": f"{name}'s own settings"}))
     for name, cls in METHODS.items()],
    bases=(_MethodCommon,),
    namespace={"__module__": __name__, "__doc__": "method.*: the common keys and each method's section"},
)
assert not {f.name for f in fields(_MethodCommon)} & set(METHODS), "a method is named like a common method key"

# The flat keys the method section had before each method owned its settings: old name → {method: new name}.
# A user who passes one gets a line naming the new keys; a saved config (checkpoint, config.yaml) that has them is
# upgraded, value for value, by `upgrade_saved_config`.
FLAT_METHOD_KEYS: dict[str, dict[str, str]] = {
    "mlp_head": {"moco": "mlp_head"},
    "dim": {"moco": "dim", "simclr": "proj_dim", "byol": "proj_dim", "simsiam": "proj_dim"},
    "hidden_dim": {"simclr": "proj_hidden_dim", "byol": "proj_hidden_dim", "simsiam": "proj_hidden_dim"},
    "pred_dim": {"byol": "pred_hidden_dim", "simsiam": "pred_hidden_dim"},
    "proj_layers": {"simsiam": "proj_layers"},
    "queue_size": {"moco": "queue_size"},
    "momentum": {"moco": "momentum", "byol": "base_tau"},
    "temperature": {"moco": "temperature", "simclr": "temperature"},
    "shuffle_bn": {"moco": "shuffle_bn"},
    "bn_splits": {"moco": "bn_splits"},
}


@dataclass
class OptimConfig:
    name: str = setting("sgd", "optimizer", choices=("sgd", "adam", "adamw", "lars"))
    base_lr: float = setting(0.06, "learning rate at `base_batch` (scaled linearly with the global batch)", gt=0.0)
    base_batch: int = setting(512, "batch size `base_lr` is quoted for", ge=1)
    weight_decay: float = setting(5e-4, "weight decay (L2 for sgd/adam/lars, decoupled for adamw)", ge=0.0)
    decay_norm_and_bias: bool = setting(False, "also decay biases and norm parameters (the official code decays every "
                                               "parameter; False excludes them, ours)")
    momentum: float = setting(0.9, "SGD/LARS momentum", ge=0.0, le=1.0)
    schedule: str = setting("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = setting(0.0, "linear warm-up length in epochs", ge=0.0)
    milestones: list = setting([0.6, 0.8], "step schedule: epochs fractions where the lr drops by 10x")


@dataclass
class RunConfig:
    epochs: int = setting(1000, "training epochs", ge=1)
    max_steps: int = setting(0, "stop after this many optimizer steps (0 = no cap; for smoke runs)", ge=0)
    out_dir: str = setting("", "run directory; '' = runs/<preset>")
    seed: int = setting(0, "random seed (data order, masks, initialisation)")
    resume: str = setting("auto", "auto (latest checkpoint in out_dir if any), none, or a checkpoint path")
    allow_config_change: bool = setting(False, "resume even though the model, data or schedule keys changed "
                                               "(deliberate)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda, cuda:N")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32",
                             choices=("auto", "bf16", "fp32"))
    compile: bool = setting(False, "torch.compile the method (compiled before DDP wrapping)")
    channels_last: bool = setting(True, "channels_last memory format for images and the backbone")
    log_every: int = setting(20, "steps between metric logs (the only host-device sync in the loop)", ge=1)
    ckpt_every: int = setting(10, "epochs between periodic checkpoints (last.pt is written every epoch)", ge=1)
    keep_ckpts: int = setting(3, "periodic checkpoints kept", ge=1)
    knn_every: int = setting(10, "epochs between kNN monitor runs (0 = off)", ge=0)
    tensorboard: bool = setting(True, "write TensorBoard scalars")
    progress: bool = setting(True, "live progress display on rank 0")


@dataclass
class EvalConfig:
    epochs: int = setting(100, "linear / semi-supervised training epochs", ge=1)
    batch_size: int = setting(256, "global evaluation batch size", ge=1)
    knn_k: int = setting(200, "kNN neighbours", ge=1)
    knn_temperature: float = setting(0.1, "kNN vote temperature", gt=0.0)
    lr: float = setting(30.0, "linear probe learning rate (MoCo protocol)", gt=0.0)
    schedule: str = setting("step", "linear probe schedule", choices=("step", "cosine"))
    semisup_fraction: float = setting(0.01, "semi-supervised: labelled fraction (0.01 or 0.1 in the papers)", gt=0.0,
                                      le=1.0)
    semisup_lr: float = setting(0.01, "semi-supervised: backbone learning rate (head gets 10x)", gt=0.0)
    cached_features: bool = setting(True, "linear probe on cached centre-crop features (fast path)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # type: ignore[valid-type]
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str = field(default="", metadata={"doc": "name of the preset this config started from"})


def validate(cfg: Config) -> Config:
    """Check every field against its constraints and the cross-field rules; raise UserError naming the key."""
    for section in fields(cfg):
        if section.name != "preset":
            check_settings(getattr(cfg, section.name), section.name)
    if cfg.mask.ratio_max is not None and cfg.mask.ratio_max < cfg.mask.ratio:
        raise UserError(f"mask.ratio_max={cfg.mask.ratio_max} must be >= mask.ratio={cfg.mask.ratio}")
    _check_masks(cfg)
    cfg.method.params.check(method_shape(cfg))
    if not all(0.0 < m < 1.0 for m in cfg.optim.milestones):
        raise UserError(f"optim.milestones={cfg.optim.milestones} must be fractions of training in (0, 1)")
    return cfg


def _check_masks(cfg: Config) -> None:
    """Refuse masks that can never reach their ratio (blocked at grid 2, discrete at grid 1) before any work."""
    if cfg.method.branch not in ("mixmask", "mixmask-unmix", "erase"):
        return
    from mixmask.core.masks import check_mask_config  # loads the mask kernels: only for branches that draw masks

    m = cfg.mask
    if m.grid_size > cfg.data.resolution:
        raise UserError(f"mask.grid_size={m.grid_size} is larger than data.resolution={cfg.data.resolution}: some "
                        "cells would cover no pixel; use a grid of at most the resolution")
    ratio = m.ratio if m.ratio_max is None else (m.ratio, m.ratio_max)
    try:
        check_mask_config(m.kind, m.grid_size, ratio)
    except ValueError as err:
        raise UserError(f"mask.kind={m.kind} at mask.grid_size={m.grid_size}: {err}") from None


def method_shape(cfg: Config, world_size: int | None = None) -> RunShape:
    """What the selected method's checks know of the run (world_size None: at config time, before launch)."""
    return RunShape(global_batch=cfg.data.batch_size, world_size=world_size, sync_bn=cfg.method.sync_bn,
                    prefix=f"method.{cfg.method.name}")


def upgrade_saved_config(data: dict) -> dict:
    """A saved config dict (checkpoint or config.yaml) in today's layout: the flat method keys of older runs move
    into every method section that read them (`FLAT_METHOD_KEYS`), the unused `bench` section is dropped."""
    data = {k: v for k, v in data.items() if k != "bench"}
    method = data.get("method")
    if isinstance(method, dict) and any(k in FLAT_METHOD_KEYS for k in method):
        method = dict(method)
        for old, targets in FLAT_METHOD_KEYS.items():
            if old in method:
                value = method.pop(old)
                for name, new in targets.items():
                    method.setdefault(name, {})
                    method[name] = {**method[name], new: value}
        data["method"] = method
    return data


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
    params = cfg.method.params
    params.check(method_shape(cfg, world_size))
    out.update(params.derived(world_size))  # e.g. MoCo's split BatchNorm in use: one process only
    if steps_per_epoch is not None:
        out["steps_per_epoch"] = steps_per_epoch
        # The schedule always spans all epochs; run.max_steps only stops early (so a capped smoke run and the
        # first part of a full run take identical steps).
        out["total_steps"] = steps_per_epoch * cfg.run.epochs
        out["stop_step"] = min(out["total_steps"], cfg.run.max_steps) if cfg.run.max_steps else out["total_steps"]
    return out
