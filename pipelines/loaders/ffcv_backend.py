"""FFCV backend: the converter's `.beton` → decode once, two random resized crops + flips (FFCV threads) → uint8
to the device → batched photometric ops there.

Design choices, each checked against ffcv 1.0.2's sources:
- Two views from one stored field. `pipelines={'image': ..., 'image2': PipelineSpec('image', decoder=...)}` works
  in 1.0.2, but each pipeline decodes the JPEG again; `TwoViewCropDecoder` decodes once and writes both crops,
  (B, 2, H, W, 3), which halves the decode cost that dominates at 224 px.
- Order and sharding. ffcv's `distributed=True` builds a `DistributedSampler` that reads rank and world size from
  `torch.distributed` (it needs a process group) and keeps its own epoch counter. `ShardedOrder` is a
  `TraversalOrder` fed the global rank, world size and the epoch we set, so order and crops are reproducible
  for resume, and `world_size=1` needs no process group. (ffcv's QUASI_RANDOM refuses distributed use; not used.)
- Reproducible crops. ffcv's crop decoders draw from numba's per-thread generator, which no seed reaches. The
  decoder here reseeds it per sample from (seed, the batch's first and last index, the sample's index): the same
  order gives the same crops whatever the thread count, and the epoch's permutation changes them every epoch.
- One `Loader` for the whole run (a new Loader per epoch leaks threads and memory); `set_epoch` only retargets
  the order and reseeds the device-side generators.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    get_random_crop,
)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from mixmask.batches import TwoViewBatch
from mixmask.errors import UserError
from pipelines.augment import EVAL_CROP_RATIO, AugSpec
from pipelines.loaders.order import ORDERS, quasi_random_order, sample_pages, start_at_batch
from pipelines.loaders.sharding import batch_seed, check_rank, epoch_order
from pipelines.photometric import Photometric, to_float_nchw


def _stop(epoch_iter) -> None:
    """Stop ffcv's epoch thread and wait for it before releasing its memory.

    ffcv's `close()` only signals the thread and frees the batch memory at once; a thread still inside its
    numba pipeline then writes freed memory, or is torn down at interpreter exit ("terminate called without an
    active exception"). The thread checks the signal at least every 0.5 s while it submits batches, but at the
    epoch's end it puts its end marker with no timeout: on a full queue (an epoch left on one of its last batches)
    it would block for ever, so the queue is drained while waiting.
    """
    epoch_iter.terminate_event.set()
    deadline = time.monotonic() + 60
    while epoch_iter.is_alive() and time.monotonic() < deadline:
        try:
            epoch_iter.output_queue.get_nowait()
        except queue.Empty:
            pass
        epoch_iter.join(timeout=0.05)
    epoch_iter.close()


class ShardedOrder(TraversalOrder):
    """This rank's share of a (seed, epoch) order, epoch and first batch set from outside.

    `random`: a permutation of the samples (`pipelines.loaders.sharding`); `quasi_random`: a share of the file's
    pages in random order, samples shuffled within `window` (`pipelines.loaders.order`), for files read with
    `os_cache=False` that do not fit in RAM. Either way an epoch started at batch k yields the uninterrupted
    epoch's batches from k on, and ffcv's process cache schedules only the pages those need.
    """

    def __init__(self, *, rank: int, world_size: int, seed: int, shuffle: bool, kind: str = "random",
                 window: int = 8192, batch_size: int = 1, drop_last: bool = False) -> None:
        # Built before the Loader exists; ffcv calls `order(loader)`, which binds it (see __call__).
        if kind not in ORDERS:
            raise UserError(f"unknown ffcv order {kind!r}; valid: {', '.join(ORDERS)}")
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.kind, self.window, self.batch_size, self.drop_last = kind, window, batch_size, drop_last
        self.epoch, self.start_batch = 0, 0
        self.distributed = world_size > 1
        self.sampler = None

    def __call__(self, loader: Loader) -> ShardedOrder:
        self.loader = loader
        self.indices = loader.indices
        if self.kind == "quasi_random":
            reader = loader.reader
            table = reader.alloc_table
            pages = sample_pages(reader.num_samples, table["sample_id"], table["ptr"], int(reader.page_size))
            self.pages = pages[self.indices.astype(np.int64)]
        return self

    def full_order(self, epoch: int) -> np.ndarray:
        """Every sample index of this rank's epoch, from batch 0."""
        if self.kind == "quasi_random" and self.shuffle:
            positions = quasi_random_order(self.pages, rank=self.rank, world_size=self.world_size, seed=self.seed,
                                           epoch=epoch, window=self.window)
        else:
            positions = epoch_order(len(self.indices), rank=self.rank, world_size=self.world_size, seed=self.seed,
                                    epoch=epoch, shuffle=self.shuffle)
        return self.indices[positions]

    def sample_order(self, epoch: int) -> np.ndarray:  # ffcv's own counter is ignored on purpose
        order = self.full_order(self.epoch)
        steps = len(order) // self.batch_size if self.drop_last else -(-len(order) // self.batch_size)
        return start_at_batch(order, self.start_batch, self.batch_size, steps)


class TwoViewCropDecoder(Operation):
    """Decode an `RGBImageField` once and write two independent random resized crops, each maybe flipped.

    Shape:
        output: (B, 2, size, size, 3) uint8
    """

    def __init__(self, size: int, view1: AugSpec, view2: AugSpec, seed: int) -> None:
        super().__init__()
        self.size = size
        self.scales = np.array([view1.crop_scale, view2.crop_scale], dtype=np.float64)
        self.ratios = np.array([view1.crop_ratio, view2.crop_ratio], dtype=np.float64)
        self.flip_p = np.array([view1.flip_p, view2.flip_p], dtype=np.float64)
        self.seed = int(seed) & 0x7FFFFFFF

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        shape = (2, self.size, self.size, 3)
        uint8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=uint8),
            (AllocationQuery(shape, uint8), AllocationQuery((max_height * max_width * np.uint64(3),), uint8)),
        )

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scales, ratios, flip_p, seed = self.scales, self.ratios, self.flip_p, self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            count = len(batch_indices)
            # The batch's first and last indices change with every epoch's permutation: crops differ per epoch
            # and are a pure function of the order.
            batch_key = np.int64(batch_indices[0]) * np.int64(1000003) + np.int64(batch_indices[count - 1])
            for dst_ix in my_range(count):
                source_ix = batch_indices[dst_ix]
                key = (np.int64(seed) * np.int64(0x9E3779B1) + batch_key) * np.int64(0x85EBCA6B) + np.int64(source_ix)
                key = key ^ (key >> np.int64(29))
                # numba supports only the legacy API; this seeds the calling thread's generator.
                np.random.seed(np.int64(key & np.int64(0x7FFFFFFF)))  # noqa: NPY002
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                for view in range(2):
                    i, j, h, w = get_crop_c(height, width, scales[view], ratios[view])
                    out = destination[dst_ix, view]
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                    if np.random.random() < flip_p[view]:  # noqa: NPY002
                        side = out.shape[1]
                        for row in range(out.shape[0]):
                            for col in range(side // 2):
                                for ch in range(3):
                                    tmp = out[row, col, ch]
                                    out[row, col, ch] = out[row, side - 1 - col, ch]
                                    out[row, side - 1 - col, ch] = tmp
            return destination[:count]

        decode.is_parallel = True
        return decode


class IndexDecoder(IntDecoder):
    """Emit each sample's row in the `.beton` (the TwoViewBatch `index`) from any int field."""

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix, sample_id in enumerate(indices):
                destination[ix] = sample_id
            return destination[: len(indices)]

        return decoder


def _check_path(path: str | None) -> str:
    """`path` once it reads as a whole `.beton` (header, fields, metadata, allocation table); else one UserError."""
    if path is None or not Path(path).is_file():
        raise UserError(f"the ffcv backend needs an existing .beton file (data.path), got {path!r}")
    from ffcv.reader import Reader

    size = Path(path).stat().st_size
    try:
        reader = Reader(str(path))
        table = reader.alloc_table
        problem = ("it holds no samples" if reader.num_samples == 0
                   else "it is truncated" if len(reader.metadata) < reader.num_samples or len(table) == 0
                   or int((table["ptr"] + table["size"]).max()) > size
                   else None if {"image", "label"} <= set(reader.field_names)
                   else f"its fields are {reader.field_names}, not image and label")
    except Exception as err:  # ffcv's reader fails in many ways on empty, cut or foreign files
        problem = "it is empty" if size == 0 else f"it is truncated or not a .beton ({type(err).__name__})"
    if problem:
        raise UserError(f"{path} cannot be read as a .beton: {problem}; write it again with python -m "
                        "pipelines.convert ... --out FILE.beton --overwrite")
    return str(path)


def _label_pipelines(device: torch.device) -> dict:
    return {
        "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)],
        "index": PipelineSpec("label", decoder=IndexDecoder(),
                              transforms=[ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]),
    }


class FFCVTwoViewLoader:
    """Two augmented views per image from a `.beton`, as `TwoViewBatch` on `device` (see module docstring)."""

    def __init__(self, path: str | None, *, resolution: int, batch_size_per_rank: int, views: tuple[AugSpec, AugSpec],
                 rank: int, world_size: int, seed: int, workers: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True, drop_last: bool = True,
                 os_cache: bool = True, batches_ahead: int = 2, order: str = "random",
                 order_window: int = 8192) -> None:
        check_rank(rank, world_size)
        self.device, self.seed, self.rank = torch.device(device), seed, rank
        self.order = ShardedOrder(rank=rank, world_size=world_size, seed=seed, shuffle=True, kind=order,
                                  window=order_window, batch_size=batch_size_per_rank, drop_last=drop_last)
        self.views = [Photometric(v, device=self.device, dtype=dtype, channels_last=channels_last) for v in views]
        decoder = TwoViewCropDecoder(resolution, views[0], views[1], seed=seed)
        self.loader = Loader(
            _check_path(path), batch_size=batch_size_per_rank, num_workers=max(1, workers), order=self.order,
            os_cache=os_cache, drop_last=drop_last, seed=seed, batches_ahead=batches_ahead,
            # An explicit decoder: in a plain list ffcv would take ours for a transform after its default decoder.
            pipelines={"image": PipelineSpec("image", decoder=decoder,
                                             transforms=[ToTensor(), ToDevice(self.device, non_blocking=True)]),
                       **_label_pipelines(self.device)},
        )
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on (a resume reads nothing before it).

        `state` is unused: every draw is keyed by (seed, epoch, batch), so (epoch, start_batch) is the position.
        """
        self.epoch = epoch
        self.order.epoch, self.order.start_batch = epoch, start_batch

    def position_state(self) -> None:
        return None

    def __iter__(self) -> Iterator[TwoViewBatch]:
        epoch_iter = iter(self.loader)  # iterating again repeats the epoch from the same batch, draws included
        try:
            for batch, (images, labels, index) in enumerate(epoch_iter, start=self.order.start_batch):
                # The photometric draws of a batch depend on its position only, so a resumed epoch matches.
                for stream, view in enumerate(self.views):
                    view.reseed(batch_seed(self.seed, self.epoch, self.rank, stream, batch=batch))
                # images: (B, 2, H, W, 3) uint8 on the device; the views split here, HWC → NCHW in Photometric.
                yield TwoViewBatch(self.views[0](images[:, 0]), self.views[1](images[:, 1]),
                                   labels.long().clone(), index.long().clone())
        finally:
            _stop(epoch_iter)  # an abandoned epoch (max_steps, signal, errors) must not leave ffcv's thread running


class FFCVEvalLoader:
    """Single-view images + labels for kNN banks and linear/semi-supervised evaluation; no drop_last."""

    def __init__(self, path: str | None, *, resolution: int, batch_size_per_rank: int, train_aug: bool, rank: int,
                 world_size: int, workers: int, device: torch.device, seed: int = 0,
                 mean: tuple[float, float, float], std: tuple[float, float, float], dtype: torch.dtype,
                 channels_last: bool, os_cache: bool = True, batches_ahead: int = 2, small: bool) -> None:
        check_rank(rank, world_size)
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.order = ShardedOrder(rank=rank, world_size=world_size, seed=seed, shuffle=train_aug,
                                  batch_size=batch_size_per_rank)
        size = (resolution, resolution)
        if train_aug:
            ops = [RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip()]
        else:
            ops = [CenterCropRGBImageDecoder(size, ratio=1.0 if small else EVAL_CROP_RATIO)]
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.loader = Loader(
            _check_path(path), batch_size=batch_size_per_rank, num_workers=max(1, workers), order=self.order,
            os_cache=os_cache, drop_last=False, seed=seed, batches_ahead=batches_ahead,
            pipelines={"image": [*ops, ToTensor(), ToDevice(self.device, non_blocking=True)],
                       **_label_pipelines(self.device)},
        )
        self.num_samples = len(self.loader.indices)  # the split's size: the gathered epoch beyond it is padding
        self.rank_layout = "strided"  # rank r reads positions r, r + W, ... (`pipelines.loaders.sharding`)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.order.epoch, self.order.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch_iter = iter(self.loader)
        try:
            for images, labels, _ in epoch_iter:
                x = ((to_float_nchw(images) - self.mean) / self.std).to(self.dtype)
                x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
                yield x, labels.long().clone()
        finally:
            _stop(epoch_iter)
