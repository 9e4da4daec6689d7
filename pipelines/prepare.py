"""Data preparation for a run: where the training and held-out data live, their classes, and the loader order.

Reads only the config's `data` section (passed in, never imported: the data layer does not import the run layer),
converts the synthetic default to .beton on first use, and maps held-out labels onto the train split's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def synthetic_kwargs(data_cfg: Any, split: str) -> dict:
    """Generator arguments of the synthetic default (fixed data seed: the dataset does not change with run.seed)."""
    n = data_cfg.synthetic_images if split == "train" else data_cfg.synthetic_val_images
    return dict(num_images=n, num_classes=data_cfg.synthetic_classes, resolution=data_cfg.resolution, seed=0)


def synthetic_beton(data_cfg: Any, split: str) -> Path:
    from pipelines.synthetic import GENERATOR_VERSION

    kw = synthetic_kwargs(data_cfg, split)
    name = f"synthetic-v{GENERATOR_VERSION}-{kw['resolution']}px-{kw['num_images']}x{kw['num_classes']}-{split}.beton"
    return Path(data_cfg.data_dir) / name


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


def prepare_data(data_cfg: Any, *, is_main: bool, barrier: Callable[[], None], log: Callable[[str], None]) -> DataPaths:
    """Resolve the data paths; convert the synthetic default to .beton on first use (rank 0, others wait).

    `data_cfg` is the config's `data` section; `barrier` waits for every rank (a no-op in one process).
    """
    from pipelines.loaders.wds_shards import is_shard_path

    if data_cfg.path and is_shard_path(data_cfg.path):  # webdataset shards, whatever data.source says
        return _shard_paths(data_cfg, log)
    if data_cfg.source == "synthetic":
        paths = DataPaths(train=None, val=None, num_classes=data_cfg.synthetic_classes,
                          synthetic_train=synthetic_kwargs(data_cfg, "train"),
                          synthetic_val=synthetic_kwargs(data_cfg, "val"))
        if data_cfg.backend == "ffcv":
            from pipelines.convert import convert

            for split in ("train", "val"):
                out = synthetic_beton(data_cfg, split)
                if is_main and not out.is_file():
                    summary = convert("synthetic", out, split=split, **synthetic_kwargs(data_cfg, split))
                    log(f"wrote {out}: {summary.num_written} images in {summary.seconds:.1f}s")
            barrier()
            paths.train, paths.val = str(synthetic_beton(data_cfg, "train")), str(synthetic_beton(data_cfg, "val"))
        return paths

    if not data_cfg.path:
        raise UserError(f"data.path is required for data.source={data_cfg.source!r} "
                        "(a .beton for data.backend=ffcv, the dataset root for dali/torchvision)")
    train = Path(data_cfg.path)
    if not train.exists():
        raise UserError(f"data.path={data_cfg.path!r} does not exist")
    if data_cfg.backend == "ffcv":
        if train.suffix != ".beton":
            raise UserError(f"data.backend=ffcv reads .beton files, got data.path={data_cfg.path!r}; convert with "
                            f"`python -m pipelines.convert {data_cfg.source} --root DIR --split train --out X.beton`")
        val = Path(data_cfg.val_path) if data_cfg.val_path else train.with_name(train.name.replace("train", "val"))
        train_classes = _class_names_from_sidecar(train)
        has_val = val.is_file() and val != train
        mapping = _val_label_map(train_classes, _class_names_from_sidecar(val), log) if has_val else None
        return DataPaths(train=str(train), val=str(val) if has_val else None, num_classes=len(train_classes),
                         val_label_map=mapping)
    from pipelines.sources import open_source

    source = open_source(data_cfg.source, train, "train")
    val_root = data_cfg.val_path or data_cfg.path
    try:
        val_classes: list[str] | None = list(open_source(data_cfg.source, val_root, "val").class_names)
    except UserError:  # no held-out split here: the loaders say so if one is needed
        val_classes = None
    mapping = _val_label_map(list(source.class_names), val_classes, log) if val_classes is not None else None
    return DataPaths(train=str(train), val=val_root, num_classes=len(source.class_names), val_label_map=mapping)


def _shard_paths(data_cfg: Any, log: Callable[[str], None]) -> DataPaths:
    """Webdataset shards: classes from their sidecar; held-out shards from data.val_path or the folder's val split."""
    from pipelines.loaders.wds_shards import is_shard_path, open_shards

    if data_cfg.backend not in ("dali", "torchvision"):
        raise UserError(f"data.path={data_cfg.path!r} holds webdataset shards: use data.backend=dali (or "
                        "torchvision, the reference reader); ffcv reads a .beton")
    train = open_shards(data_cfg.path, "train", data_cfg.shard_url)
    if train.num_missing:
        log(f"{train.num_missing} of {train.num_expected} samples are missing from the shards of "
            f"{data_cfg.path} (lost shard, truncated tar or member): skipped")
    val = data_cfg.val_path or None
    if val is None and Path(data_cfg.path).is_dir() and (Path(data_cfg.path) / "val.json").is_file():
        val = data_cfg.path
    if val is not None and not is_shard_path(val):
        raise UserError(f"data.val_path={val!r} must be webdataset shards too when data.path holds shards")
    mapping = None
    if val is not None:
        mapping = _val_label_map(list(train.class_names), list(open_shards(val, "val", data_cfg.shard_url).class_names),
                                 log)
    return DataPaths(train=data_cfg.path, val=val, num_classes=len(train.class_names), val_label_map=mapping)


def train_order(data_cfg: Any, path: str | None) -> str:
    """`data.order` resolved against the training file's size and this machine's RAM (`pipelines.loaders.order`)."""
    import psutil

    from pipelines.loaders.order import resolve_order

    file_bytes = Path(path).stat().st_size if data_cfg.backend == "ffcv" and path and Path(path).is_file() else 0
    return resolve_order(data_cfg.order, file_bytes=file_bytes, ram_bytes=psutil.virtual_memory().total,
                         ram_share=data_cfg.ram_share, os_cache=data_cfg.os_cache, backend=data_cfg.backend)
