"""The reference reader of webdataset shards: the `webdataset` package (tar streaming, grouping members into
samples, buffer shuffle, decoding) feeding the torchvision backend's per-image PIL recipe in DataLoader workers.

It reads the same share of each epoch as DALI's reader (`pipelines.loaders.wds_shards`: per-epoch shard order,
rank r takes positions [N r / W, N (r + 1) / W) of the complete samples), so the two can be compared sample for
sample. Within a rank, the share is cut into runs of whole batches, one per DataLoader worker; each worker streams
the shards its run touches, keeps the samples of its run, shuffles them in a buffer seeded by (seed, epoch, rank,
worker) and pads with its last sample to its batch count, so every rank runs the same number of steps. Views are
drawn from a torch stream seeded by (seed, epoch, row), as in the torchvision backend. A sample whose image fails
to decode is skipped (the padding fills its slot) and counted in the loader's `skipped_samples`.

Resume without replay: the buffer's choices depend only on its seed and on how many samples entered it, never on
their bytes, so a resumed worker passes the samples the trainer already had straight from the shuffle buffer to
the bin, undecoded, and decodes from its resume point on: the remaining batches are those of the uninterrupted
epoch, pixels included. A tar whose samples all left the buffer before that point is not even opened (key-only
stand-ins take its samples' places in the buffer). Where each worker stood (samples out of its buffer, items
handed out) is recorded with the batches the trainer consumed (`position_state()`), so a decode failure before the
resume point is accounted for; without a record it is derived from the batch (exact unless an image failed to
decode).
`decoded_samples` counts the samples handed to the decoder.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from mixmask.batches import TwoViewBatch
from pipelines.augment import AugSpec
from pipelines.loaders.sharding import check_rank, samples_per_rank, steps_per_epoch
from pipelines.loaders.torchvision_backend import _sample_seed, _to_device, eval_ops, pil_transform
from pipelines.loaders.wds_shards import ShardSet, epoch_shard_order, rank_span

IMAGE_KEYS = ("jpg", "png", "jpeg")
READER_TAG = "wds-reference"  # marks this reader's positions in `position_state()`


def worker_runs(num_slots: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Slots [start, stop) of each worker: whole batches, the last run taking the remainder."""
    per_worker = math.ceil(math.ceil(num_slots / batch_size) / num_workers) * batch_size
    return [(min(k * per_worker, num_slots), min((k + 1) * per_worker, num_slots)) for k in range(num_workers)]


def batch_workers(runs: list[tuple[int, int]], batch_size: int) -> list[int]:
    """The worker of each batch in the order a DataLoader hands them out: round robin over the workers that still
    have batches (an iterable dataset's worker collates its own, the last one possibly partial)."""
    left = [-(-(stop - start) // batch_size) for start, stop in runs]
    order = []
    while any(left):
        for worker, count in enumerate(left):
            if count:
                order.append(worker)
                left[worker] -= 1
    return order


class _ShardStream(IterableDataset):
    """This rank's (views..., label, row) items of one epoch, streamed from the shards by the webdataset package."""

    def __init__(self, shards: ShardSet, transforms: list, *, rank: int, world_size: int, seed: int,
                 shuffle: bool, shuffle_buffer: int, batch_size: int, num_slots: int) -> None:
        self.shards, self.transforms, self.rank, self.world_size = shards, transforms, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.batch_size, self.num_slots = batch_size, num_slots
        self.epoch = 0
        self.skipped = 0
        self.decoded = 0
        self.resume: list[tuple[int, int]] | None = None  # per worker: (samples out of its buffer, items handed)

    def _skip(self, err: Exception) -> bool:
        self.skipped += 1  # a sample whose image does not decode: dropped, its slot padded
        return True

    @staticmethod
    def _go_on(err: Exception) -> bool:
        return True  # a damaged tar: the samples it loses are counted once the stream ends

    def _run(self, worker: int, num_workers: int) -> tuple[list[tuple[str, list[int]]], int]:
        """([(shard url, its rows in the run, stored order)], slots to fill) of one worker in this epoch."""
        order = epoch_shard_order(len(self.shards.urls), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        counts = self.shards.counts()[order]
        lo, hi = rank_span(int(counts.sum()), self.rank, self.world_size)
        runs = worker_runs(self.num_slots, self.batch_size, num_workers)
        start, stop = runs[worker]
        last = max(k for k, (a, b) in enumerate(runs) if b > a) if self.num_slots else -1
        first, end = lo + min(start, hi - lo), lo + (hi - lo if worker == last else min(stop, hi - lo))
        if first >= end:  # a run made only of padding: it repeats the share's last sample
            first, end = hi - 1, hi
        starts = np.concatenate([[0], np.cumsum(counts)])
        parts = []
        for pos, k in enumerate(order):
            a, b = max(first, starts[pos]), min(end, starts[pos + 1])
            if a < b:
                parts.append((self.shards.urls[k], self.shards.rows[k][a - starts[pos]:b - starts[pos]].tolist()))
        return parts, stop - start

    def _shuffled(self, stream: Iterator, worker: int) -> Iterator:
        """`stream` through this worker's shuffle buffer, seeded by (seed, epoch, rank, worker)."""
        import webdataset as wds

        if not (self.shuffle and self.shuffle_buffer > 1):
            return stream
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker])
                                .generate_state(1)[0]))
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)

    def _samples(self, parts: list[tuple[str, list[int]]], seen: set[int], worker: int, skip: int) -> Iterator[dict]:
        """The run's raw samples (undecoded members) in the order its shuffle buffer lets them out.

        Resumed after `skip` samples, a shard whose samples all left the buffer before the last of those is not
        opened: stand-ins holding only the key enter the buffer in its place (the buffer's choices depend on
        counts alone), and are passed over undecoded with the rest of the trained samples.
        """
        import webdataset as wds

        in_order = [r for _, part in parts for r in part]
        rows = set(in_order)
        # the last sample passed may pad the run (a skip derived from the batch may count padding): read for real
        gone = set(itertools.islice(self._shuffled(iter(in_order), worker), max(0, min(skip, len(in_order)) - 1)))

        def wanted(sample: dict) -> bool:
            keep = sample["__key__"].isdigit() and int(sample["__key__"]) in rows
            if keep:
                seen.add(int(sample["__key__"]))
            return keep

        def source() -> Iterator[dict]:
            for url, part in parts:
                if gone.issuperset(part):
                    seen.update(part)
                    yield from ({"__key__": str(r)} for r in part)
                else:
                    yield from wds.DataPipeline(wds.SimpleShardList([url]),
                                                wds.tarfile_to_samples(handler=self._go_on), wds.select(wanted))

        return self._shuffled(source(), worker)

    def _item(self, decode, sample: dict, worker: int, position: int) -> tuple | None:
        """(views..., label, row, worker, position) of a raw sample, or None when its image does not decode."""
        self.decoded += 1
        try:
            decoded = decode(sample)
            image = next(decoded[k] for k in IMAGE_KEYS if k in decoded)
            label, row = int(decoded["cls"]), int(sample["__key__"])
        except Exception:
            self.skipped += 1  # a sample whose image does not decode: dropped, its slot padded
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, row))
            views = [t(image) for t in self.transforms]
        return (*views, label, row, worker, position)

    def __iter__(self) -> Iterator[tuple]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        parts, slots = self._run(worker, num_workers)
        self.skipped = self.decoded = 0  # per epoch: the loader adds each epoch's counts up
        skip, emitted = self.resume[worker] if self.resume else (0, 0)
        if slots == emitted:
            return
        decode = wds.autodecode.Decoder([wds.autodecode.imagehandler("pilrgb")])
        seen: set[int] = set()
        position, item, passed = 0, None, None
        for sample in self._samples(parts, seen, worker, skip):
            if emitted == slots:
                break  # drop_last: the rest of this run does not fit a whole batch of the rank
            position += 1
            if position <= skip:
                passed = sample  # handed out before the resume point: never decoded
                continue
            item = self._item(decode, sample, worker, position)
            if item is not None:
                emitted += 1
                yield (*item, self.skipped, self.decoded)  # the counts travel to the main process
        else:
            self.skipped += sum(len(part) for _, part in parts) - len(seen)  # wanted samples no tar delivered
        if item is None and passed is not None and emitted < slots:
            # resumed inside the padding: it repeats the last item handed out, the last sample passed
            item = self._item(decode, passed, worker, skip)
        if item is None:
            raise RuntimeError(f"rank {self.rank} worker {worker} read no sample from {[u for u, _ in parts]}")
        for _ in range(slots - emitted):  # padding: every rank runs the same number of steps
            yield (*item, self.skipped, self.decoded)


class _ReferenceBase:
    def __init__(self, shards: ShardSet, transforms: list, *, batch_size_per_rank: int, rank: int, world_size: int,
                 seed: int, workers: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 drop_last: bool, batches_ahead: int, shuffle: bool, shuffle_buffer: int) -> None:
        check_rank(rank, world_size)
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.steps = steps_per_epoch(len(shards), world_size, batch_size_per_rank, drop_last)
        self.count = samples_per_rank(len(shards), world_size)
        slots = self.steps * batch_size_per_rank if drop_last else self.count
        self.stream = _ShardStream(shards, transforms, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                                   shuffle_buffer=shuffle_buffer, batch_size=batch_size_per_rank, num_slots=slots)
        # Not persistent: each epoch's workers get the dataset with that epoch set.
        self.loader = DataLoader(self.stream, batch_size=batch_size_per_rank, num_workers=workers,
                                 pin_memory=self.device.type == "cuda",
                                 prefetch_factor=max(1, batches_ahead) if workers > 0 else None)
        self.num_missing = shards.num_missing
        self.skipped_samples = 0  # images that did not decode, over the epochs read so far
        self.decoded_samples = 0  # samples handed to the decoder, over the epochs read so far
        self.batch_size, self.num_workers = batch_size_per_rank, max(1, workers)
        self.start_batch, self._position = 0, None

    def _batches(self) -> Iterator[tuple]:
        """The DataLoader's batches without the bookkeeping fields; tallies each worker's counts and position."""
        skipped: dict[int, int] = {}
        decoded: dict[int, int] = {}
        resume = self.stream.resume or [(0, 0)] * self.num_workers
        position, items = [p for p, _ in resume], [n for _, n in resume]
        handed = self.start_batch
        # A DataLoader starts its round robin at worker 0: a resumed epoch's batches come back in the order of the
        # uninterrupted one by holding at most one batch per worker until its turn.
        runs = worker_runs(self.stream.num_slots, self.batch_size, self.num_workers)
        held: list[deque] = [deque() for _ in range(self.num_workers)]
        batches = iter(self.loader)
        try:
            for turn in batch_workers(runs, self.batch_size)[self.start_batch:]:
                while not held[turn]:
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"worker {turn} of rank {self.stream.rank} ended before its batches")
                    held[int(batch[-4][-1])].append(batch)
                *fields, worker, pos, skipped_now, decoded_now = held[turn].popleft()
                skipped[turn], decoded[turn] = int(skipped_now.max()), int(decoded_now.max())
                position[turn], items[turn] = int(pos.max()), items[turn] + len(pos)
                handed += 1  # handed out: what the trainer consumed when it leaves the epoch here
                yield fields
        finally:
            self.skipped_samples += sum(skipped.values())
            self.decoded_samples += sum(decoded.values())
            self._position = {"epoch": self.stream.epoch, "batch": handed, "reader": READER_TAG,
                              "position": position, "items": items}

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on, decoding nothing before it.

        `state` is what `position_state()` returned when an epoch was left at that batch (each worker's place in
        its buffer's output); without it (another reader's, or another worker count's) the places are derived
        from the batch, which is exact unless an image before it failed to decode.
        """
        if not 0 <= start_batch <= self.steps:
            raise ValueError(f"an epoch of {self.steps} batches cannot start at batch {start_batch}")
        if state is not None and (state.get("reader") != READER_TAG or len(state["items"]) != self.num_workers):
            state = None
        if state is not None and (state["epoch"], state["batch"]) != (epoch, start_batch):
            raise ValueError(f"the reader position is for epoch {state['epoch']} batch {state['batch']}, "
                             f"not epoch {epoch} batch {start_batch}")
        self.stream.epoch, self.start_batch = epoch, start_batch
        if start_batch == 0:
            self.stream.resume = None
        elif state is not None:
            self.stream.resume = list(zip(state["position"], state["items"]))
        else:
            runs = worker_runs(self.stream.num_slots, self.batch_size, self.num_workers)
            done = [0] * self.num_workers
            for worker in batch_workers(runs, self.batch_size)[:start_batch]:
                done[worker] += 1
            items = [min(n * self.batch_size, stop - start) for n, (start, stop) in zip(done, runs)]
            self.stream.resume = list(zip(items, items))

    def position_state(self) -> dict | None:
        """Where the last iteration stopped, for `set_epoch(epoch, batch, state)`: each worker's place."""
        return self._position


class ReferenceShardTwoViewLoader(_ReferenceBase):
    """Two views per sample of webdataset shards with the official PIL recipe, as `TwoViewBatch` on `device`."""

    def __init__(self, shards: ShardSet, *, resolution: int, views: tuple[AugSpec, AugSpec], shuffle_buffer: int,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True, drop_last: bool = True,
                 batches_ahead: int = 2, **kwargs) -> None:
        super().__init__(shards, [pil_transform(v, resolution) for v in views], dtype=dtype,
                         channels_last=channels_last, drop_last=drop_last, batches_ahead=batches_ahead,
                         shuffle=True, shuffle_buffer=shuffle_buffer, **kwargs)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for view1, view2, labels, rows in self._batches():
            yield TwoViewBatch(_to_device(view1, self.device, self.dtype, self.channels_last),
                               _to_device(view2, self.device, self.dtype, self.channels_last),
                               labels.to(self.device, non_blocking=True), rows.to(self.device, non_blocking=True))


class ReferenceShardEvalLoader(_ReferenceBase):
    """Single-view (images, labels) of webdataset shards: as the torchvision eval loader, no drop_last."""

    def __init__(self, shards: ShardSet, *, resolution: int, train_aug: bool, mean: tuple[float, float, float],
                 std: tuple[float, float, float], small: bool, shuffle_buffer: int, **kwargs) -> None:
        ops = eval_ops(resolution, train_aug=train_aug, small=small)  # as the torchvision eval loader
        transform = T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])
        super().__init__(shards, [transform], drop_last=False, shuffle=train_aug, shuffle_buffer=shuffle_buffer,
                         **kwargs)
        self.num_samples = len(shards)  # the split's size: the gathered epoch beyond it is padding
        self.rank_layout = "contiguous"  # rank r reads [N·r // W, N·(r+1) // W), padded at its end

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self._batches():
            yield _to_device(images, self.device, self.dtype, self.channels_last), labels.to(self.device)
