"""Named presets: the paper's settings for every DATASET-METHOD-BRANCH, plus the CPU `demo`.

Values follow the paper's Table 8 (CIFAR-100 and Tiny-ImageNet, inherited from Un-Mix) and the official MixMask
README for ImageNet (MoCo v2 recipe). `base_lr` is quoted at the preset's own batch (`base_batch`), so the preset
trains with exactly the paper's learning rate and other batch sizes scale it linearly.
"""

from __future__ import annotations

from collections.abc import Callable

from mixmask.config import BRANCHES, METHOD_NAMES, Config
from mixmask.errors import UserError, did_you_mean

DATASETS = ("cifar100", "tinyimagenet", "imagenet")

# Grid that the paper found best at each resolution (32 px: 2, 64 px: 4, 224 px: 8).
_DATASET = {
    "cifar100": dict(source="cifar100", resolution=32, batch=512, epochs=1000, grid=2, arch="resnet18", stem=True),
    "tinyimagenet": dict(source="tinyimagenet", resolution=64, batch=512, epochs=1000, grid=4, arch="resnet18",
                         stem=True),
    "imagenet": dict(source="imagenet", resolution=224, batch=256, epochs=200, grid=8, arch="resnet50", stem=False),
}


def _small_method(cfg: Config, method: str, dataset: str) -> None:
    """Table 8 hyper-parameters for CIFAR-100 / Tiny-ImageNet."""
    m, o = cfg.method, cfg.optim
    if method == "moco":
        o.name, o.base_lr, o.weight_decay = "sgd", 0.06, 5e-4
        m.momentum, m.queue_size, m.temperature, m.dim, m.mlp_head = 0.99, 4096, 0.1, 128, True
        cfg.aug.recipe = "mocov2"
    elif method in ("simclr", "byol"):
        o.name, o.weight_decay = "adam", 1e-6
        o.base_lr = 0.003 if dataset == "cifar100" else 0.002
        m.hidden_dim = 1024
        if method == "simclr":
            m.dim, m.temperature = 128, 0.5
            cfg.aug.recipe = "simclr"
        else:
            m.dim, m.pred_dim, m.momentum = 256, 1024, 0.99
            cfg.aug.recipe = "byol"
    elif method == "simsiam":
        o.name, o.base_lr, o.weight_decay, o.warmup_epochs = "sgd", 0.03, 5e-4, 10
        m.dim, m.hidden_dim, m.pred_dim, m.proj_layers = 2048, 2048, 512, 2
        cfg.aug.recipe = "simclr"


def _imagenet_method(cfg: Config, method: str) -> None:
    """MoCo v2 as in the official MixMask README; the other methods with their own papers' ImageNet recipes."""
    m, o = cfg.method, cfg.optim
    if method == "moco":
        o.name, o.base_lr, o.weight_decay = "sgd", 0.03, 1e-4
        m.momentum, m.queue_size, m.temperature, m.dim, m.mlp_head = 0.999, 65536, 0.2, 128, True
        cfg.aug.recipe = "mocov2"
    elif method == "simclr":
        o.name, o.base_lr, o.weight_decay, o.warmup_epochs = "lars", 0.3, 1e-6, 10
        m.dim, m.hidden_dim, m.temperature = 128, 2048, 0.1
        cfg.aug.recipe = "simclr"
    elif method == "byol":
        o.name, o.base_lr, o.weight_decay, o.warmup_epochs = "lars", 0.2, 1.5e-6, 10
        m.dim, m.hidden_dim, m.pred_dim, m.momentum = 256, 4096, 4096, 0.996
        cfg.aug.recipe = "byol"
    elif method == "simsiam":
        o.name, o.base_lr, o.weight_decay = "sgd", 0.05, 1e-4
        m.dim, m.hidden_dim, m.pred_dim = 2048, 2048, 512
        cfg.aug.recipe = "simclr"


def paper_preset(dataset: str, method: str, branch: str) -> Config:
    """The paper's configuration for one dataset, method and branch."""
    d = _DATASET[dataset]
    cfg = Config(preset=f"{dataset}-{method}-{branch}")
    cfg.data.source = "imagefolder" if d["source"] == "imagenet" else str(d["source"])
    cfg.data.resolution = int(d["resolution"])
    cfg.data.batch_size = int(d["batch"])
    cfg.data.workers = 10 if dataset == "imagenet" else 8
    cfg.optim.base_batch = int(d["batch"])
    cfg.run.epochs = int(d["epochs"])
    cfg.run.knn_every = 0 if dataset == "imagenet" else 10
    cfg.mask.grid_size = int(d["grid"])
    cfg.mask.kind = "discrete" if dataset == "cifar100" else "block"  # Table 1: BEiT blocks cannot fit grid 2
    cfg.method.name, cfg.method.branch = method, branch
    cfg.method.arch, cfg.method.cifar_stem = str(d["arch"]), bool(d["stem"])
    cfg.method.unmix_prob = 0.5
    cfg.aug.crop_min_scale = 0.2 if dataset == "imagenet" else 0.08
    if dataset == "imagenet":
        _imagenet_method(cfg, method)
    else:
        _small_method(cfg, method, dataset)
    return cfg


def demo() -> Config:
    """MoCo v2 + MixMask on the synthetic default, sized to finish on 2 CPU cores in a few minutes.

    AdamW at 3e-4 instead of the paper's SGD at 0.06: in the few hundred steps the CPU allows, SGD at that rate
    first wrecks the random-init features and has not rebuilt better ones by the end (kNN below a random-init
    backbone), while AdamW improves on them steadily (README, "The demo"). Crops keep at least 35% of the 32 px
    image so both views still show the object.
    """
    cfg = Config(preset="demo")
    cfg.data.source, cfg.data.backend = "synthetic", "ffcv"
    cfg.data.resolution, cfg.data.batch_size, cfg.data.workers = 32, 128, 2
    cfg.data.synthetic_images, cfg.data.synthetic_val_images, cfg.data.synthetic_classes = 2000, 500, 10
    cfg.method.name, cfg.method.branch, cfg.method.arch, cfg.method.cifar_stem = "moco", "mixmask", "resnet18", False
    cfg.method.queue_size, cfg.method.momentum, cfg.method.temperature = 1024, 0.99, 0.2
    cfg.mask.grid_size, cfg.mask.share = 4, "pair"
    cfg.aug.recipe, cfg.aug.crop_min_scale = "mocov2", 0.35
    cfg.optim.name, cfg.optim.base_lr, cfg.optim.base_batch, cfg.optim.weight_decay = "adamw", 3e-4, 128, 1e-4
    cfg.optim.warmup_epochs = 1
    cfg.run.epochs, cfg.run.device, cfg.run.knn_every, cfg.run.ckpt_every = 40, "cpu", 10, 10
    cfg.eval.epochs, cfg.eval.knn_k = 10, 20
    return cfg


def _registry() -> dict[str, Callable[[], Config]]:
    presets: dict[str, Callable[[], Config]] = {"demo": demo}
    for dataset in DATASETS:
        for method in METHOD_NAMES:
            for branch in BRANCHES:
                presets[f"{dataset}-{method}-{branch}"] = (
                    lambda d=dataset, m=method, b=branch: paper_preset(d, m, b))
    return presets


PRESETS = _registry()


def get_preset(name: str) -> Config:
    """A fresh Config for the named preset; UserError with the closest name when unknown."""
    if name not in PRESETS:
        hint = did_you_mean(name, PRESETS)
        raise UserError(f"unknown preset {name!r}{hint}; valid: demo, or DATASET-METHOD-BRANCH with DATASET in "
                        f"{'|'.join(DATASETS)}, METHOD in {'|'.join(METHOD_NAMES)}, BRANCH in {'|'.join(BRANCHES)}")
    return PRESETS[name]()
