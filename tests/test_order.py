"""The distributed quasi-random order (`pipelines.loaders.order`): shards, seeding, the memory bound on a real
`.beton` written with small pages, a real FFCV loader reading every sample once, and the order choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmask.errors import UserError
from pipelines.loaders.order import (
    ORDER_CHOICES,
    pages_bound,
    quasi_random_order,
    resolve_order,
    sample_pages,
    start_at_batch,
)
from pipelines.loaders.sharding import epoch_order

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# 160 px raw RGB is 76,800 bytes: 27 samples fill one of ffcv's smallest (2 MiB) pages; 430 images → 16 pages.
NUM, RES, WINDOW, BATCH = 430, 160, 24, 8


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from pipelines.convert import convert

    out = tmp_path_factory.mktemp("order") / "big.beton"
    convert("synthetic", out, num_images=NUM, num_classes=4, resolution=RES, workers=1, write_mode="raw")
    return out


@pytest.fixture(scope="module")
def layout(beton):
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    table = reader.alloc_table
    pages = sample_pages(int(reader.num_samples), table["sample_id"], table["ptr"], int(reader.page_size))
    return reader, pages


def _distinct_pages_in_windows(page_seq: np.ndarray, span: int) -> int:
    """The most distinct pages among any `span` consecutive samples (the reference the bound is checked against)."""
    return max(len(set(page_seq[i:i + span].tolist())) for i in range(max(1, len(page_seq) - span + 1)))


def test_sample_pages_from_an_allocation_table():
    ptrs = np.array([0, 100, 4096, 5000, 9000], dtype=np.uint64)
    ids = np.array([0, 1, 2, 2, 3])  # sample 2 has two allocations, on pages 1 and 1; sample 4 none
    np.testing.assert_array_equal(sample_pages(5, ids, ptrs, 4096), [0, 0, 1, 2, 3])
    with pytest.raises(ValueError):
        sample_pages(5, ids, ptrs, 3000)


def test_two_ranks_disjoint_covering_same_length_on_uneven_pages():
    rng = np.random.default_rng(0)
    pages = np.repeat(np.arange(23), rng.integers(1, 9, 23))  # pages of 1..8 samples
    n = len(pages)
    for world in (1, 2, 3):
        shards = [quasi_random_order(pages, rank=r, world_size=world, seed=4, epoch=0, window=5)
                  for r in range(world)]
        assert {len(s) for s in shards} == {-(-n // world)}
        together = np.concatenate(shards)
        assert set(together.tolist()) == set(range(n))
        assert len(together) - len(set(together.tolist())) == len(together) - n  # only the padding repeats


def test_ranks_read_their_own_pages():
    pages = np.repeat(np.arange(40), 10)
    shards = [set(pages[quasi_random_order(pages, rank=r, world_size=2, seed=1, epoch=3, window=16)].tolist())
              for r in (0, 1)]
    assert len(shards[0] & shards[1]) <= 1  # at most the page on the border between the two chunks
    assert len(shards[0]) + len(shards[1]) <= 41


def test_reproducible_from_seed_and_epoch_and_different_across_epochs():
    pages = np.repeat(np.arange(30), 7)
    a = quasi_random_order(pages, rank=1, world_size=2, seed=9, epoch=2, window=10)
    np.testing.assert_array_equal(a, quasi_random_order(pages, rank=1, world_size=2, seed=9, epoch=2, window=10))
    assert not np.array_equal(a, quasi_random_order(pages, rank=1, world_size=2, seed=9, epoch=3, window=10))
    assert not np.array_equal(a, quasi_random_order(pages, rank=1, world_size=2, seed=8, epoch=2, window=10))
    # across epochs a rank reads other pages, not the same share reshuffled
    e0 = set(pages[quasi_random_order(pages, rank=0, world_size=2, seed=9, epoch=0, window=10)].tolist())
    e1 = set(pages[quasi_random_order(pages, rank=0, world_size=2, seed=9, epoch=1, window=10)].tolist())
    assert e0 != e1


def test_window_bounds_pages_and_shuffles_samples():
    pages = np.repeat(np.arange(100), 12)
    order = quasi_random_order(pages, rank=0, world_size=1, seed=0, epoch=0, window=30)
    assert _distinct_pages_in_windows(pages[order], 30) <= pages_bound(30, 12)
    # the samples of one page are not read back to back: the window mixes pages
    assert np.mean(pages[order][1:] == pages[order][:-1]) < 0.5
    with pytest.raises(UserError):
        quasi_random_order(pages, rank=0, world_size=1, seed=0, epoch=0, window=0)


def test_memory_bounded_by_the_window_on_a_real_beton(beton, layout):
    """What ffcv's process cache (os_cache=False) allocates for an epoch, scheduled by ffcv's own code."""
    from ffcv.memory_managers.process_cache.schedule import compute_schedule

    reader, pages = layout
    num_pages = len(np.unique(pages))
    spp = np.bincount(pages)[np.unique(pages)]
    # the file is several times what the window may hold (16 pages of 2 MiB against a bound of 6)
    assert num_pages >= 2 * pages_bound(WINDOW, int(spp.min())) and beton.stat().st_size > 8 * 2**21

    def slots(order: np.ndarray) -> int:
        batches = [order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
        return compute_schedule([set(pages[b].tolist()) for b in batches]).num_slots

    for rank in (0, 1):
        quasi = quasi_random_order(pages, rank=rank, world_size=2, seed=0, epoch=1, window=WINDOW)
        rand = epoch_order(len(pages), rank=rank, world_size=2, seed=0, epoch=1)
        assert _distinct_pages_in_windows(pages[quasi], WINDOW) <= pages_bound(WINDOW, int(spp.min()))
        # ffcv prefetches 3 batches ahead of the one it reads: the bound covers the window plus those.
        assert slots(quasi) <= pages_bound(WINDOW + 4 * BATCH, int(spp.min()))
        assert slots(quasi) * 4 <= num_pages  # measured: 3 pages of 16
        assert slots(rand) >= 0.9 * num_pages  # the random order holds (nearly) the whole file


def test_ffcv_loader_reads_every_sample_once_per_epoch_with_two_ranks(beton):
    from pipelines.loaders import build_two_view_loader

    loaders = [build_two_view_loader("ffcv", source="synthetic", path=str(beton), resolution=16,
                                     batch_size_per_rank=BATCH, recipe="mocov2", rank=r, world_size=2, seed=0,
                                     workers=1, device=torch.device("cpu"), os_cache=False, order="quasi_random",
                                     order_window=WINDOW, drop_last=False) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == -(-(NUM // 2) // BATCH)
    seen_by_epoch = []
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            seen.append(np.concatenate([b.index.numpy() for b in loader]))
        assert len(seen[0]) == len(seen[1]) == NUM // 2
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        assert sorted(np.concatenate(seen).tolist()) == list(range(NUM))
        expected = loaders[0].order.full_order(epoch)
        np.testing.assert_array_equal(seen[0], expected)  # the loader follows the order exactly
        seen_by_epoch.append(seen[0])
    assert not np.array_equal(seen_by_epoch[0], seen_by_epoch[1])


def test_resolve_order():
    gib = 2**30
    common = dict(ram_bytes=16 * gib, ram_share=0.5, os_cache=True, backend="ffcv")
    assert resolve_order("auto", file_bytes=8 * gib, **common) == "random"
    assert resolve_order("auto", file_bytes=9 * gib, **common) == "quasi_random"
    assert resolve_order("random", file_bytes=90 * gib, **common) == "random"  # the page cache copes
    assert resolve_order("auto", file_bytes=90 * gib, **{**common, "backend": "dali"}) == "random"
    with pytest.raises(UserError, match="whole 90.0 GiB"):
        resolve_order("random", file_bytes=90 * gib, **{**common, "os_cache": False})
    with pytest.raises(UserError, match="needs data.backend=ffcv"):
        resolve_order("quasi_random", file_bytes=1, **{**common, "backend": "torchvision"})
    with pytest.raises(UserError, match="valid"):
        resolve_order("shuffled", file_bytes=1, **common)


def test_config_offers_the_orders_of_the_order_module():
    from mixmask.run.config import ORDER_CHOICES as CONFIG_CHOICES

    assert CONFIG_CHOICES == ORDER_CHOICES


def test_start_at_batch_cuts_whole_batches():
    order = np.arange(10)
    np.testing.assert_array_equal(start_at_batch(order, 2, 3, 3), [6, 7, 8])  # drop_last: 3 steps of 3
    np.testing.assert_array_equal(start_at_batch(order, 3, 3, 4), [9])  # keep the tail: 4 steps
    assert len(start_at_batch(order, 3, 3, 3)) == 0
    with pytest.raises(UserError):
        start_at_batch(order, 5, 3, 4)
