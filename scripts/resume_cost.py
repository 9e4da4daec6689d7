"""Resume cost: what a run resumed at the last batch of an epoch decodes, and its time to the first batch, replaying
the epoch (what train.py did before) vs starting it at that batch (`set_epoch(epoch, start_batch=k, state)`), on
FFCV (.beton), DALI's webdataset reader and the reference reader (`webdataset` package) over the same images.

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python scripts/resume_cost.py [--num-images 4096]

Samples decoded: FFCV and DALI decode whole batches (batches run x batch size; DALI's restore reads the raw
samples still in its shuffle buffer, without decoding them); the reference reader counts the samples its workers
hand to the decoder (`decoded_samples`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipelines.convert import convert
from pipelines.loaders import build_two_view_loader

BATCH, RES, WORKERS, EPOCH = 64, 64, 2, 1


def _first_batch(loader, start_batch: int, state) -> int:
    """Start the epoch at `start_batch` (`state` "replay": read it from batch 0); samples decoded to that batch."""
    before = getattr(loader, "decoded_samples", None)  # the shard readers count; FFCV decodes whole batches
    if state == "replay":  # the k trained batches are decoded again, then the one wanted
        loader.set_epoch(EPOCH)
        wanted = start_batch + 1
    else:
        loader.set_epoch(EPOCH, start_batch=start_batch, state=state)
        wanted = 1
    batches = iter(loader)
    for _ in range(wanted):
        next(batches)
    batches.close()
    return wanted * BATCH if before is None else loader.decoded_samples - before


def _left_at(loader, batch: int) -> dict | None:
    """`position_state()` after an epoch left at `batch`, as train.py's checkpoint records it."""
    loader.set_epoch(EPOCH)
    batches = iter(loader)
    for _ in range(batch):
        next(batches)
    batches.close()
    return loader.position_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=4096)
    parser.add_argument("--readers", default="ffcv,dali,torchvision", help="comma-separated subset to measure")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    convert("synthetic", root / "synthetic.beton", num_images=args.num_images, resolution=RES, workers=2)
    convert("synthetic", root / "shards", num_images=args.num_images, resolution=RES, out_format="wds",
            shard_samples=512, workers=2)
    readers = (("ffcv", ".beton", root / "synthetic.beton"), ("dali", "shards", root / "shards"),
               ("torchvision", "shards", root / "shards"))
    print(f"{args.num_images // BATCH} steps/epoch, resume at the last batch (batch {BATCH}, {RES} px, mocov2, "
          f"{WORKERS} workers, shuffle buffer 4096; time median of 3 after a warm-up)")
    for backend, storage, path in (r for r in readers if r[0] in args.readers.split(",")):
        loader = functools.partial(build_two_view_loader, backend, source="synthetic", path=str(path),
                                   resolution=RES, batch_size_per_rank=BATCH, recipe="mocov2", rank=0, world_size=1,
                                   seed=0, workers=WORKERS, device=torch.device("cpu"))
        probe = loader()
        k = len(probe) - 1
        state = _left_at(probe, k)
        for name, how in (("replay", "replay"), ("start_batch", state)):
            reader = loader()  # a fresh loader, as in the process that resumes
            _first_batch(reader, k, how)  # warm-up
            times, decoded = [], 0
            for _ in range(3):
                t0 = time.perf_counter()
                decoded = _first_batch(reader, k, how)
                times.append(time.perf_counter() - t0)
            ms = [1000 * t for t in times]
            print(f"{backend:11s} {storage:7s} {name:12s} samples decoded {decoded:5d}   time to the first batch "
                  f"{statistics.median(ms):6.0f} ms [{min(ms):.0f}-{max(ms):.0f}]")


if __name__ == "__main__":
    main()
