"""An epoch started at batch k gives the batches k.. of an uninterrupted epoch, pixels included, on every backend,
and reads only those: nothing before batch k reaches the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.loaders import build_two_view_loader
from tests.loader_fixtures import write_gradient_beton, write_gradient_folder

# numba finalizers of ffcv's compiled ctypes wrappers raise a harmless KeyError at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N, BATCH, RES, EPOCH, START = 42, 4, 16, 1, 4  # 10 steps per epoch on one rank; resume at batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_gradient_folder(root)
    return {"folder": str(root), "beton": str(write_gradient_beton(root, root / "train.beton"))}


def _loader(backend: str, data: dict, *, rank: int = 0, world_size: int = 1):
    # mocov2 at 16 px: colour jitter, grayscale and flips are all drawn, so equal pixels mean equal draws.
    return build_two_view_loader(backend, source="imagefolder",
                                 path=data["beton"] if backend == "ffcv" else data["folder"], resolution=RES,
                                 batch_size_per_rank=BATCH, recipe="mocov2", rank=rank, world_size=world_size,
                                 seed=3, workers=1 if backend != "torchvision" else 0, device=torch.device("cpu"))


def _batches(loader, stop: int | None = None) -> list:
    out = []
    batches = iter(loader)
    for batch in batches:
        out.append(batch)
        if stop is not None and len(out) == stop:
            batches.close()  # what train.py does with an epoch it leaves (max_steps, signal)
            break
    return out


def _assert_same(resumed: list, straight: list) -> None:
    assert len(resumed) == len(straight)
    for a, b in zip(resumed, straight):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)


def test_ffcv_resume_reads_only_the_remaining_batches(data):
    straight = _loader("ffcv", data)
    steps = len(straight)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    assert len(full) == steps == N // BATCH
    resumed = _loader("ffcv", data)  # a new process after the restart: a fresh loader
    scheduled: list = []
    manager = resumed.loader.memory_manager
    original = manager.schedule_epoch

    def record(batches):  # the batches ffcv will read and decode this epoch
        scheduled.extend(np.asarray(b) for b in batches)
        return original(batches)

    manager.schedule_epoch = record
    resumed.set_epoch(EPOCH, start_batch=START)
    rest = _batches(resumed)
    _assert_same(rest, full[START:])
    read = np.concatenate(scheduled)
    assert len(read) == (steps - START) * BATCH
    np.testing.assert_array_equal(read, torch.cat([b.index for b in full[START:]]).numpy())
    resumed.set_epoch(EPOCH + 1)  # the next epoch starts at batch 0 again
    assert len(_batches(resumed)) == steps


def test_torchvision_resume_reads_only_the_remaining_samples(data, monkeypatch):
    from pipelines.loaders import torchvision_backend

    straight = _loader("torchvision", data)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    reads: list[int] = []
    getitem = torchvision_backend._SplitDataset.__getitem__

    def counted(self, key):
        reads.append(key[0])
        return getitem(self, key)

    monkeypatch.setattr(torchvision_backend._SplitDataset, "__getitem__", counted)
    resumed = _loader("torchvision", data)
    resumed.set_epoch(EPOCH, start_batch=START)
    rest = _batches(resumed)
    _assert_same(rest, full[START:])
    assert reads == torch.cat([b.index for b in full[START:]]).tolist()


def test_dali_resume_from_its_checkpoint_reads_only_the_remaining_batches(data, monkeypatch):
    from pipelines.loaders import dali_backend

    straight = _loader("dali", data)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    interrupted = _loader("dali", data)
    interrupted.set_epoch(EPOCH)
    head = _batches(interrupted, stop=START)
    _assert_same(head, full[:START])
    state = interrupted.position_state()
    assert (state["epoch"], state["batch"]) == (EPOCH, START)

    asked: list[int] = []
    call = dali_backend._EpochSource.__call__

    def counted(self, info):
        out = call(self, info)  # StopIteration past the end is not a read
        asked.extend(out[2].tolist())
        return out

    monkeypatch.setattr(dali_backend._EpochSource, "__call__", counted)
    resumed = _loader("dali", data)
    resumed.set_epoch(EPOCH, start_batch=START, state=state)
    rest = _batches(resumed)
    _assert_same(rest, full[START:])  # same draws: DALI's random state came back from the checkpoint
    assert asked == torch.cat([b.index for b in full[START:]]).tolist()

    without = _loader("dali", data)  # no checkpoint (another backend's run): same samples, fresh draws
    without.set_epoch(EPOCH, start_batch=START)
    assert [b.index.tolist() for b in _batches(without)] == [b.index.tolist() for b in full[START:]]
    with pytest.raises(ValueError, match="not epoch"):
        without.set_epoch(EPOCH + 1, start_batch=START, state=state)


def test_resume_keeps_shards_across_two_ranks(data):
    """Two ranks resumed at the same batch still read disjoint remaining samples: their uninterrupted tails."""
    tails = []
    for rank in (0, 1):
        full_loader = _loader("torchvision", data, rank=rank, world_size=2)
        full_loader.set_epoch(EPOCH)
        full = _batches(full_loader)
        resumed = _loader("torchvision", data, rank=rank, world_size=2)
        resumed.set_epoch(EPOCH, start_batch=2)
        rest = _batches(resumed)
        _assert_same(rest, full[2:])
        tails.append(set(torch.cat([b.index for b in rest]).tolist()))
    assert not tails[0] & tails[1]


# ---------------------------------------------------------------- webdataset shards (DALI's reader, the reference)
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipelines.convert import convert

    out = tmp_path_factory.mktemp("resume-wds") / "shards"
    convert("synthetic", out, num_images=N, num_classes=3, resolution=RES, out_format="wds", shard_samples=10,
            workers=1)
    return out


def _shard_loader(backend: str, path, *, workers: int = 1, rank: int = 0, world_size: int = 1,
                  drop_last: bool = True, batch: int = BATCH):
    return build_two_view_loader(backend, source="synthetic", path=str(path), resolution=RES,
                                 batch_size_per_rank=batch, recipe="mocov2", rank=rank, world_size=world_size,
                                 seed=3, workers=workers, device=torch.device("cpu"), shuffle_buffer=16,
                                 drop_last=drop_last)


def _left_at(loader, batch: int) -> dict:
    """The loader's position after an epoch left at `batch`, as train.py's `save` records it."""
    loader.set_epoch(EPOCH)
    head = _batches(loader, stop=batch)
    assert len(head) == batch
    state = loader.position_state()
    assert (state["epoch"], state["batch"]) == (EPOCH, batch)
    return state


def test_dali_shards_resume_from_the_readers_checkpoint_decodes_only_the_remaining_batches(shards, monkeypatch):
    from pipelines.loaders import wds_dali

    straight = _shard_loader("dali", shards)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    steps = len(straight)
    assert len(full) == steps == N // BATCH
    state = _left_at(_shard_loader("dali", shards), START)

    runs: list[int] = []  # every pipeline iteration decodes one batch of samples
    run = wds_dali.Pipeline.run

    def counted(self, *args, **kwargs):
        runs.append(self.max_batch_size)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(wds_dali.Pipeline, "run", counted)
    resumed = _shard_loader("dali", shards, workers=2)  # a new process: another thread count changes nothing
    resumed.set_epoch(EPOCH, start_batch=START, state=state)
    rest = _batches(resumed)
    _assert_same(rest, full[START:])  # reader position, shuffle buffer and augmentation draws came back
    assert sum(runs) == (steps - START) * BATCH  # decoded: the remaining samples, nothing before batch START

    runs.clear()  # without a recorded position (another world size wrote the checkpoint): read past, same batches
    replayed = _shard_loader("dali", shards)
    replayed.set_epoch(EPOCH, start_batch=START)
    _assert_same(_batches(replayed), full[START:])
    assert sum(runs) == steps * BATCH
    with pytest.raises(ValueError, match="not epoch"):
        replayed.set_epoch(EPOCH + 1, start_batch=START, state=state)


@pytest.mark.parametrize("workers", [0, 2])
def test_reference_shards_resume_decodes_only_the_remaining_samples(shards, workers):
    straight = _shard_loader("torchvision", shards, workers=workers)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    steps = len(straight)
    assert straight.decoded_samples == steps * BATCH
    start = START + 1  # odd: with 2 workers the resumed epoch starts on the second worker's turn
    state = _left_at(_shard_loader("torchvision", shards, workers=workers), start)
    for position in (state, None):  # recorded, or derived from the batch (clean shards: the same)
        resumed = _shard_loader("torchvision", shards, workers=workers)
        resumed.set_epoch(EPOCH, start_batch=start, state=position)
        _assert_same(_batches(resumed), full[start:])
        assert resumed.decoded_samples == (steps - start) * BATCH  # nothing before batch `start` decoded


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
@pytest.mark.parametrize(("batch", "start"), [(3, 3), (1, 10)])
def test_shard_resume_inside_the_padding_of_an_uneven_rank(shards, backend, batch, start):
    """42 samples over 4 ranks: rank 0 holds 10, rank 3 11, both run 11 samples' worth of steps (no drop_last).
    Resumed at the last batch: partly padding (batch 3), or nothing but padding on rank 0 (batch 1)."""
    for rank in (0, 3):
        kwargs = dict(rank=rank, world_size=4, drop_last=False, batch=batch)
        straight = _shard_loader(backend, shards, **kwargs)
        straight.set_epoch(EPOCH)
        full = _batches(straight)
        state = _left_at(_shard_loader(backend, shards, **kwargs), start)
        for position in (state, None):
            resumed = _shard_loader(backend, shards, **kwargs)
            resumed.set_epoch(EPOCH, start_batch=start, state=position)
            rest = _batches(resumed)
            _assert_same(rest, full[start:])
            if backend == "torchvision":  # each remaining sample once; padding alone decodes the last one handed out
                assert resumed.decoded_samples == len(set(torch.cat([b.index for b in rest]).tolist()))


def test_reference_shards_resume_leaves_the_tars_it_trained_through_unopened(shards, monkeypatch):
    import webdataset

    opened: list[str] = []
    shard_list = webdataset.SimpleShardList

    def record(urls, *args, **kwargs):  # workers=0: the stream runs in this process
        opened.extend(urls)
        return shard_list(urls, *args, **kwargs)

    monkeypatch.setattr(webdataset, "SimpleShardList", record)
    straight = _shard_loader("torchvision", shards, workers=0)
    straight.set_epoch(EPOCH)
    full = _batches(straight)
    every_tar = set(opened)
    start = len(full) - 2
    state = _left_at(_shard_loader("torchvision", shards, workers=0), start)
    opened.clear()
    resumed = _shard_loader("torchvision", shards, workers=0)
    resumed.set_epoch(EPOCH, start_batch=start, state=state)
    _assert_same(_batches(resumed), full[start:])
    assert set(opened) < every_tar  # the tars whose samples all left the buffer before batch `start`: not read
    assert resumed.decoded_samples == 2 * BATCH
