"""Every value the paper presets set, with its source: the one table `presets.py` builds from and the README shows.

Sources (read at the commits the project fetched; line numbers are of those files):
- the paper: "MixMask: Revisiting Masking Strategy for Siamese ConvNets", Table 1 (mask ablation; MoCo V1 on the
  small datasets) and Table 8 (small-dataset hyper-parameters).
- MixMask: the official code, kirill-vish/MixMask (`main_moco_mixmask.py`, README: the ImageNet MoCo v2 recipe).
- Un-Mix: szq0214/Un-Mix `unmix_c100.py`, the CIFAR MoCo code the paper's small-dataset MoCo runs build on (itself
  the MoCo authors' CIFAR demo).
- W-MSE: htdt/self-supervised (`cfg.py`, `train.py`, `methods/byol.py`, README), the code Table 8's SimCLR / BYOL
  values come from (Adam, lr 3e-3 / 2e-3, l2 1e-6, embedding 64 / 128, head 1024, BYOL τ 0.99, T 0.5).
- "ours, because …": where no source gives a value, or where the sources disagree and we chose.

Provenance, checked 2026-11-29: every code citation above was re-read at kirill-vish/MixMask 392a0e7,
szq0214/Un-Mix 0911f77 (`unmix_c100.py`) and htdt/self-supervised d9662c8, and matches. The paper's own Table 1 and
Table 8 were not: the stored copies of the paper (arXiv v2-v4, ar5iv) hold only its abstract, so "Table 1" /
"Table 8" cite the values as the project's DESIGN.md and issue 12 quote them; check them against the paper (v4
preferred) when it can be read.

`python -m mixmask.run.preset_table` prints the Markdown the README embeds; a test keeps the two identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SMALL = ("cifar100", "tinyimagenet")
ALL_METHODS = ("moco", "simclr", "byol", "simsiam")

T1 = "Table 1"
T8 = "Table 8"
UNMIX = "Un-Mix `unmix_c100.py`"
MIXMASK = "MixMask `main_moco_mixmask.py`"
MIXMASK_README = "MixMask README (pre-training command)"
WMSE = "W-MSE"


@dataclass(frozen=True)
class Row:
    """One preset value: a dotted config key, its value (or `{dataset: value}`), and where the value comes from."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class Family:
    """Rows shared by the presets DATASET-METHOD-* with DATASET in `datasets` and METHOD in `methods`."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    rows: tuple[Row, ...]

    @property
    def label(self) -> str:
        datasets = self.datasets[0] if len(self.datasets) == 1 else "{" + ",".join(self.datasets) + "}"
        methods = "*" if self.methods == ALL_METHODS else "|".join(self.methods)
        return f"{datasets}-{methods}-*" if methods != "*" else f"{datasets}-*"

    def value_for(self, row: Row, dataset: str) -> Any:
        return row.value[dataset] if isinstance(row.value, dict) else row.value


_BATCH = "the paper's batch: `base_lr` is quoted at it (ours: other batches scale the lr linearly)"
_DECAY_ALL = "decays every parameter: `SGD(model.parameters(), weight_decay=…)`"
_RUN_OURS = "ours: run mechanics, not a training value"
_SMALL_COMMON = (
    Row("data.batch_size", 512, f"{T8}; {UNMIX}:32"),
    Row("optim.base_batch", 512, _BATCH),
    Row("run.epochs", 1000, f"{T8}; {UNMIX}:28"),
    Row("method.arch", "resnet18", T8),
    Row("mask.ratio", 0.5, f"{T1}; {MIXMASK}:112 (`--mask_lam 0.5`)"),
    Row("mask.share", "batch", f"{MIXMASK}:355-363: one mask per batch with the reverse pairing"),
    Row("mask.permutation", "reverse", f"{MIXMASK}:355 (`torch.flip` of the batch)"),
    Row("method.unmix_prob", 0.5, f"{UNMIX}:40 (`--prob 0.5`)"),
    Row("method.unmix_beta", 1.0, f"{UNMIX}:333"),
    Row("data.workers", 8, _RUN_OURS),
    Row("run.knn_every", 10, _RUN_OURS + " (kNN monitor every 10 epochs)"),
)

DATASET_FAMILIES = (
    Family(("cifar100",), ALL_METHODS, (
        Row("data.source", "cifar100", "the dataset"),
        Row("data.resolution", 32, "CIFAR-100 images"),
        *_SMALL_COMMON,
        Row("method.cifar_stem", True, f"{UNMIX}:135-150 (3×3 stride-1 conv1, no max-pool)"),
        Row("mask.kind", "discrete", f"{T1}: at 32 px grid 2 with discrete masks is best (68.11 vs blocked 67.78); "
                                     "BEiT blocks cannot fit a 2×2 grid"),
        Row("mask.grid_size", 2, T1),
    )),
    Family(("tinyimagenet",), ALL_METHODS, (
        Row("data.source", "tinyimagenet", "the dataset"),
        Row("data.resolution", 64, "Tiny-ImageNet images"),
        *_SMALL_COMMON,
        Row("method.cifar_stem", True, "ours, because `cifar_stem` is one switch: W-MSE's Tiny-ImageNet ResNet has "
                                       "the 3×3 conv1 but keeps the max-pool (`model.py`:23-25)"),
        Row("mask.kind", "block", f"{T1}: blocked masks at 64 px"),
        Row("mask.grid_size", 4, T1),
    )),
    Family(("imagenet",), ALL_METHODS, (
        Row("data.source", "imagefolder", "ImageNet-1K in the `train/<class>/*` layout"),
        Row("data.resolution", 224, f"{MIXMASK} (ImageNet crops)"),
        Row("data.batch_size", 256, f"{MIXMASK}:50; {MIXMASK_README}"),
        Row("optim.base_batch", 256, _BATCH),
        Row("run.epochs", 200, f"{MIXMASK}:46; MixMask README results"),
        Row("method.arch", "resnet50", f"{MIXMASK_README} (`-a resnet50`)"),
        Row("method.cifar_stem", False, "torchvision's ImageNet stem"),
        Row("mask.kind", "block", f"{MIXMASK_README} (`--mask_type block`)"),
        Row("mask.grid_size", 8, f"{T1}; {MIXMASK_README} (`--grid_size 8`)"),
        Row("mask.ratio", 0.5, f"{MIXMASK_README} (`--mask_lam 0.5`)"),
        Row("mask.share", "batch", f"{MIXMASK}:355-363: one mask per batch with the reverse pairing"),
        Row("mask.permutation", "reverse", f"{MIXMASK}:355 (`torch.flip` of the batch)"),
        Row("method.unmix_prob", 0.5, f"{MIXMASK}:106 and Un-Mix ImageNet `run.sh` (`--unmix_prob 0.5`); chosen "
                                      "over `main_moco_unmix.py`'s default 0.0, which its help says to tune"),
        Row("method.unmix_beta", 1.0, f"{MIXMASK}:105"),
        Row("data.workers", 10, _RUN_OURS),
        Row("run.knn_every", 0, _RUN_OURS + " (no kNN monitor on ImageNet)"),
    )),
)

_W_ADAM = ("optim.name", "adam", f"{T8}; {WMSE} `train.py`:39")
_W_LR = ("optim.base_lr", {"cifar100": 0.003, "tinyimagenet": 0.002}, f"{T8}; {WMSE} README (`--lr 3e-3` / `2e-3`)")
_W_WD = ("optim.weight_decay", 1e-6,
         f"{T8} 'Adam l2 1e-6', chosen over the table's wd 5e-4, which is the SGD rows' value: {WMSE} `cfg.py`:67, "
         "the code these Adam values come from, uses l2 1e-6 (torch Adam's `weight_decay` is that L2 term)")
_W_DECAY = ("optim.decay_norm_and_bias", True, f"{WMSE} `train.py`:39 (Adam over `model.parameters()`)")
_W_SCHEDULE = ("optim.schedule", "cosine",
               "ours, because neither Table 8 nor the MixMask code gives one for these methods: cosine as the "
               f"MoCo rows ({WMSE} steps ×0.2 at the last 50 and 25 epochs after 500 warm-up steps)")
_W_DIM = ("proj_dim", {"cifar100": 64, "tinyimagenet": 128}, f"{T8}; {WMSE} README (`--emb 64` / `--emb 128`)")
_W_HIDDEN = ("proj_hidden_dim", 1024, f"{T8} (projection 1024); {WMSE} `cfg.py`:80 (head size)")
_W_CROP = ("aug.crop_min_scale", 0.2, f"{WMSE} `cfg.py`:38 (crops from 0.2)")
_SGD_MOMENTUM = ("optim.momentum", 0.9, f"{UNMIX}:425")


def _method(name: str, row: tuple[str, Any, str]) -> tuple[str, Any, str]:
    """A row shared by several methods, keyed in one method's own section (`method.<name>.<key>`)."""
    key, value, source = row
    return f"method.{name}.{key}", value, source


SMALL_METHOD_FAMILIES = (
    Family(SMALL, ("moco",), (
        Row("optim.name", "sgd", f"{T8}; {UNMIX}:425"),
        Row("optim.base_lr", 0.06, f"{T8}; {UNMIX}:27"),
        Row("optim.weight_decay", 5e-4, f"{T8}; {UNMIX}:33"),
        Row(*_SGD_MOMENTUM),
        Row("optim.decay_norm_and_bias", True, f"{UNMIX}:425 {_DECAY_ALL}; so does {MIXMASK}:206"),
        Row("optim.schedule", "cosine", f"{UNMIX}:61 (`args.cos = True`)"),
        Row("optim.warmup_epochs", 0.0, f"{UNMIX} (no warm-up)"),
        Row("method.moco.mlp_head", False,
            f"{T1} caption: MoCo V1 on the small datasets; {UNMIX}:144 (fc = linear head)"),
        Row("method.moco.dim", 128, f"{T8}; {UNMIX}:36"),
        Row("method.moco.queue_size", 4096, f"{T8}; {UNMIX}:37"),
        Row("method.moco.momentum", 0.99, f"{T8}; {UNMIX}:38"),
        Row("method.moco.temperature", 0.1, f"{T8}; {UNMIX}:39"),
        Row("method.moco.bn_splits", 8, f"{UNMIX}:42 (`--bn-splits 8`, split BN on one GPU); 1 when run on several "
                                   "processes (shuffle-BN)"),
        Row("aug.recipe", "mocov2", f"{UNMIX}:84-90 (crop, flip, jitter 0.4/0.4/0.4/0.1 p 0.8, grey 0.2, no blur)"),
        Row("aug.crop_min_scale", 0.08, f"{UNMIX}:85 (`RandomResizedCrop(32)`: from 0.08)"),
    )),
    Family(SMALL, ("simclr",), (
        Row(*_W_ADAM), Row(*_W_LR), Row(*_W_WD), Row(*_W_DECAY), Row(*_W_SCHEDULE),
        Row("optim.warmup_epochs", 0.0, "ours, with the cosine schedule above"),
        Row(*_method("simclr", _W_DIM)), Row(*_method("simclr", _W_HIDDEN)),
        Row("method.simclr.temperature", 0.5, f"{WMSE} `cfg.py`:97 (Table 8 gives none)"),
        Row("aug.recipe", "simclr", "ours: the SimCLR recipe, no blur at <= 64 px (W-MSE: grey p 0.1)"),
        Row(*_W_CROP),
    )),
    Family(SMALL, ("byol",), (
        Row(*_W_ADAM), Row(*_W_LR), Row(*_W_WD), Row(*_W_DECAY), Row(*_W_SCHEDULE),
        Row("optim.warmup_epochs", 0.0, "ours, with the cosine schedule above"),
        Row(*_method("byol", _W_DIM)), Row(*_method("byol", _W_HIDDEN)),
        Row("method.byol.pred_hidden_dim", 1024, f"{WMSE} `methods/byol.py`:18-21 (predictor hidden = head size)"),
        Row("method.byol.base_tau", 0.99, f"{T8} (BYOL τ); {WMSE} `cfg.py`:22"),
        Row("aug.recipe", "byol", "ours: BYOL's asymmetric recipe, no blur at <= 64 px (W-MSE: one symmetric recipe)"),
        Row(*_W_CROP),
    )),
    Family(SMALL, ("simsiam",), (
        Row("optim.name", "sgd", T8),
        Row("optim.base_lr", 0.03, T8),
        Row("optim.weight_decay", 5e-4, T8),
        Row(*_SGD_MOMENTUM),
        Row("optim.decay_norm_and_bias", True, f"ours, as the official code: {MIXMASK}:206 {_DECAY_ALL}"),
        Row("optim.schedule", "cosine", "SimSiam paper (cosine decay)"),
        Row("optim.warmup_epochs", 10.0, T8),
        Row("method.simsiam.proj_dim", 128, T8),
        Row("method.simsiam.proj_hidden_dim", 2048, "ours, because Table 8 gives only the output: the SimSiam paper's "
                                                    "width"),
        Row("method.simsiam.pred_hidden_dim", 512, "ours, because Table 8 gives none: the SimSiam paper's predictor "
                                                   "hidden"),
        Row("method.simsiam.proj_layers", 2, "SimSiam paper, CIFAR setting (2-layer projector)"),
        Row("aug.recipe", "simclr", "ours: SimSiam's recipe is SimCLR's / MoCo v2's, no blur at <= 64 px"),
        Row("aug.crop_min_scale", 0.08, "ours, because Table 8 gives none: as the MoCo rows"),
    )),
)

_OWN_PAPER = "ours, because MixMask trains only MoCo on ImageNet: {}'s own ImageNet recipe"
IMAGENET_METHOD_FAMILIES = (
    Family(("imagenet",), ("moco",), (
        Row("optim.name", "sgd", f"{MIXMASK}:206"),
        Row("optim.base_lr", 0.03, f"{MIXMASK}:55; {MIXMASK_README}"),
        Row("optim.weight_decay", 1e-4, f"{MIXMASK}:61"),
        Row("optim.momentum", 0.9, f"{MIXMASK}:59"),
        Row("optim.decay_norm_and_bias", True, f"{MIXMASK}:206 {_DECAY_ALL}"),
        Row("optim.schedule", "cosine", f"{MIXMASK_README} (`--cos`)"),
        Row("optim.warmup_epochs", 0.0, f"{MIXMASK} (no warm-up)"),
        Row("method.moco.mlp_head", True, f"{MIXMASK_README} (`--mlp`: MoCo v2)"),
        Row("method.moco.dim", 128, f"{MIXMASK}:87"),
        Row("method.moco.queue_size", 65536, f"{MIXMASK}:89"),
        Row("method.moco.momentum", 0.999, f"{MIXMASK}:91"),
        Row("method.moco.temperature", 0.2, f"{MIXMASK_README} (`--moco-t 0.2`)"),
        Row("method.moco.bn_splits", 1, "8 GPUs: each one's BN is a split, shuffle-BN across them (MoCo v2)"),
        Row("aug.recipe", "mocov2", f"{MIXMASK_README} (`--aug-plus`)"),
        Row("aug.crop_min_scale", 0.2, "MoCo v2 `--aug-plus` (`RandomResizedCrop(224, scale=(0.2, 1.))`)"),
    )),
    Family(("imagenet",), ("simclr",), (
        Row("optim.name", "lars", _OWN_PAPER.format("SimCLR")),
        Row("optim.base_lr", 0.3, _OWN_PAPER.format("SimCLR") + " (0.3 × batch / 256)"),
        Row("optim.weight_decay", 1e-6, _OWN_PAPER.format("SimCLR")),
        Row("optim.decay_norm_and_bias", False, _OWN_PAPER.format("SimCLR") + " (biases and BN excluded)"),
        Row("optim.warmup_epochs", 10.0, _OWN_PAPER.format("SimCLR")),
        Row("method.simclr.proj_dim", 128, _OWN_PAPER.format("SimCLR")),
        Row("method.simclr.proj_hidden_dim", 2048, _OWN_PAPER.format("SimCLR")),
        Row("method.simclr.temperature", 0.1, _OWN_PAPER.format("SimCLR")),
        Row("aug.recipe", "simclr", _OWN_PAPER.format("SimCLR")),
        Row("aug.crop_min_scale", 0.08, _OWN_PAPER.format("SimCLR")),
    )),
    Family(("imagenet",), ("byol",), (
        Row("optim.name", "lars", _OWN_PAPER.format("BYOL")),
        Row("optim.base_lr", 0.2, _OWN_PAPER.format("BYOL") + " (0.2 × batch / 256)"),
        Row("optim.weight_decay", 1.5e-6, _OWN_PAPER.format("BYOL")),
        Row("optim.decay_norm_and_bias", False, _OWN_PAPER.format("BYOL") + " (biases and BN excluded)"),
        Row("optim.warmup_epochs", 10.0, _OWN_PAPER.format("BYOL")),
        Row("method.byol.proj_dim", 256, _OWN_PAPER.format("BYOL")),
        Row("method.byol.proj_hidden_dim", 4096, _OWN_PAPER.format("BYOL")),
        Row("method.byol.pred_hidden_dim", 4096, _OWN_PAPER.format("BYOL")),
        Row("method.byol.base_tau", 0.996, _OWN_PAPER.format("BYOL")),
        Row("aug.recipe", "byol", _OWN_PAPER.format("BYOL")),
        Row("aug.crop_min_scale", 0.08, _OWN_PAPER.format("BYOL")),
    )),
    Family(("imagenet",), ("simsiam",), (
        Row("optim.name", "sgd", _OWN_PAPER.format("SimSiam")),
        Row("optim.base_lr", 0.05, _OWN_PAPER.format("SimSiam") + " (0.05 × batch / 256)"),
        Row("optim.weight_decay", 1e-4, _OWN_PAPER.format("SimSiam")),
        Row("optim.momentum", 0.9, _OWN_PAPER.format("SimSiam")),
        Row("optim.decay_norm_and_bias", True, _OWN_PAPER.format("SimSiam") + " (SGD over every parameter)"),
        Row("method.simsiam.proj_dim", 2048, _OWN_PAPER.format("SimSiam")),
        Row("method.simsiam.proj_hidden_dim", 2048, _OWN_PAPER.format("SimSiam")),
        Row("method.simsiam.pred_hidden_dim", 512, _OWN_PAPER.format("SimSiam")),
        Row("method.simsiam.proj_layers", 3, _OWN_PAPER.format("SimSiam")),
        Row("aug.recipe", "simclr", _OWN_PAPER.format("SimSiam") + " (MoCo v2's augmentation)"),
        Row("aug.crop_min_scale", 0.2, _OWN_PAPER.format("SimSiam")),
    )),
)

FAMILIES: tuple[Family, ...] = DATASET_FAMILIES + SMALL_METHOD_FAMILIES + IMAGENET_METHOD_FAMILIES


def rows_for(dataset: str, method: str) -> list[tuple[str, Any, str]]:
    """`(key, value, source)` of every value the preset DATASET-METHOD-* sets; a key appears at most once."""
    out: dict[str, tuple[str, Any, str]] = {}
    for family in FAMILIES:
        if dataset in family.datasets and method in family.methods:
            for row in family.rows:
                if row.key in out:
                    raise ValueError(f"preset table: {row.key} is set twice for {dataset}-{method}")
                out[row.key] = (row.key, family.value_for(row, dataset), row.source)
    return list(out.values())


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return " · ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_markdown() -> str:
    """The README's preset table: one row per family and key, with the value and its source."""
    lines = ["| presets | key | value | source |", "|---|---|---|---|"]
    for family in FAMILIES:
        for row in family.rows:
            lines.append(f"| `{family.label}` | `{row.key}` | {_fmt(row.value)} | {row.source} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
