"""Convert a dataset source to an FFCV `.beton` (fields `image`, `label`) or webdataset shards, plus a JSON sidecar.

Bad files never reach the FFCV writer: file-based sources are validated in a parallel pre-pass, and what fails
is skipped and listed. The writer runs on a temporary name beside the output, and the rename happens only once
the file is complete, so a failure leaves any earlier output untouched.

    python -m pipelines.convert SOURCE --root DIR --split SPLIT --out FILE.beton [--write-mode raw|jpg|smart]
        [--max-resolution N] [--jpeg-quality Q] [--workers N] [--overwrite]
    python -m pipelines.convert synthetic --out FILE.beton [--num-images N --num-classes C --resolution R --seed S]
    python -m pipelines.convert SOURCE ... --format wds --out DIR [--shard-samples N]   (webdataset shards)

An existing output is replaced only with `--overwrite`. SIGTERM or SIGINT stops the worker processes, removes the
temporary file and exits non-zero with one line; a complete earlier output stays as it was.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixmask.errors import UserError, choice_error, cli_entry
from pipelines.convert_writer import Reporter, validate_files, write_beton
from pipelines.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, dataset_record, sidecar_path, write_json_atomic
from pipelines.sources import SOURCES, SyntheticSource, open_source

WRITE_MODES = ("raw", "jpg", "smart")
FORMATS = ("beton", "wds")
# 'smart' keeps images up to 256x256 raw (decoding is the bottleneck there) and JPEG-compresses larger ones.
SMART_THRESHOLD_BYTES = 256 * 256 * 3


@dataclass
class ConversionSummary:
    """What a conversion did: counts, skipped files with reasons, options and speed."""

    source: str
    split: str
    out: Path
    sidecar: Path
    num_written: int
    num_skipped: int
    skipped: list[tuple[str, str]]
    class_names: list[str]
    class_counts: list[int]
    write_mode: str
    max_resolution: int | None
    jpeg_quality: int
    workers: int
    seconds: float
    images_per_s: float
    bytes_written: int
    extra: dict = field(default_factory=dict)


def _check_options(write_mode: str, max_resolution: int | None, jpeg_quality: int, workers: int | None) -> int:
    """Validate the write options; returns the worker count to use."""
    if write_mode not in WRITE_MODES:
        raise choice_error("write mode", write_mode, WRITE_MODES)
    if max_resolution is not None and not 1 <= max_resolution <= 65535:
        raise UserError(f"max_resolution must be in 1..65535, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    return workers if workers is not None else max(1, min(os.cpu_count() or 1, 16))


def _check_out(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'data.beton'}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another name")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to {out.parent}")
    return out


def convert(source: str, out: Path, *, root: str | Path | None = None, split: str = "train",
            write_mode: str = "raw", max_resolution: int | None = None, jpeg_quality: int = 90,
            workers: int | None = None, num_images: int = 2000, num_classes: int = 10, resolution: int = 32,
            seed: int = 0, progress: bool = False, out_format: str = "beton",
            shard_samples: int = 10000, overwrite: bool = True) -> ConversionSummary:
    """Convert split `split` of `source` to `out` (+ `out.json`); UserError when nothing can be converted.

    With `out_format="wds"`, `out` is a folder (or `DIR/NAME-%06d.tar`) of webdataset shards (`pipelines.wds`); an
    interrupted shard conversion is continued, not replaced. For a `.beton`, `overwrite=False` refuses an existing
    `out` (the command line's default, `--overwrite` lifts it).
    """
    num_workers = _check_options(write_mode, max_resolution, jpeg_quality, workers)
    if out_format not in FORMATS:
        raise choice_error("format", out_format, FORMATS)
    out = _check_out(out, overwrite) if out_format == "beton" else out
    src = open_source(source, root, split, num_images=num_images, num_classes=num_classes,
                      resolution=resolution, seed=seed)
    layout = _shard_layout(out, src.split) if out_format == "wds" else None
    if layout is None:  # shards need no FFCV
        # FFCV's import compiles numba code for seconds: pay it before the clock starts so images/s means writing.
        import ffcv.writer  # noqa: F401

    start = time.perf_counter()
    skipped: list[tuple[str, str]] = list(src.ignored)
    with Reporter(progress) as reporter:
        # Array-backed sources hold valid pixels by construction; synthetic ones are made block by block in the
        # writer's workers (asking for all its arrays here would generate the whole set up front).
        if isinstance(src, SyntheticSource):
            good = np.arange(len(src), dtype=np.int64)
            max_hw = (src.resolution, src.resolution)
        elif src.arrays() is not None:
            images, _ = src.arrays()
            good = np.arange(len(src), dtype=np.int64)
            max_hw = images.shape[1:3] if len(images) else (0, 0)
        else:
            good, bad, max_hw = validate_files(src, num_workers, reporter)
            skipped += bad
        if len(good) == 0:
            what = f"{len(skipped)} files were skipped" if skipped else "it holds no images"
            hint = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise UserError(f"nothing to convert from {source} {src.split} at {root}: {what}{hint}")
        if out_format == "wds":
            return _convert_wds(src, good, skipped, layout, start, reporter, write_mode=write_mode,
                                max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=num_workers,
                                shard_samples=shard_samples, seed=seed)
        chunk = SyntheticSource.block_size if isinstance(src, SyntheticSource) else 100
        write_beton(src, good, out, write_mode=write_mode, max_resolution=max_resolution,
                    jpeg_quality=jpeg_quality, smart_threshold=SMART_THRESHOLD_BYTES, max_hw=max_hw,
                    num_workers=num_workers, chunksize=chunk, reporter=reporter,
                    before_rename=lambda seconds: _write_sidecar(out, src, good, skipped, seconds,
                                                                 write_mode, max_resolution, jpeg_quality,
                                                                 num_workers))
    seconds = time.perf_counter() - start
    labels = np.fromiter((src.label(int(i)) for i in good), dtype=np.int64, count=len(good))
    return ConversionSummary(
        source=source, split=src.split, out=out, sidecar=sidecar_path(out), num_written=len(good),
        num_skipped=len(skipped), skipped=skipped, class_names=list(src.class_names),
        class_counts=np.bincount(labels, minlength=len(src.class_names)).tolist(), write_mode=write_mode,
        max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=num_workers, seconds=seconds,
        images_per_s=len(good) / max(seconds, 1e-9), bytes_written=out.stat().st_size, extra=src.describe())


def _shard_layout(out: Path, split: str):
    from pipelines.wds import ShardLayout

    return ShardLayout.from_out(out, split)


def _convert_wds(src, good: np.ndarray, skipped: list[tuple[str, str]], layout, start: float, reporter: Reporter,
                 *, write_mode: str, max_resolution: int | None, jpeg_quality: int, workers: int,
                 shard_samples: int, seed: int) -> ConversionSummary:
    """The `--format wds` path: shards, index files and the sidecar (`pipelines.wds`)."""
    from pipelines.wds import write_shards, write_wds_sidecar

    reporter.phase("writing shards", len(good))
    shards = write_shards(src, good, layout, samples_per_shard=shard_samples, seed=seed, write_mode=write_mode,
                          max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                          smart_threshold=SMART_THRESHOLD_BYTES, num_workers=workers, progress=reporter.update)
    seconds = time.perf_counter() - start
    write = {"format": "wds", "mode": write_mode, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
             "smart_threshold_bytes": SMART_THRESHOLD_BYTES if write_mode == "smart" else None, "workers": workers,
             "samples_per_shard": shard_samples, "shuffle_seed": seed}
    data = write_wds_sidecar(layout, src, good, skipped, shards, seconds, write)
    return ConversionSummary(
        source=src.name, split=src.split, out=layout.folder, sidecar=layout.sidecar, num_written=len(good),
        num_skipped=len(skipped), skipped=skipped, class_names=list(src.class_names),
        class_counts=data["class_counts"], write_mode=write_mode, max_resolution=max_resolution,
        jpeg_quality=jpeg_quality, workers=workers, seconds=seconds, images_per_s=len(good) / max(seconds, 1e-9),
        bytes_written=sum((layout.folder / s["name"]).stat().st_size for s in shards),
        extra={**src.describe(), "format": "wds", "shards": len(shards)})


def _write_sidecar(out: Path, src, good: np.ndarray, skipped: list[tuple[str, str]], seconds: float,
                   write_mode: str, max_resolution: int | None, jpeg_quality: int, workers: int) -> None:
    """Write `out.json`; called by the writer just before the `.beton` is renamed into place."""
    if _STOPPED:  # a stop signal arrived and its exception got lost: the output must not appear
        raise _Stopped(_STOPPED[0])
    import ffcv

    data = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "beton": out.name,
        "fields": {"image": "RGBImageField", "label": "IntField"},
        **dataset_record(src, good, skipped, seconds),
        "write": {"mode": write_mode, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                  "smart_threshold_bytes": SMART_THRESHOLD_BYTES if write_mode == "smart" else None,
                  "workers": workers},
        "ffcv_version": getattr(ffcv, "__version__", "unknown"),
    }
    write_json_atomic(sidecar_path(out), data)


def print_summary(summary: ConversionSummary, file=None) -> None:
    """One screen: what was written, how fast, and the first skipped files."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    target = f"{summary.extra['shards']} wds shards" if summary.extra.get("format") == "wds" else ".beton"
    table = Table(title=f"{summary.source} {summary.split} → {target}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    counts = summary.class_counts
    rows = [
        ("output", str(summary.out)),
        ("images written", f"{summary.num_written:,}"),
        ("skipped", f"{summary.num_skipped:,}"),
        ("classes", f"{len(summary.class_names)} (per class {min(counts)}–{max(counts)})" if counts else "0"),
        ("first classes", ", ".join(summary.class_names[:5]) + (" …" if len(summary.class_names) > 5 else "")),
        ("write mode", summary.write_mode + (f", max side {summary.max_resolution}" if summary.max_resolution
                                             else "") + (f", JPEG q{summary.jpeg_quality}"
                                                         if summary.write_mode != "raw" else "")),
        ("workers", str(summary.workers)),
        ("size", f"{summary.bytes_written / 2**20:,.1f} MiB"),
        ("time", f"{summary.seconds:.2f} s ({summary.images_per_s:,.0f} images/s)"),
        ("sidecar", str(summary.sidecar)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    shown = summary.skipped[:10]
    for path, reason in shown:
        console.print(f"  skipped {path}: {reason}", highlight=False, markup=False, soft_wrap=True)
    if summary.num_skipped > len(shown):
        console.print(f"  … and {summary.num_skipped - len(shown)} more (all listed in the sidecar)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("--root", help="dataset folder as downloaded (not for synthetic)")
    parser.add_argument("--split", default="train", help="train or val (cifar100 also accepts test = val)")
    parser.add_argument("--out", required=True, type=Path, help="output FILE.beton (sidecar: FILE.beton.json); "
                        "with --format wds a folder or DIR/NAME-%%06d.tar (sidecar: DIR/NAME.json)")
    parser.add_argument("--format", default="beton", help="beton (FFCV) or wds (webdataset tar shards)")
    parser.add_argument("--shard-samples", type=int, default=10000, help="wds: samples per shard")
    parser.add_argument("--write-mode", default="raw", help="raw (pixel-exact), jpg or smart")
    parser.add_argument("--max-resolution", type=int, default=None, help="shrink images so the longer side ≤ N")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for jpg/smart (1-100)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 16)")
    parser.add_argument("--num-images", type=int, default=2000, help="synthetic: number of images")
    parser.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes")
    parser.add_argument("--resolution", type=int, default=32, help="synthetic: image side in pixels")
    parser.add_argument("--seed", type=int, default=0,
                        help="synthetic: seed (val uses its own stream); wds: the write-time shuffle")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as UserError, so they print as one line like every other error."""

    def error(self, message: str):
        raise UserError(message)


_STOPPED: list[int] = []  # signals received, in case the exception raised for one was swallowed on the way up


class _Stopped(Exception):
    """Raised in the converting process by SIGTERM / SIGINT, so every `finally` stops workers and removes files."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGTERM / SIGINT raise `_Stopped` here; forked workers, which inherit the handler, just die of the signal."""
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        _STOPPED.append(signum)
        raise _Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _OneLineParser
    args = parser.parse_args(argv)
    if args.source == "synthetic" and args.root:
        raise UserError("synthetic takes no --root; use --num-images, --num-classes, --resolution, --seed")
    _stop_on_signals()
    try:
        summary = convert(args.source, args.out, root=args.root, split=args.split, write_mode=args.write_mode,
                          max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality, workers=args.workers,
                          num_images=args.num_images, num_classes=args.num_classes, resolution=args.resolution,
                          seed=args.seed, progress=not args.no_progress and sys.stderr.isatty(),
                          out_format=args.format, shard_samples=args.shard_samples, overwrite=args.overwrite)
    except _Stopped as stop:
        err = UserError(f"{stop} received: conversion stopped, workers ended and the temporary file removed; "
                        f"{args.out} was not written (run the command again to convert)")
        err.exit_code = 128 + stop.signum
        raise err from None
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
