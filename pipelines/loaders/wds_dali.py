"""DALI reads webdataset shards: `fn.readers.webdataset` → the DALI backend's own two-view (or eval) graph.

The loaders are the DALI backend's classes with the input swapped: instead of feeding a file list through
`fn.external_source`, each epoch builds a pipeline around `fn.readers.webdataset` with the global rank as
`shard_id`, the world size as `num_shards`, `stick_to_shard` (the rank's share of the epoch is defined by
`pipelines.loaders.wds_shards`, which also fixes the per-epoch shard order), a shuffle buffer (`random_shuffle`,
`initial_fill`) and `pad_last_batch`, which repeats the rank's last sample so that every rank runs the same number
of steps. Decoding, crops and photometric ops are the DALI backend's graph (nvJPEG on GPU, CPU decoder without
one). Labels come from the `.cls` members and dataset indices from the sample keys (`source_info`), parsed on the
host. Samples without an image or a label are skipped (`missing_component_behavior="skip"` and the filtered index
of `wds_shards`, counted in `num_missing`); an image that does not decode makes DALI fail its whole batch, which is
dropped and counted in `skipped_batches`.

Resume without replay: the pipeline runs with DALI checkpointing on, and where an epoch was left
(`position_state()`: DALI's checkpoint after the batches handed out, its prefetch queue accounted for) restores into
the next epoch's pipeline (`set_epoch(epoch, start_batch, state)`). The reader comes back at its position: its
shuffle buffer is refilled from the tars (raw bytes: DALI reads only the samples still in the buffer) and its
random state restored, as are the augmentation operators' random states, so batches start..end are those of an
uninterrupted epoch, pixels included, and nothing before `start_batch` is decoded. Only a resume without a recorded
position (a checkpoint from another world size or from before recording) reads past the trained batches again.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from mixmask.errors import UserError
from pipelines.loaders.dali_backend import DALIEvalLoader, DALITwoViewLoader, _to_torch
from pipelines.loaders.sharding import batch_seed, samples_per_rank
from pipelines.loaders.wds_shards import ShardSet, dali_index_paths, epoch_shard_order, filtered_index_folder

IMAGE_EXT = "jpg;png;jpeg"
MAX_FAILED_BATCHES_IN_A_ROW = 8
READER_TAG = "wds-dali"  # marks the DALI checkpoints of this reader in `position_state()`


def _parse_labels(out) -> np.ndarray:
    """`.cls` members (ASCII digits) of a batch → int64 labels."""
    return np.array([int(bytes(np.asarray(out.at(i)))) for i in range(len(out))], dtype=np.int64)


def _parse_rows(out) -> np.ndarray:
    """`source_info` strings ("shard.tar:offset:KEY.cls") of a batch → the rows their keys encode."""
    rows = []
    for i in range(len(out)):
        member = bytes(np.asarray(out.at(i))).decode().rsplit(":", 1)[-1]
        rows.append(int(member.split(".", 1)[0]))
    return np.array(rows, dtype=np.int64)


class _ShardEpochs:
    """Replaces the DALI backend's external-source epoch with a `fn.readers.webdataset` one."""

    split: ShardSet
    shuffle_buffer: int
    skipped_batches: int = 0  # batches dropped because an image in them did not decode
    decoded_samples: int = 0  # samples of the batches the pipeline ran (its prefetch queue may hold more)

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on; `state` from `position_state()` resumes
        the reader and the random draws where that epoch was left (see the module docstring)."""
        if state is not None and state.get("reader") != READER_TAG:
            state = None  # another reader's position (the run's data changed): read past the trained batches
        super().set_epoch(epoch, start_batch, state)

    def _run_epoch(self, build_outputs) -> Iterator[list[torch.Tensor]]:
        shards = self.split
        order = epoch_shard_order(len(shards.urls), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        folder = filtered_index_folder(shards)
        index_paths = dali_index_paths(shards, folder.name if folder else "")
        buffer = min(self.shuffle_buffer, samples_per_rank(len(shards), self.world_size))
        on_gpu = self.device.type == "cuda"
        restore = self._restore
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.workers,
                        device_id=(self.device.index or 0) if on_gpu else None,
                        seed=batch_seed(self.seed, self.epoch, self.rank) % (2**31),
                        prefetch_queue_depth=self.batches_ahead, enable_checkpointing=True, checkpoint=restore)
        with pipe:
            encoded, cls = fn.readers.webdataset(
                paths=[shards.urls[k] for k in order], index_paths=[index_paths[k] for k in order],
                ext=[IMAGE_EXT, "cls"], missing_component_behavior="skip", shard_id=self.rank,
                num_shards=self.world_size, stick_to_shard=True, pad_last_batch=True,
                random_shuffle=self.shuffle and buffer > 1, initial_fill=max(1, buffer), name="shards")
            info = fn.get_property(cls, key="source_info")
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            pipe.set_outputs(*build_outputs(images, cls, info))
        pipe.build()
        # Restored, the pipeline continues at the batch it was left at; without a recorded position the epoch is
        # read from its start and the trained batches dropped (the shuffle buffer's position is DALI's alone).
        done, failed = (self.start_batch if restore else 0), False
        try:
            failures = 0
            while done < self.steps:
                self.decoded_samples += self.batch_size
                try:
                    *outputs, cls_out, info_out = pipe.run()
                except RuntimeError as err:
                    # DALI's decoder fails the whole batch holding an image it cannot decode, and the pipeline
                    # goes on with the next one: drop the batch, count it, and read one more (the reader wraps
                    # within this rank's share, as its padding does), so the step count holds.
                    self.skipped_batches += 1
                    failures += 1
                    if failures > MAX_FAILED_BATCHES_IN_A_ROW:
                        detail = next((line for line in str(err).splitlines() if "rror" in line), "")
                        raise UserError(f"DALI failed {failures} batches in a row reading {shards.sidecar_path}'s "
                                        f"shards: {detail.strip()}") from None
                    continue
                failures = 0
                done += 1
                if done <= self.start_batch:
                    continue  # no recorded position: a trained batch read again
                labels = torch.from_numpy(_parse_labels(cls_out)).to(self.device, non_blocking=True)
                rows = torch.from_numpy(_parse_rows(info_out)).to(self.device, non_blocking=True)
                yield [*(_to_torch(out, self.device) for out in outputs), labels, rows]
        except Exception:
            failed = True  # an epoch that failed has no position to resume from
            raise
        finally:
            # DALI's checkpoint after the batches handed out (its prefetch queue accounted for), tagged with this
            # reader so that a folder pipeline's checkpoint is never restored into a shard pipeline.
            self._position = None if failed else {"epoch": self.epoch, "batch": done, "reader": READER_TAG,
                                                  "dali": pipe.checkpoint()}
            del pipe
            if folder is not None:
                folder.cleanup()


class DALIShardTwoViewLoader(_ShardEpochs, DALITwoViewLoader):
    """Two augmented views per sample of webdataset shards through DALI, as `TwoViewBatch` on `device`."""

    def __init__(self, shards: ShardSet, *, shuffle_buffer: int, **kwargs) -> None:
        super().__init__(shards, **kwargs)
        self.shuffle_buffer = shuffle_buffer

    @property
    def num_missing(self) -> int:
        return self.split.num_missing


class DALIShardEvalLoader(_ShardEpochs, DALIEvalLoader):
    """Single-view (images, labels) of webdataset shards through DALI (shards in stored order, no drop_last)."""

    def __init__(self, shards: ShardSet, *, shuffle_buffer: int, **kwargs) -> None:
        super().__init__(shards, **kwargs)
        self.shuffle_buffer = shuffle_buffer
        self.rank_layout = "contiguous"  # rank r reads [N·r // W, N·(r+1) // W), padded at its end
