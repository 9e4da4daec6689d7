"""Resume cost on the FFCV backend: time to the first batch when a run resumes at the last batch of an epoch,
replaying the epoch (what train.py did before) vs starting it at that batch (`set_epoch(epoch, start_batch=k)`).

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python scripts/resume_cost.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipelines.convert import convert
from pipelines.loaders import build_two_view_loader


def main() -> None:
    out = Path(tempfile.mkdtemp()) / "synthetic.beton"
    convert("synthetic", out, num_images=4096, resolution=64, workers=2)
    loader = build_two_view_loader("ffcv", source="synthetic", path=str(out), resolution=64, batch_size_per_rank=64,
                                   recipe="mocov2", rank=0, world_size=1, seed=0, workers=2,
                                   device=torch.device("cpu"))
    k = len(loader) - 1

    def replay() -> int:
        loader.set_epoch(1)
        batches = iter(loader)
        for _ in range(k + 1):  # the k trained batches are decoded again, then the one wanted
            next(batches)
        batches.close()
        return k + 1

    def start_at_batch() -> int:
        loader.set_epoch(1, start_batch=k)
        batches = iter(loader)
        next(batches)
        batches.close()
        return 1

    print(f"{len(loader)} steps/epoch, resume at batch {k} (batch 64, 64 px, mocov2, ffcv, 2 workers; median of 3)")
    for name, resume in (("replay", replay), ("start_batch", start_at_batch)):
        resume()  # warm-up
        times, decoded = [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            decoded = resume()
            times.append(time.perf_counter() - t0)
        ms = [1000 * t for t in times]
        print(f"{name:12s} batches decoded {decoded:3d}   time to the first batch {statistics.median(ms):.0f} ms "
              f"[{min(ms):.0f}-{max(ms):.0f}]")


if __name__ == "__main__":
    main()
