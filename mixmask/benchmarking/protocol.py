"""The timing protocol every benchmark uses: warm-up, repeats, median with min and max.

On CUDA each repeat is timed with CUDA events around the work, so asynchronous launches are counted where they
run; on CPU with `time.perf_counter`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Measurement:
    """Seconds per call over the repeats, and the throughput derived from the median."""

    name: str
    items_per_call: int
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def images_per_s(self) -> float:
        return self.items_per_call / self.median_s

    @property
    def spread(self) -> tuple[float, float]:
        """Throughput range (slowest repeat, fastest repeat) in images/s."""
        return (self.items_per_call / self.max_s, self.items_per_call / self.min_s)

    def row(self, **extra) -> dict:
        """A JSON row: `name`, `images_per_s` (median) and its spread, plus the raw timings and any extra fields."""
        lo, hi = self.spread
        return {
            "name": self.name,
            "images_per_s": self.images_per_s,
            "images_per_s_min": lo,
            "images_per_s_max": hi,
            "ms_per_call": self.median_s * 1e3,
            "ms_per_call_min": self.min_s * 1e3,
            "ms_per_call_max": self.max_s * 1e3,
            **{k: v for k, v in asdict(self).items() if k not in ("name",)},
            **extra,
        }


def measure(
    name: str,
    fn: Callable[[], object],
    *,
    items_per_call: int,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str = "cpu",
    inner: int = 1,
) -> Measurement:
    """Time `fn` after `warmup` calls; each of `repeats` samples runs it `inner` times (for sub-millisecond work)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()  # timing sync point, outside the measured region
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return Measurement(
        name=name,
        items_per_call=items_per_call,
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        repeats=repeats,
    )
