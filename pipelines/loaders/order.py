"""Sample orders past the plain permutation: a distributed page-local ("quasi-random") order for `.beton` files
larger than RAM, the choice between orders, and starting an epoch at a given batch. Pure functions of the file's
page layout, (rank, world size, seed, epoch) and a window; no file, process group or loader needed.

Why a page-local order: FFCV reads a `.beton` by pages. With `os_cache=False` its process cache keeps a page in
memory from the first batch that needs it to the last one, so under a full random permutation every page is
needed all epoch long and the whole file sits in each process's memory. FFCV's own QUASI_RANDOM order keeps a
few pages at a time but refuses distributed training. Here:

1. every rank draws the same (seed, epoch) permutation of the file's pages and shuffles the samples inside each
   page; concatenated, that is one sequence of all samples grouped by page;
2. the sequence is padded by wrapping to a multiple of the world size (as `pipelines.loaders.sharding` pads) and
   rank r takes the r-th contiguous chunk: shards are disjoint up to the padding, cover the epoch, have the same
   length (hence the same step count), and rank r reads only its own run of pages (a page on the border
   between two chunks is split by samples, never read for the same sample twice);
3. inside a chunk, consecutive blocks of `window` samples are shuffled, each on its own. A page whose samples
   fit in a window lies in at most two consecutive blocks, so at any time a rank needs only the pages of two
   blocks: about 2 * window / (samples per page) + 2 pages, whatever the file size.
"""

from __future__ import annotations

import math

import numpy as np

from mixmask.errors import UserError
from pipelines.loaders.sharding import check_rank, samples_per_rank

ORDERS = ("random", "quasi_random")
ORDER_CHOICES = ("auto", *ORDERS)


def resolve_order(order: str, *, file_bytes: int, ram_bytes: int, ram_share: float, os_cache: bool,
                  backend: str) -> str:
    """The order to use: `auto` is `random` while the file fits in `ram_share` of RAM, `quasi_random` beyond.

    Refuses what cannot work: a page-local order on a backend that does not read pages, and a random order with
    FFCV's process cache (`os_cache=False`) on a file larger than the RAM share, which holds every page at once.
    """
    if order not in ORDER_CHOICES:
        raise UserError(f"data.order={order!r} is not valid; valid: {', '.join(ORDER_CHOICES)}")
    fits = file_bytes <= ram_share * ram_bytes
    if backend != "ffcv":
        if order == "quasi_random":
            raise UserError(f"data.order=quasi_random reads .beton pages: it needs data.backend=ffcv, not {backend}")
        return "random"
    if order == "auto":
        return "random" if fits else "quasi_random"
    if order == "random" and not os_cache and not fits:
        raise UserError(f"data.order=random with data.os_cache=false keeps the whole {file_bytes / 2**30:.1f} GiB "
                        f"file in memory (more than data.ram_share={ram_share} of {ram_bytes / 2**30:.1f} GiB "
                        "RAM); use data.order=quasi_random (or auto)")
    return order


def sample_pages(num_samples: int, sample_ids: np.ndarray, ptrs: np.ndarray, page_size: int) -> np.ndarray:
    """The page of each sample (the page of its first allocated byte), from a `.beton`'s allocation table.

    Samples with no allocated data (all fields in the metadata) get a page of their own past the last one.

    Shape:
        sample_ids, ptrs: (A,) allocation table columns; returns (num_samples,) int64
    """
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    page_of_alloc = (np.asarray(ptrs, dtype=np.uint64) >> np.uint64(page_size.bit_length() - 1)).astype(np.int64)
    none = np.iinfo(np.int64).max
    pages = np.full(num_samples, none, dtype=np.int64)
    np.minimum.at(pages, np.asarray(sample_ids, dtype=np.int64), page_of_alloc)
    missing = pages == none
    first_free = int(page_of_alloc.max()) + 1 if len(page_of_alloc) else 0
    pages[missing] = first_free + np.arange(int(missing.sum()))
    return pages


def quasi_random_order(pages: np.ndarray, *, rank: int, world_size: int, seed: int, epoch: int,
                       window: int) -> np.ndarray:
    """Positions (into `pages`) this rank visits in `epoch`: its share of pages, samples shuffled per window.

    See the module docstring for the three steps and the memory bound.

    Shape:
        pages: (N,) page of each sample; returns (ceil(N / world_size),) int64
    """
    check_rank(rank, world_size)
    if window < 1:
        raise UserError(f"the quasi-random window must be >= 1 sample, got {window}")
    pages = np.asarray(pages)
    num_samples = len(pages)
    if num_samples < 1:
        raise UserError("the dataset is empty")
    # Same on every rank: the page order and the order inside each page.
    shared = np.random.default_rng([seed, epoch, 0x9A6E])
    unique_pages, page_ix = np.unique(pages, return_inverse=True)
    page_rank = shared.permutation(len(unique_pages))
    within = shared.random(num_samples)
    sequence = np.lexsort((within, page_rank[page_ix]))  # last key first: by page rank, then shuffled within
    per_rank = samples_per_rank(num_samples, world_size)
    total = per_rank * world_size
    if total > num_samples:
        sequence = np.concatenate([sequence, np.resize(sequence, total - num_samples)])
    mine = sequence[rank * per_rank:(rank + 1) * per_rank]
    # Each rank's own draw: shuffle inside consecutive blocks of `window` samples.
    local = np.random.default_rng([seed, epoch, rank, 0xB10C])
    block = np.arange(per_rank) // window
    return mine[np.lexsort((local.random(per_rank), block))].astype(np.int64)


def pages_bound(window: int, min_samples_per_page: int) -> int:
    """Most distinct pages any `window` consecutive samples of a quasi-random order can touch.

    A window overlaps at most two shuffled blocks, each a run of whole pages plus a partial page at each end.
    """
    return 2 * (math.ceil(window / max(1, min_samples_per_page)) + 2)


def start_at_batch(order: np.ndarray, start_batch: int, batch_size: int, steps: int) -> np.ndarray:
    """What an epoch of `steps` batches reads when it starts at batch `start_batch` (0 = the whole epoch).

    Batches are cut from the same order as an uninterrupted epoch, so batch k is the same samples either way;
    samples past the last batch (dropped by drop_last) are not read.
    """
    if not 0 <= start_batch <= steps:
        raise UserError(f"an epoch of {steps} batches cannot start at batch {start_batch}")
    return order[start_batch * batch_size:steps * batch_size]
