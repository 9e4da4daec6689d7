"""Loader throughput: two-view samples per second, end to end to normalised tensors on the device.

One "image" is one dataset sample delivered as both of its views (view1 and view2), so images/s here is
batches/s x batch size; views/s is twice that.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mixmask.batches import TwoViewBatch
from mixmask.benchmarking.protocol import measure
from pipelines.augment import AugSpec
from pipelines.loaders import build_two_view_loader


def _endless(loader) -> Iterator[TwoViewBatch]:
    """Batches across epoch boundaries (a new epoch re-enters the same loader, as training does)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_loader_bench(backend: str, *, source: str, path: str | None, resolution: int, batch_size: int, workers: int,
                     recipe: str | tuple[AugSpec, AugSpec], device: torch.device | str, warmup_batches: int = 5,
                     batches: int = 20, repeats: int = 5, seed: int = 0, synthetic: dict | None = None,
                     storage: str | None = None, shuffle_buffer: int = 4096, order: str = "random",
                     os_cache: bool = True, order_window: int = 8192) -> list[dict]:
    """Time `repeats` runs of `batches` two-view batches after `warmup_batches`; one protocol row.

    `storage` (beton, folder, arrays, wds) goes into the row's name when several forms of the data are compared;
    `order` (ffcv: random or quasi_random, with `os_cache` and `order_window`) when it is not the default.
    """
    device = torch.device(device)
    loader = build_two_view_loader(backend, source=source, path=path, resolution=resolution,
                                   batch_size_per_rank=batch_size, recipe=recipe, rank=0, world_size=1, seed=seed,
                                   workers=workers, device=device, synthetic=synthetic, shuffle_buffer=shuffle_buffer,
                                   order=order, os_cache=os_cache, order_window=order_window)
    stream = _endless(loader)

    def run() -> None:
        for _ in range(batches):
            batch = next(stream)
        if device.type == "cuda":
            batch.view2.sum().item()  # sync point: the last batch's device work is inside the timed region

    for _ in range(warmup_batches):
        next(stream)
    label = f"{backend}+{storage}" if storage else backend
    if backend == "ffcv" and (order != "random" or not os_cache):
        label += f"+{order}{'' if os_cache else '+no_os_cache'}"
    m = measure(f"loader/{label}/{resolution}px", run, items_per_call=batches * batch_size, warmup=0,
                repeats=repeats, device="cpu")  # wall clock: the loader's CPU work is what is measured
    stream.close()  # ends the epoch in flight, so the backend's threads stop before the next backend starts
    recipe_name = recipe if isinstance(recipe, str) else "custom"
    extra = {"storage": storage} if storage else {}
    if backend == "ffcv":
        extra.update(order=order, os_cache=os_cache)
    return [m.row(backend=backend, source=source, resolution=resolution, batch_size=batch_size, workers=workers,
                  recipe=recipe_name, device=str(device), views_per_s=2 * m.images_per_s, **extra)]
