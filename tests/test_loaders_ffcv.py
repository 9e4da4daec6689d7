"""The FFCV backend on a converter-written .beton: contract, sharding without a process group, seeding, memory."""

from __future__ import annotations

import psutil
import pytest
import torch

from pipelines.loaders import build_eval_loader, build_two_view_loader
from tests.loader_fixtures import (
    GEOMETRY_ONLY,
    check_batch_contract,
    check_seeded,
    check_shards_and_epochs,
    write_gradient_beton,
    write_gradient_folder,
)

# numba finalizers of ffcv's compiled ctypes wrappers raise a harmless KeyError at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N, BATCH, RES = 42, 3, 32


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    write_gradient_folder(root)
    return str(write_gradient_beton(root, root / "train.beton"))


def _make(beton, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), device="cpu", workers=2):
    def make(*, rank, world_size, seed):
        return build_two_view_loader("ffcv", source="imagefolder", path=beton, resolution=RES,
                                     batch_size_per_rank=BATCH, recipe=recipe, rank=rank, world_size=world_size,
                                     seed=seed, workers=workers, device=torch.device(device))
    return make


def test_contract(beton):
    check_batch_contract(_make(beton)(rank=0, world_size=1, seed=0), BATCH, RES, N)


def test_two_ranks_in_one_process_without_a_process_group(beton):
    assert not torch.distributed.is_initialized()
    check_shards_and_epochs(_make(beton), N, BATCH)


def test_seeded_whatever_the_thread_count(beton):
    check_seeded(_make(beton))
    one, two = _make(beton, workers=1)(rank=0, world_size=1, seed=2), _make(beton, workers=2)(rank=0, world_size=1,
                                                                                               seed=2)
    assert all(torch.equal(a.view1, b.view1) for a, b in zip(one, two))


def test_memory_stays_flat_over_epochs(beton):
    loader = build_two_view_loader("ffcv", source="imagefolder", path=beton, resolution=64, batch_size_per_rank=8,
                                   recipe="mocov2", rank=0, world_size=1, seed=0, workers=2,
                                   device=torch.device("cpu"))
    proc = psutil.Process()
    rss = []
    for epoch in range(8):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        rss.append(proc.memory_info().rss)
    # The first epochs compile and allocate; after that a leak of one loader's buffers per epoch would show.
    # On a GPU host this CPU-device loader still touches CUDA: ffcv decides IS_CUDA = torch.cuda.is_available() at
    # import, so each epoch creates CUDA streams and events, and its batch buffers are pinned (torch's caching host
    # allocator keeps and reuses them). The CUDA context and the first pinned blocks land in rss[0..2], the baseline.
    assert rss[-1] - rss[2] < 20 * 2**20, [r // 2**20 for r in rss]


def test_eval_loader_centre_crop_keeps_every_sample(beton):
    loader = build_eval_loader("ffcv", source="imagefolder", path=beton, split="train", resolution=RES,
                               batch_size_per_rank=8, train_aug=False, rank=0, world_size=1, workers=1,
                               device=torch.device("cpu"))
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches])
    assert len(loader) == 6 and len(labels) == N and labels.tolist() == sorted(labels.tolist())
    assert batches[0][0].shape == (8, 3, RES, RES) and batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_missing_beton_is_a_user_error(tmp_path):
    from mixmask.errors import UserError

    with pytest.raises(UserError, match="beton"):
        _make(str(tmp_path / "nope.beton"))(rank=0, world_size=1, seed=0)


@pytest.mark.gpu
def test_uint8_goes_to_the_gpu_and_photometric_runs_there(request):
    pytest.importorskip("ffcv")  # a GPU machine without ffcv (the GPU check's image) skips, not errors
    beton = request.getfixturevalue("beton")
    batch = next(iter(_make(beton, recipe="byol", device="cuda")(rank=0, world_size=1, seed=0)))
    assert batch.view1.is_cuda and batch.labels.is_cuda and batch.view1.shape == (BATCH, 3, RES, RES)


def test_an_epoch_left_near_its_end_stops_ffcvs_thread(beton):
    """ffcv's thread puts its end-of-epoch marker without a timeout: with the queue full of the epoch's last batches
    (an epoch left just before them, as run.max_steps or a signal do) it blocked until the 60 s join gave up, and
    the thread lived on. Closing the epoch must end the thread."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    loader = _make(beton)(rank=0, world_size=1, seed=0)
    loader.set_epoch(0)
    batches = iter(loader)
    for _ in range(len(loader) - 2):  # the last 2 batches fill ffcv's queue (batches_ahead = 2) ...
        next(batches)
    threading.Event().wait(1.0)  # ... and the thread reaches its end-of-epoch put with the queue full
    batches.close()
    assert not any(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())
