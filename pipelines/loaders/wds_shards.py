"""Webdataset shards as the readers see them: which shards `data.path` names, which samples each holds
completely, and how an epoch is split across ranks (one definition for DALI's reader and the reference reader).

`data.path` is a folder written by `python -m pipelines.convert ... --format wds` (the split's sidecar
`DIR/<split>.json` lists the shards), a brace pattern `DIR/train-{000000..000099}.tar`, or one `.tar`; the
sidecar beside the shards gives the class names and the expected sample counts. With `tar_url` (e.g.
`s3://bucket/prefix`) the `.tar` files are read from there by name, while the sidecar and the `.idx` files stay in
`data.path` (DALI reads `s3://` itself; credentials and endpoint from the usual AWS variables).

Completeness comes from the index files: a sample counts when it has an image (`jpg`/`png`) and a `cls` member
lying inside the tar. A shard file that is gone, a truncated tar or a sample that lost a member is skipped and
counted (`num_missing`), never fatal; DALI then reads a filtered copy of that shard's index.

Epoch partition (DALI's `fn.readers.webdataset` with `shard_id`, `num_shards`, `stick_to_shard`): the shards are
put in a seeded per-epoch order, their complete samples concatenated, and rank r takes positions
[N r / W, N (r + 1) / W); every rank is padded to the same step count by repeating its last sample.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixmask.errors import UserError

SIDECAR_FORMAT = "mixmask-wds-sidecar"  # pipelines.wds.WDS_SIDECAR_FORMAT (not imported: it pulls in the writer)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


@dataclass
class ShardSet:
    """The shards of one split, their complete samples (rows, stored order) and the sidecar facts."""

    urls: list[str]
    index_paths: list[str]
    rows: list[np.ndarray]  # per shard: the row (dataset index) of each complete sample, in stored order
    class_names: list[str]
    sidecar_path: str
    num_expected: int
    filtered_index: dict[int, list[str]] = field(default_factory=dict)  # shard -> index lines of complete samples
    images = None  # the DALI backend's array path is never taken for shards

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def num_missing(self) -> int:
        """Samples the sidecar promises that no shard holds completely (skipped)."""
        return self.num_expected - len(self)

    def counts(self) -> np.ndarray:
        return np.array([len(r) for r in self.rows], dtype=np.int64)


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else None


def is_shard_path(path: str | os.PathLike | None) -> bool:
    """True when `path` names webdataset shards (a brace pattern, a `.tar`, or a folder holding a shard sidecar)."""
    if not path:
        return False
    text = str(path)
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return True
    folder = Path(text)
    return folder.is_dir() and any(_read_sidecar(p) is not None for p in folder.glob("*.json"))


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _sidecar_for(urls: list[str]) -> tuple[Path, dict]:
    """The sidecar in the shards' folder that lists the first shard."""
    folder = Path(urls[0]).parent
    for candidate in sorted(folder.glob("*.json")):
        data = _read_sidecar(candidate)
        if data is not None and Path(urls[0]).name in {s["name"] for s in data.get("shards", [])}:
            return candidate, data
    raise UserError(f"no shard sidecar in {folder} lists {Path(urls[0]).name}: convert with "
                    "`python -m pipelines.convert SOURCE ... --format wds --out DIR`")


def _parse_index(idx: Path, tar_size: int) -> tuple[list[int], list[str], int]:
    """(rows of complete samples, their index lines, samples listed) from a wds2idx v1.2 index."""
    rows, lines = [], []
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            raise UserError(f"{idx} is not a v1.2 webdataset index (make one with DALI's wds2idx)")
        listed = 0
        for line in f:
            fields = line.split()
            if not fields:
                continue
            listed += 1
            parts = [fields[k:k + 4] for k in range(0, len(fields), 4)]
            exts = {p[0] for p in parts if len(p) == 4 and int(p[1]) + int(p[2]) <= tar_size}
            if "cls" not in exts or not exts & set(IMAGE_EXTENSIONS):
                continue
            key = parts[0][3].split(".", 1)[0]
            if not key.isdigit():
                raise UserError(f"{idx}: sample key {key!r} is not a row number (shards not written by "
                                "pipelines.convert --format wds)")
            rows.append(int(key))
            lines.append(line.rstrip("\n"))
    return rows, lines, listed


def is_remote(url: str) -> bool:
    return "://" in url


def open_shards(path: str | os.PathLike, split: str = "train", tar_url: str = "") -> ShardSet:
    """The shards `path` names for `split` (their tars under `tar_url` when set); UserError when there are none."""
    text = str(path)
    if Path(text).is_dir():
        sidecar = Path(text) / f"{split}.json"
        data = _read_sidecar(sidecar)
        if data is None:
            found = sorted(p.name for p in Path(text).glob("*.json") if _read_sidecar(p) is not None)
            raise UserError(f"{text} has no {split} shards ({sidecar.name} missing; found: {', '.join(found)})")
        urls = [str(Path(text) / s["name"]) for s in data["shards"]]
    else:
        urls = _expand(text)
        if not urls:
            raise UserError(f"data.path={text!r} names no shards")
        sidecar, data = _sidecar_for(urls)
    expected = {s["name"]: int(s["num_samples"]) for s in data["shards"]}
    kept, indexes, rows, filtered, num_expected = [], [], [], {}, 0
    for url in urls:
        name = Path(url).name
        if name not in expected:
            raise UserError(f"{url} is not listed in {sidecar}")
        num_expected += expected[name]
        idx = Path(url).with_suffix(".idx")
        if tar_url:
            url = f"{tar_url.rstrip('/')}/{name}"
        if not idx.is_file() or (not is_remote(url) and not Path(url).is_file()):
            continue  # a lost shard: its samples are counted as missing
        # a remote tar is not sized here: a truncated one fails its batches in DALI (dropped and counted)
        size = 2**63 if is_remote(url) else os.path.getsize(url)
        shard_rows, lines, listed = _parse_index(idx, size)
        if not shard_rows:
            continue
        if len(shard_rows) < listed:
            filtered[len(kept)] = lines
        kept.append(url)
        indexes.append(str(idx))
        rows.append(np.asarray(shard_rows, dtype=np.int64))
    shards = ShardSet(kept, indexes, rows, list(data["class_names"]), str(sidecar), num_expected, filtered)
    if len(shards) == 0:
        raise UserError(f"the shards of {text} hold no complete sample ({num_expected} expected)")
    return shards


def dali_index_paths(shards: ShardSet, folder: str) -> list[str]:
    """Index files for DALI: the shard's own, or a filtered copy (complete samples only) written under `folder`."""
    paths = list(shards.index_paths)
    for k, lines in shards.filtered_index.items():
        paths[k] = os.path.join(folder, f"{k:06d}.idx")
        with open(paths[k], "w") as f:
            f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    return paths


def filtered_index_folder(shards: ShardSet) -> tempfile.TemporaryDirectory | None:
    return tempfile.TemporaryDirectory(prefix="mixmask-wds-idx-") if shards.filtered_index else None


def epoch_shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order the shards are read in `epoch` (the same on every rank)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x7D5]).permutation(num_shards)


def rank_span(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Positions [lo, hi) of the epoch's sample sequence that `rank` reads (DALI's sharding rule)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def rank_rows(shards: ShardSet, order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The rows `rank` reads in an epoch whose shard order is `order`, in stored order (before the buffer).

    Shape:
        returns (hi - lo,) int64
    """
    sequence = np.concatenate([shards.rows[k] for k in order])
    lo, hi = rank_span(len(sequence), rank, world_size)
    return sequence[lo:hi]


# backend -> (module, two-view class, eval class): the readers of shards, picked by `data.backend`
SHARD_BACKENDS = {
    "dali": ("pipelines.loaders.wds_dali", "DALIShardTwoViewLoader", "DALIShardEvalLoader"),
    "torchvision": ("pipelines.loaders.wds_reference", "ReferenceShardTwoViewLoader", "ReferenceShardEvalLoader"),
}


def build_shard_loader(backend: str, path: str | os.PathLike, split: str, shuffle_buffer: int, tar_url: str = "",
                       *, eval_loader: bool, **common):
    """The two-view loader (or with `eval_loader` the single-view one) of `backend` over the shards of `split`."""
    import importlib

    if backend not in SHARD_BACKENDS:
        raise UserError(f"data.path={str(path)!r} holds webdataset shards, which data.backend=dali or "
                        f"torchvision reads (not {backend}); ffcv reads a .beton")
    if tar_url and backend != "dali":
        raise UserError(f"data.shard_url={tar_url!r}: remote shards are read by data.backend=dali; the reference "
                        "reader (torchvision) reads local shards")
    if shuffle_buffer < 0:
        raise UserError(f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
    module, two_view, single_view = SHARD_BACKENDS[backend]
    cls = getattr(importlib.import_module(module), single_view if eval_loader else two_view)
    return cls(open_shards(path, split, tar_url), shuffle_buffer=shuffle_buffer, **common)
