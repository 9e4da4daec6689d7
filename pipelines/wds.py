"""Webdataset tar shards out of the converter: `KEY.jpg|png` + `KEY.cls`, DALI index files, the JSON sidecar.

- Samples are shuffled across shards at write time (readers only shuffle within a buffer): the assignment of the
  converted samples to shards is a permutation drawn from `seed` and cut into runs of `samples_per_shard`.
- `KEY` is the sample's row number in the converted set (the same numbering as the `.beton` of the same source),
  zero-padded, so every reader can hand the loop a dataset index; `KEY.cls` holds the label as ASCII digits.
- Each shard is written to a temporary name with its index (`NAME.idx`, DALI's `wds2idx` v1.2 format) and
  renamed into place only when complete; the sidecar `DIR/PREFIX.json` is written last and lists the shards. A
  re-run of an interrupted conversion keeps the finished shards (the plan in `DIR/.PREFIX.plan.json` says which
  samples each holds) and writes the rest; a plan that differs (other images, seed or options) is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixmask.errors import UserError
from pipelines.sidecar import dataset_record, write_json_atomic
from pipelines.sources import Source

WDS_SIDECAR_FORMAT = "mixmask-wds-sidecar"
WDS_SIDECAR_VERSION = 1
KEY_DIGITS = 10
IMAGE_EXTENSIONS = ("jpg", "png")
INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512
_CTX = mp.get_context("fork")
_JOB: _ShardJob | None = None


@dataclass
class ShardLayout:
    """Where a conversion's shards go: `folder/prefix-000000.tar` (+ `.idx`), sidecar `folder/prefix.json`."""

    folder: Path
    prefix: str

    @classmethod
    def from_out(cls, out: Path, split: str) -> ShardLayout:
        """`--out DIR` (shards named after the split) or `--out DIR/NAME-%06d.tar` (a printf pattern)."""
        out = Path(out).expanduser()
        if "%" in out.name:
            if not out.name.endswith("-%06d.tar"):
                raise UserError(f"--out {out}: a shard pattern must end in -%06d.tar, e.g. {out.parent}/train-%06d.tar")
            return cls(out.parent, out.name[: -len("-%06d.tar")])
        if out.suffix in (".tar", ".beton", ".json"):
            raise UserError(f"--out {out} with --format wds is a folder (or DIR/NAME-%06d.tar), not a file")
        return cls(out, split)

    def shard(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:06d}.tar"

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.prefix}.json"

    @property
    def plan(self) -> Path:
        return self.folder / f".{self.prefix}.plan.json"


def index_path(tar: str | Path) -> Path:
    """DALI's index file of a shard: the same name with `.idx`."""
    return Path(tar).with_suffix(".idx")


def sample_key(row: int) -> str:
    return f"{row:0{KEY_DIGITS}d}"


def assign_to_shards(num_samples: int, samples_per_shard: int, seed: int) -> list[np.ndarray]:
    """Rows of each shard: a seeded permutation of range(num_samples) cut into runs of `samples_per_shard`."""
    order = np.random.default_rng([seed, 0x3D5]).permutation(num_samples)
    return [order[k:k + samples_per_shard] for k in range(0, num_samples, samples_per_shard)]


def encode_image(image: np.ndarray, *, write_mode: str, max_resolution: int | None, jpeg_quality: int,
                 smart_threshold: int) -> tuple[str, bytes]:
    """(extension, bytes) of an HWC uint8 RGB image: PNG for raw (pixel-exact), JPEG for jpg, by size for smart.

    Shape:
        image: (H, W, 3) uint8
    """
    import cv2
    from PIL import Image

    h, w = image.shape[:2]
    if max_resolution is not None and max(h, w) > max_resolution:
        ratio = max_resolution / max(h, w)  # as FFCV's RGBImageField resizes
        image = cv2.resize(image, (max(1, int(w * ratio)), max(1, int(h * ratio))), interpolation=cv2.INTER_AREA)
    raw = write_mode == "raw" or (write_mode == "smart" and image.size <= smart_threshold)
    buf = io.BytesIO()
    if raw:
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        return "png", buf.getvalue()
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    return "jpg", buf.getvalue()


def _passthrough_jpeg(path: str | None, max_resolution: int | None) -> bytes | None:
    """The file's own bytes when it is an RGB JPEG within `max_resolution`: no re-encoding, no quality loss."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "JPEG" or im.mode != "RGB":
            return None
        if max_resolution is not None and max(im.size) > max_resolution:
            return None
    with open(path, "rb") as f:
        return f.read()


def write_shard(path: Path, samples: list[tuple[str, str, bytes, int]]) -> None:
    """Write `samples` [(key, image extension, image bytes, label)] as one tar + its DALI index, atomically.

    The index goes into place first and the tar last, so a shard that exists is complete with its index.
    """
    tmp_tar = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_idx = path.with_name(f".{index_path(path).name}.tmp-{os.getpid()}")
    lines = []
    try:
        with open(tmp_tar, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, data, label in samples:
                parts = []
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(int(label)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(payload), 0o444, 0
                    # the payload starts right after this member's header (offset and size, as wds2idx records)
                    offset = tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
                    tar.addfile(info, io.BytesIO(payload))
                    parts.append(f"{name.split('.', 1)[1]} {offset} {len(payload)} {name}")
                lines.append(" ".join(parts))
        with open(tmp_tar, "rb+") as f:
            os.fsync(f.fileno())
        with open(tmp_idx, "w") as f:
            f.write(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_idx, index_path(path))
        os.replace(tmp_tar, path)
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)


@dataclass
class _ShardJob:
    """What a writer process needs: the source, the rows to write and the encoding options."""

    src: Source
    rows: np.ndarray  # converted row -> source index
    images: np.ndarray | None  # array-backed sources, materialised once before the fork
    layout: ShardLayout
    assignment: list[np.ndarray]
    options: dict


def _write_one(k: int) -> int:
    job = _JOB
    samples = []
    for row in job.assignment[k]:
        i = int(job.rows[row])
        data = None
        if job.images is None and job.options["write_mode"] != "raw":
            data = _passthrough_jpeg(job.src.path(i), job.options["max_resolution"])
        if data is not None:
            ext = "jpg"
        else:
            image = job.images[i] if job.images is not None else job.src.load(i)
            ext, data = encode_image(np.ascontiguousarray(image), **job.options)
        samples.append((sample_key(int(row)), ext, data, job.src.label(i)))
    write_shard(job.layout.shard(k), samples)
    return len(samples)


def plan_digest(rows: np.ndarray, labels: np.ndarray) -> str:
    """A fingerprint of which source samples, with which labels, a conversion writes."""
    h = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def _check_plan(layout: ShardLayout, plan: dict) -> None:
    """Refuse to mix shards of a different conversion into this one; write the plan on a fresh folder."""
    if layout.plan.is_file():
        old = json.loads(layout.plan.read_text())
        differ = sorted(k for k in plan if old.get(k) != plan[k])
        if differ:
            raise UserError(f"{layout.folder} holds {layout.prefix} shards of a different conversion (differs in: "
                            f"{', '.join(differ)}); give another --out or remove them")
        return
    if any(layout.folder.glob(f"{layout.prefix}-*.tar")):
        raise UserError(f"{layout.folder} holds {layout.prefix}-*.tar shards without a plan (not written by this "
                        "converter?); give another --out or remove them")
    write_json_atomic(layout.plan, plan)


def write_shards(src: Source, rows: np.ndarray, layout: ShardLayout, *, samples_per_shard: int, seed: int,
                 write_mode: str, max_resolution: int | None, jpeg_quality: int, smart_threshold: int,
                 num_workers: int, progress: Callable[[int], None]) -> list[dict]:
    """Write the source samples `rows` (in row order) as shards under `layout`; returns the shard list.

    `progress(samples_done)` is called as shards finish (shards kept from an earlier run count as done).
    """
    global _JOB
    if samples_per_shard < 1:
        raise UserError(f"--shard-samples must be at least 1, got {samples_per_shard}")
    layout.folder.mkdir(parents=True, exist_ok=True)
    if not os.access(layout.folder, os.W_OK):
        raise UserError(f"cannot write to {layout.folder}")
    labels = np.fromiter((src.label(int(i)) for i in rows), dtype=np.int64, count=len(rows))
    options = dict(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                   smart_threshold=smart_threshold)
    _check_plan(layout, {"num_samples": int(len(rows)), "samples_per_shard": samples_per_shard, "seed": seed,
                         "digest": plan_digest(rows, labels), **options})
    for stale in layout.folder.glob(f".{layout.prefix}-*.tmp-*"):  # a killed run's half-written shard
        stale.unlink(missing_ok=True)
    assignment = assign_to_shards(len(rows), samples_per_shard, seed)
    todo = [k for k in range(len(assignment)) if not layout.shard(k).is_file()]
    done = len(rows) - sum(len(assignment[k]) for k in todo)
    progress(done)
    arrays = src.arrays()  # synthetic: generated once here, shared with the writers by fork
    _JOB = _ShardJob(src, np.asarray(rows, dtype=np.int64), None if arrays is None else arrays[0], layout,
                     assignment, options)
    try:
        if num_workers == 1 or len(todo) <= 1:
            for k in todo:
                done += _write_one(k)
                progress(done)
        else:
            with _CTX.Pool(min(num_workers, len(todo))) as pool:
                for count in pool.imap_unordered(_write_one, todo):
                    done += count
                    progress(done)
    finally:
        _JOB = None
    return [{"name": layout.shard(k).name, "index": index_path(layout.shard(k)).name, "num_samples": len(a)}
            for k, a in enumerate(assignment)]


def write_wds_sidecar(layout: ShardLayout, src: Source, rows: np.ndarray, skipped: list[tuple[str, str]],
                      shards: list[dict], seconds: float, write: dict) -> dict:
    """The sidecar `DIR/PREFIX.json`: as the `.beton` one (source, classes, counts, skipped), plus the shards."""
    data = {
        "format": WDS_SIDECAR_FORMAT,
        "version": WDS_SIDECAR_VERSION,
        "fields": {"image": "jpg|png (RGB)", "label": "cls (ASCII integer)", "key": f"row, {KEY_DIGITS} digits"},
        **dataset_record(src, rows, skipped, seconds),
        "write": write,
        "shards": shards,
    }
    write_json_atomic(layout.sidecar, data)
    return data
