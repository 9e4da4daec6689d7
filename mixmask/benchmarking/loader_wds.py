"""`bench.py loader --source wds`: the same images as webdataset shards (DALI's reader and the reference reader)
beside the `.beton` (ffcv) and the JPEG folder or arrays (dali, torchvision), measured in one invocation.

The images are an ImageFolder (`--data DIR`, e.g. made by `--make-photos`) or the synthetic set; the shards and
the `.beton` are written once under `data/bench/` (JPEG quality 90 for photographs; the folder's own JPEG bytes
go into the shards unchanged), or `--data` may already be a shard folder, which is then read as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.loaders.wds_shards import SHARD_BACKENDS, is_shard_path


@dataclass
class LoaderRun:
    """One row to measure: a backend reading one storage form of the images."""

    backend: str
    storage: str  # beton | folder | arrays | wds
    source: str
    path: str | None
    synthetic: dict | None


def _shards_of(source: str, root: str | None, synthetic: dict | None, shard_samples: int) -> Path:
    """The images as shards under data/bench/ (written once; an interrupted write resumes)."""
    from pipelines.convert import convert
    from pipelines.synthetic import GENERATOR_VERSION

    if source == "synthetic":
        name = f"synthetic-v{GENERATOR_VERSION}-{synthetic['resolution']}px-{synthetic['num_images']}-wds"
    else:
        name = f"{source}-{Path(root).resolve().name}-wds"
    out = Path("data/bench") / name
    if not (out / "train.json").is_file():
        convert(source, out, root=root, split="train", write_mode="jpg", jpeg_quality=90, out_format="wds",
                shard_samples=shard_samples, **(synthetic or {}))
    return out


def wds_runs(backends: list[str], *, data: str | None, data_beton: str | None, synthetic: dict | None,
             shard_samples: int, beton_of) -> list[LoaderRun]:
    """The rows of `--source wds`: each backend on its own storage, then the shard readers on the shards.

    `beton_of(source, root_or_synthetic)` gives the `.beton` of the images (bench.py's cached conversion).
    """
    if data is not None and is_shard_path(data):
        return [LoaderRun(b, "wds", "wds", data, None) for b in backends if b in SHARD_BACKENDS]
    source = "synthetic" if data is None else "imagefolder"
    runs = []
    for backend in backends:
        if backend == "ffcv":
            path = data_beton or str(beton_of(source, data if data is not None else synthetic))
            runs.append(LoaderRun("ffcv", "beton", source, path, None))
        else:
            runs.append(LoaderRun(backend, "arrays" if data is None else "folder", source, data, synthetic))
    shards = str(_shards_of(source, data, synthetic, shard_samples))
    runs += [LoaderRun(b, "wds", source, shards, None) for b in backends if b in SHARD_BACKENDS]
    return runs
