"""DALI backend: encoded JPEG files (or CIFAR / synthetic arrays) → one decode → two random resized crops, colour
ops, flips and normalisation inside DALI → torch tensors on the device.

- Input. The split's file list (labels in the converter's class order, from `pipelines.sources`) is fed through
  `fn.external_source` in the order `pipelines.loaders.sharding` gives this *global* rank, so the permutation,
  the shard and the step count match the other backends exactly. This sidesteps `fn.readers.file`'s sharding
  (which NVIDIA's examples key on the local rank) and its epoch bookkeeping, where DROP + reset makes the reader
  spill into, or skip, the next epoch's samples.
- Unreadable files. DALI's decoder fails a whole batch without naming the file, so each file is checked before it
  is fed (header parse, JPEG end marker; `pipelines.loaders.bad_files`): a bad one is replaced by the next
  readable file and listed in `bad_files` for the epoch.
- Decoding. `fn.decoders.image` runs on "mixed" (nvJPEG) when the device is CUDA and on "cpu" otherwise; the rest of
  the graph is identical. Arrays skip the decoder and are moved to the GPU when the device is CUDA.
- One DALI pipeline per epoch, seeded from (seed, epoch, rank): each epoch's draws are reproducible for resume,
  and an abandoned epoch (max_steps) leaves nothing queued for the next one. Checkpointing is on: where an epoch
  was left (`position_state`) restores into a new pipeline that continues with the same draws, asking the
  source only for the remaining batches (`set_epoch(epoch, start_batch, state)`).
- Photometric ops in DALI, per sample, applied by arithmetic with coin flips rather than branches (identity factors
  where an op is not drawn). Brightness and contrast follow torchvision (contrast blends with the mean luma of
  the brightened image). Two documented differences: the four jitter ops run in the fixed order brightness,
  contrast, saturation + hue (DALI's `hsv`, which works in YIQ), and grayscale is `hsv` with saturation 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.tensors import TensorListGPU

from mixmask.batches import TwoViewBatch
from mixmask.errors import UserError
from pipelines.augment import EVAL_CROP_RATIO, AugSpec
from pipelines.loaders import SplitImages
from pipelines.loaders.bad_files import BadFileTally, encoded_bytes, first_readable
from pipelines.loaders.sharding import batch_seed, check_rank, epoch_order, steps_per_epoch

_LUMA = (0.2989, 0.587, 0.114)


def _uniform(low: float, high: float):
    return fn.random.uniform(range=[low, high])


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _select(apply, value, identity: float):
    """`value` where the per-sample coin is 1, `identity` elsewhere."""
    return apply * value + (1.0 - apply) * identity


def _view_graph(images, spec: AugSpec, resolution: int, mirror_out: bool):
    """One view: random resized crop, photometric ops and normalisation to float HWC.

    Shape:
        images: per-sample (H, W, 3) uint8 -> (resolution, resolution, 3) float
    """
    x = fn.random_resized_crop(images, size=[resolution, resolution], random_area=list(spec.crop_scale),
                               random_aspect_ratio=list(spec.crop_ratio))
    on_gpu = x.device == "gpu"

    def per_sample(node):
        # Per-sample scalars are drawn on the CPU; arithmetic with GPU images needs them on the GPU.
        return node.gpu() if on_gpu else node

    if spec.has_jitter or spec.grayscale_p > 0:
        jitter = _coin(spec.jitter_p) if spec.has_jitter else 0.0
        if spec.has_jitter:
            # torchvision's brightness then contrast, by arithmetic so the contrast centre (mean luma of the
            # brightened image) may live on the GPU: DALI's own contrast_center must be a CPU argument.
            brightness = _select(jitter, _uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness), 1.0)
            contrast = per_sample(_select(jitter, _uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast), 1.0))
            xf = dmath.clamp(fn.cast(x, dtype=types.FLOAT) * per_sample(brightness), 0.0, 255.0)
            mean = fn.reductions.mean(xf, axes=[0, 1])
            center = mean[0] * _LUMA[0] + mean[1] * _LUMA[1] + mean[2] * _LUMA[2]
            x = fn.cast(dmath.clamp(xf * contrast + center * (1.0 - contrast) + 0.5, 0.0, 255.0),
                        dtype=types.UINT8)
        saturation = _select(jitter, _uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation), 1.0)
        hue_degrees = _select(jitter, _uniform(-spec.hue, spec.hue), 0.0) * 360.0
        if spec.grayscale_p > 0:
            saturation = saturation * (1.0 - _coin(spec.grayscale_p))
        x = fn.hsv(x, hue=hue_degrees, saturation=saturation, dtype=types.UINT8)
    if spec.blur_p > 0:
        blur = per_sample(_coin(spec.blur_p))
        blurred = fn.gaussian_blur(x, window_size=spec.blur_kernel_size(resolution),
                                   sigma=_uniform(*spec.blur_sigma))
        x = fn.cast(blur * fn.cast(blurred, dtype=types.FLOAT) + (1.0 - blur) * fn.cast(x, dtype=types.FLOAT),
                    dtype=types.UINT8)
    if spec.solarize_p > 0:
        solar = per_sample(_coin(spec.solarize_p))
        xf = fn.cast(x, dtype=types.FLOAT)
        threshold = round(spec.solarize_threshold * 255)
        x = fn.cast(xf + solar * (xf >= threshold) * (255.0 - 2.0 * xf), dtype=types.UINT8)
    return fn.crop_mirror_normalize(
        x, mirror=fn.random.coin_flip(probability=spec.flip_p) if mirror_out else 0, dtype=types.FLOAT,
        output_layout="HWC", mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])


class _EpochSource:
    """This rank's batches of one epoch, by iteration: (encoded files or HWC arrays, labels, indices).

    A callable of DALI's `BatchInfo`, the kind of source DALI checkpointing can restore: a pipeline rebuilt from a
    checkpoint asks for the iteration it stopped at. `first_batch` shifts the iterations for an epoch started
    at a batch without a checkpoint. An unreadable file is replaced by the next readable one and counted in `tally`.
    """

    def __init__(self, split: SplitImages, order: np.ndarray, batch_size: int, steps: int,
                 tally: BadFileTally, first_batch: int = 0) -> None:
        self.split, self.order, self.batch_size, self.steps = split, order, batch_size, steps
        self.tally, self.first_batch = tally, first_batch
        self.error: Exception | None = None  # DALI wraps what a source raises; the loader re-raises this

    def _files(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Encoded bytes of each sample (an unreadable file replaced by the next readable one) and their labels."""
        data, labels = [], []
        for i in idx:
            read, encoded, skipped = first_readable(self.split.files, int(i), encoded_bytes)
            for path, reason in skipped:
                try:
                    self.tally.add(path, reason)
                except Exception as err:
                    self.error = err
                    raise
            data.append(encoded)
            labels.append(self.split.labels[read])
        return data, np.asarray(labels, dtype=np.int64)

    def __call__(self, info):
        step = info.iteration + self.first_batch
        if step >= self.steps:
            raise StopIteration
        idx = self.order[step * self.batch_size:(step + 1) * self.batch_size]
        if len(idx) < self.batch_size:  # no drop_last: repeat the epoch's start so the batch is full
            idx = np.concatenate([idx, self.order[: self.batch_size - len(idx)]])
        if self.split.images is not None:
            data, labels = [self.split.images[i] for i in idx], self.split.labels[idx]
        else:
            data, labels = self._files(idx)
        return data, labels, idx.astype(np.int64)


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on `device` (copied: DALI reuses its buffers)."""
    tensor = out.as_tensor()
    if isinstance(out, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
        return result
    return torch.from_numpy(np.array(tensor)).to(device, non_blocking=True)


class _DALIBase:
    def __init__(self, split: SplitImages, *, batch_size_per_rank: int, rank: int, world_size: int, seed: int,
                 workers: int, device: torch.device, drop_last: bool, batches_ahead: int, shuffle: bool,
                 max_bad_fraction: float = 0.01) -> None:
        check_rank(rank, world_size)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size_per_rank, rank, world_size
        self.seed, self.workers, self.device, self.shuffle = seed, max(1, workers), torch.device(device), shuffle
        self.batches_ahead, self.drop_last = max(1, batches_ahead), drop_last
        self.steps = steps_per_epoch(len(split), world_size, batch_size_per_rank, drop_last)
        self.epoch, self.start_batch, self._restore, self._position = 0, 0, None, None
        self.tally = BadFileTally(max_bad_fraction, -(-len(split) // world_size))

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of the unreadable files skipped in the current (or last) epoch."""
        return list(self.tally.files.items())

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on.

        `state` is what `position_state()` returned when an epoch was left at that batch: with it, the random
        draws continue exactly as in an uninterrupted epoch (DALI checkpointing); without it the batches hold
        the same samples but fresh draws. Nothing before `start_batch` is read either way.
        """
        if not 0 <= start_batch <= self.steps:
            raise ValueError(f"an epoch of {self.steps} batches cannot start at batch {start_batch}")
        if state is not None and (state["epoch"], state["batch"]) != (epoch, start_batch):
            raise ValueError(f"the DALI state is for epoch {state['epoch']} batch {state['batch']}, "
                             f"not epoch {epoch} batch {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch
        self._restore = state["dali"] if state is not None and start_batch > 0 else None

    def position_state(self) -> dict | None:
        """Where the last iteration stopped, for `set_epoch(epoch, batch, state)`: epoch, batch, DALI checkpoint."""
        return self._position

    def _decoded(self, source: _EpochSource):
        data, labels, index = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                 layout=["HWC" if self.split.images is not None else "", "", ""])
        if self.split.images is None:
            data = fn.decoders.image(data, device="mixed" if self.device.type == "cuda" else "cpu",
                                     output_type=types.RGB)
        elif self.device.type == "cuda":
            data = data.gpu()  # arrays: DALI copies them (pinned staging) so the whole graph runs on the GPU
        return data, labels, index

    def _run_epoch(self, build_outputs) -> Iterator[list[torch.Tensor]]:
        order = epoch_order(len(self.split), rank=self.rank, world_size=self.world_size, seed=self.seed,
                            epoch=self.epoch, shuffle=self.shuffle)
        restore, start = self._restore, self.start_batch
        self.tally.start_epoch(self.epoch)
        # Restored from a checkpoint, DALI asks the source for iteration `start` itself; otherwise shift.
        source = _EpochSource(self.split, order, self.batch_size, self.steps, self.tally, 0 if restore else start)
        seed = batch_seed(self.seed, self.epoch, self.rank) if restore or not start else \
            batch_seed(self.seed, self.epoch, self.rank, batch=start)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.workers,
                        device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                        seed=seed % (2**31), prefetch_queue_depth=self.batches_ahead,
                        enable_checkpointing=True, checkpoint=restore)
        with pipe:
            pipe.set_outputs(*build_outputs(*self._decoded(source)))
        pipe.build()
        handed = start  # batches handed out (run) so far
        try:
            while handed < self.steps:
                try:
                    outputs = pipe.run()
                except Exception as err:
                    if source.error is not None:  # our one-line error, not DALI's wrapper around it
                        raise source.error from None
                    if self.split.files is None:
                        raise
                    raise UserError(f"DALI could not decode an image of epoch {self.epoch + 1} "
                                    f"({(str(err).strip().splitlines() or ['?'])[0][:200]}); list the damaged "
                                    "files with python -m pipelines.convert imagefolder ... and remove them") from None
                handed += 1
                yield [_to_torch(out, self.device) for out in outputs]
        finally:
            # The checkpoint after the batches handed out (DALI accounts for its prefetch queue).
            self._position = {"epoch": self.epoch, "batch": handed, "dali": pipe.checkpoint()}
            del pipe


class DALITwoViewLoader(_DALIBase):
    """Two augmented views per image through DALI, as `TwoViewBatch` on `device` (see module docstring)."""

    def __init__(self, split: SplitImages, *, resolution: int, batch_size_per_rank: int,
                 views: tuple[AugSpec, AugSpec], rank: int, world_size: int, seed: int, workers: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 drop_last: bool = True, batches_ahead: int = 2, max_bad_fraction: float = 0.01) -> None:
        super().__init__(split, batch_size_per_rank=batch_size_per_rank, rank=rank, world_size=world_size,
                         seed=seed, workers=workers, device=device, drop_last=drop_last,
                         batches_ahead=batches_ahead, shuffle=True, max_bad_fraction=max_bad_fraction)
        self.views, self.resolution, self.dtype, self.channels_last = views, resolution, dtype, channels_last

    def _graph(self, images, labels, index):
        return (*(_view_graph(images, v, self.resolution, True) for v in self.views), labels, index)

    def _nchw(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(self.dtype)  # HWC memory read as NCHW is channels_last already
        return x if self.channels_last else x.contiguous()

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for view1, view2, labels, index in self._run_epoch(self._graph):
            yield TwoViewBatch(self._nchw(view1), self._nchw(view2), labels.long(), index.long())


class DALIEvalLoader(_DALIBase):
    """Single-view (images, labels): RRC + flip when `train_aug`, else (resize +) centre crop; no drop_last."""

    def __init__(self, split: SplitImages, *, resolution: int, batch_size_per_rank: int, train_aug: bool, rank: int,
                 world_size: int, workers: int, device: torch.device, seed: int = 0,
                 mean: tuple[float, float, float], std: tuple[float, float, float], dtype: torch.dtype,
                 channels_last: bool, batches_ahead: int = 2, small: bool, max_bad_fraction: float = 0.01) -> None:
        super().__init__(split, batch_size_per_rank=batch_size_per_rank, rank=rank, world_size=world_size,
                         seed=seed, workers=workers, device=device, drop_last=False, batches_ahead=batches_ahead,
                         shuffle=train_aug, max_bad_fraction=max_bad_fraction)
        self.resolution, self.train_aug, self.small, self.dtype = resolution, train_aug, small, dtype
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.count = -(-len(split) // world_size)  # samples per rank; the last batch is trimmed to it
        self.num_samples = len(split)  # the split's size: the gathered epoch beyond it is padding
        self.rank_layout = "strided"  # rank r reads positions r, r + W, ... (`pipelines.loaders.sharding`)

    def _graph(self, images, labels, index):
        res = self.resolution
        if self.train_aug:
            x = fn.random_resized_crop(images, size=[res, res])
            mirror = fn.random.coin_flip()
        else:
            x = fn.resize(images, resize_shorter=res if self.small else round(res / EVAL_CROP_RATIO))
            mirror = 0
        x = fn.crop_mirror_normalize(x, crop=[res, res], mirror=mirror, dtype=types.FLOAT, output_layout="HWC",
                                     mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std])
        return x, labels, index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels, _) in enumerate(self._run_epoch(self._graph), start=self.start_batch):
            keep = min(self.batch_size, self.count - step * self.batch_size)
            x = images[:keep].permute(0, 3, 1, 2).to(self.dtype)
            yield (x if self.channels_last else x.contiguous()), labels[:keep].long()
