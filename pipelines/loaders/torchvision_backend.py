"""torchvision backend: the official MixMask / MoCo v2 recipe (PIL transforms per image in DataLoader workers, two
crops of the same image), the reference the fast backends are tested against and the CPU fallback.

Per image, as `main_moco.py` does: RandomResizedCrop → RandomApply(ColorJitter) → RandomGrayscale →
RandomApply(GaussianBlur, PIL radius = σ) → RandomSolarize (BYOL) → RandomHorizontalFlip → ToTensor → Normalize.
Reproducibility: the sampler hands each worker (index, epoch) and the sample's two views are drawn from a torch
seed derived from (seed, epoch, index), so a seed gives the same batches whatever the worker count and a resumed
run repeats its epoch. An unreadable file is replaced by the next readable one and listed in `bad_files` for the
epoch (`pipelines.loaders.bad_files`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from mixmask.batches import TwoViewBatch
from pipelines.augment import EVAL_CROP_RATIO, AugSpec
from pipelines.loaders import SplitImages
from pipelines.loaders.bad_files import BadFileTally, first_readable
from pipelines.loaders.order import start_at_batch
from pipelines.loaders.sharding import check_rank, epoch_order, steps_per_epoch


class PILGaussianBlur:
    """MoCo v2's blur: PIL GaussianBlur with radius σ ~ U[σ_min, σ_max] (drawn from torch's generator)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        return img.filter(ImageFilter.GaussianBlur(radius=lo + (hi - lo) * float(torch.rand(()))))


def pil_transform(spec: AugSpec, resolution: int) -> T.Compose:
    """The per-image PIL pipeline for one view, to a normalised float32 (3, H, W) tensor."""
    ops: list = [T.RandomResizedCrop(resolution, scale=spec.crop_scale, ratio=spec.crop_ratio)]
    if spec.has_jitter:
        ops.append(T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                 p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur_p > 0:
        ops.append(T.RandomApply([PILGaussianBlur(spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=round(spec.solarize_threshold * 255), p=spec.solarize_p))
    ops += [T.RandomHorizontalFlip(p=spec.flip_p), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0x7F]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _SplitDataset(Dataset):
    """Items keyed by (index, epoch) from `_EpochSampler`; returns the transformed views, label and index."""

    def __init__(self, split: SplitImages, transforms: list, seed: int) -> None:
        self.split, self.transforms, self.seed = split, transforms, seed

    def __len__(self) -> int:
        return len(self.split)

    def _image(self, index: int) -> tuple[Image.Image, int, str]:
        """(image, index of the file read, skipped files as 'path\treason' lines) for sample `index`."""
        if self.split.images is not None:
            return Image.fromarray(self.split.images[index]), index, ""
        from pipelines.sources import decode_file

        read, pixels, skipped = first_readable(self.split.files, index, decode_file)
        return Image.fromarray(pixels), read, "".join(f"{path}\t{reason}\n" for path, reason in skipped)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        img, read, skipped = self._image(index)
        # A private torch stream per sample: the draws depend on (seed, epoch, index) only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            views = [t(img) for t in self.transforms]
        return (*views, int(self.split.labels[read]), index, skipped)


def _tally(tally: BadFileTally, skipped: list[str]) -> None:
    for lines in skipped:
        for line in lines.splitlines():
            tally.add(*line.split("\t", 1))


class _EpochSampler(Sampler):
    """This rank's (index, epoch) keys for the current epoch (`pipelines.loaders.sharding`)."""

    def __init__(self, num_samples: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                 batch_size: int = 1, drop_last: bool = False) -> None:
        self.num_samples, self.rank, self.world_size, self.seed, self.shuffle = (
            num_samples, rank, world_size, seed, shuffle)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def __iter__(self):
        order = epoch_order(self.num_samples, rank=self.rank, world_size=self.world_size, seed=self.seed,
                            epoch=self.epoch, shuffle=self.shuffle)
        # A resumed epoch asks the workers for the remaining samples only; each sample's draws are keyed by
        # (seed, epoch, index), so the remaining batches equal those of an uninterrupted epoch.
        steps = steps_per_epoch(self.num_samples, self.world_size, self.batch_size, self.drop_last)
        order = start_at_batch(order, self.start_batch, self.batch_size, steps)
        return iter([(int(i), self.epoch) for i in order])

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


def _data_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, device: torch.device,
                 drop_last: bool, batches_ahead: int) -> DataLoader:
    # A private generator: DataLoader draws a base seed at every iter() from the global torch RNG otherwise, which
    # shifts the trainer's own draws (MoCo's shuffle-BN permutation) on a mid-epoch resume. The samples seed
    # themselves (`_SplitDataset`), so this seed changes no image.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=max(1, batches_ahead) if workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def _to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class TorchvisionTwoViewLoader:
    """Two views per image with the official per-image PIL recipe, as `TwoViewBatch` on `device`."""

    def __init__(self, split: SplitImages, *, resolution: int, batch_size_per_rank: int,
                 views: tuple[AugSpec, AugSpec], rank: int, world_size: int, seed: int, workers: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 drop_last: bool = True, batches_ahead: int = 2, max_bad_fraction: float = 0.01) -> None:
        check_rank(rank, world_size)
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.steps = steps_per_epoch(len(split), world_size, batch_size_per_rank, drop_last)
        self.sampler = _EpochSampler(len(split), rank=rank, world_size=world_size, seed=seed, shuffle=True,
                                     batch_size=batch_size_per_rank, drop_last=drop_last)
        self.tally = BadFileTally(max_bad_fraction, len(self.sampler))
        dataset = _SplitDataset(split, [pil_transform(v, resolution) for v in views], seed)
        self.loader = _data_loader(dataset, self.sampler, batch_size_per_rank, workers, device, drop_last,
                                   batches_ahead)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on (nothing before it is read).

        `state` is unused: every draw is keyed by (seed, epoch, index), so (epoch, start_batch) is the position.
        """
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def position_state(self) -> None:
        return None

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of the unreadable files skipped in the current (or last) epoch."""
        return list(self.tally.files.items())

    def __iter__(self) -> Iterator[TwoViewBatch]:
        self.tally.start_epoch(self.sampler.epoch)
        for view1, view2, labels, index, skipped in self.loader:
            _tally(self.tally, skipped)
            yield TwoViewBatch(_to_device(view1, self.device, self.dtype, self.channels_last),
                               _to_device(view2, self.device, self.dtype, self.channels_last),
                               labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))


def eval_ops(resolution: int, *, train_aug: bool, small: bool) -> list:
    """The geometric transforms of an eval image: RRC + flip to train a probe, else resize the short side to
    `resolution / EVAL_CROP_RATIO` and centre-crop; small images (CIFAR, Tiny-ImageNet) keep the whole image."""
    if train_aug:
        return [T.RandomResizedCrop(resolution), T.RandomHorizontalFlip()]
    ratio = 1.0 if small else EVAL_CROP_RATIO
    return [T.Resize(round(resolution / ratio)), T.CenterCrop(resolution)]


class TorchvisionEvalLoader:
    """Single-view (images, labels): RRC + flip for linear probing, else resize + centre crop (`eval_ops`)."""

    def __init__(self, split: SplitImages, *, resolution: int, batch_size_per_rank: int, train_aug: bool, rank: int,
                 world_size: int, workers: int, device: torch.device, seed: int = 0,
                 mean: tuple[float, float, float], std: tuple[float, float, float], dtype: torch.dtype,
                 channels_last: bool, batches_ahead: int = 2, small: bool, max_bad_fraction: float = 0.01) -> None:
        check_rank(rank, world_size)
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        transform = T.Compose([*eval_ops(resolution, train_aug=train_aug, small=small), T.ToTensor(),
                               T.Normalize(mean, std)])
        self.steps = steps_per_epoch(len(split), world_size, batch_size_per_rank, drop_last=False)
        self.num_samples = len(split)  # the split's size: the gathered epoch beyond it is padding
        self.rank_layout = "strided"  # rank r reads positions r, r + W, ... (`pipelines.loaders.sharding`)
        self.sampler = _EpochSampler(len(split), rank=rank, world_size=world_size, seed=seed, shuffle=train_aug,
                                     batch_size=batch_size_per_rank)
        self.tally = BadFileTally(max_bad_fraction, len(self.sampler))
        self.loader = _data_loader(_SplitDataset(split, [transform], seed), self.sampler, batch_size_per_rank,
                                   workers, device, drop_last=False, batches_ahead=batches_ahead)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on (nothing before it is read)."""
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        return list(self.tally.files.items())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.tally.start_epoch(self.sampler.epoch)
        for images, labels, _, skipped in self.loader:
            _tally(self.tally, skipped)
            yield _to_device(images, self.device, self.dtype, self.channels_last), labels.to(self.device)
