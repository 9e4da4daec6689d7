"""The machinery under `pipelines.convert`: parallel validation, a guarded FFCV writer, temp-then-rename, progress.

FFCV's own `DatasetWriter` polls a shared counter until every sample is written, so a worker that dies makes it
wait forever, and its progress bar is tqdm. The writer here reuses FFCV's file layout code and worker job but
watches its workers: a dead worker stops the conversion with a clear error and the temporary file is removed.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mixmask.errors import UserError
from pipelines.ffcv_import import import_ffcv
from pipelines.sources import CorruptImageError, Source, decode_file

# Fork keeps the source object (file lists, arrays) shared with workers instead of pickling it per task.
_CTX = mp.get_context("fork")
_CHECK_SOURCE: Source | None = None


class Reporter:
    """Progress for the phases of a conversion: a rich bar on stderr when enabled, otherwise silent."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> Reporter:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr),
                                      transient=False)
            self._progress.start()
        return self

    def phase(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total)

    def update(self, completed: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _check_chunk(indices: list[int]) -> list[tuple[int, int, int, str | None]]:
    """(index, height, width, reason-or-None) for each file; a cheap DCT-scaled decode proves it readable."""
    src = _CHECK_SOURCE
    results = []
    for i in indices:
        path = src.path(i)
        try:
            from PIL import Image

            decode_file(path, draft_size=1)
            with Image.open(path) as im:
                w, h = im.size
            results.append((i, h, w, None))
        except CorruptImageError as err:
            results.append((i, 0, 0, err.reason))
    return results


def validate_files(src: Source, workers: int, reporter: Reporter
                   ) -> tuple[np.ndarray, list[tuple[str, str]], tuple[int, int]]:
    """Decode-check every file of `src` in parallel: (good indices, [(path, reason)], largest (h, w))."""
    global _CHECK_SOURCE
    n = len(src)
    chunks = [list(range(k, min(k + 64, n))) for k in range(0, n, 64)]
    reporter.phase("checking images", n)
    _CHECK_SOURCE = src
    results: list[tuple[int, int, int, str | None]] = []
    try:
        if workers == 1 or n < 256:
            for chunk in chunks:
                results += _check_chunk(chunk)
                reporter.update(len(results))
        else:
            with _CTX.Pool(workers) as pool:
                for part in pool.imap(_check_chunk, chunks):
                    results += part
                    reporter.update(len(results))
    finally:
        _CHECK_SOURCE = None
    good = np.array([i for i, _, _, reason in results if reason is None], dtype=np.int64)
    bad = [(src.path(i), reason) for i, _, _, reason in results if reason is not None]
    hs = [h for _, h, _, reason in results if reason is None]
    ws = [w for _, _, w, reason in results if reason is None]
    return good, bad, (max(hs, default=0), max(ws, default=0))


class _Samples:
    """What the FFCV writer indexes: (image, label) for a source index."""

    def __init__(self, src: Source):
        self.src = src

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.src.load(int(i))), self.src.label(int(i))


def _guarded_job(job: Callable, errors, *args) -> None:
    """Run FFCV's worker job; report a failure as one line to the parent and exit non-zero without a traceback."""
    try:
        job(*args)
    except BaseException as err:  # noqa: BLE001 - anything here must become a message, not a traceback
        errors.put(f"{type(err).__name__}: {err}")
        errors.close()
        errors.join_thread()  # the message must reach the pipe before the hard exit below
        os._exit(1)


def _page_size(max_hw: tuple[int, int], max_resolution: int | None) -> int:
    """A power-of-two page big enough for the largest sample (raw bytes, with room for a JPEG larger than raw)."""
    from ffcv.writer import MIN_PAGE_SIZE

    h, w = max_hw
    if max_resolution is not None and max(h, w) > max_resolution:
        ratio = max_resolution / max(h, w)
        h, w = int(h * ratio) + 1, int(w * ratio) + 1
    need = 2 * h * w * 3 + (1 << 16)
    # Small pages keep small datasets small: every worker pads its last page to the full page size.
    size = MIN_PAGE_SIZE
    while size < need:
        size *= 2
    return size


def write_beton(src: Source, indices: np.ndarray, out: Path, *, write_mode: str, max_resolution: int | None,
                jpeg_quality: int, smart_threshold: int, max_hw: tuple[int, int], num_workers: int, chunksize: int,
                reporter: Reporter, before_rename: Callable[[float], None]) -> None:
    """Write samples `indices` of `src` to a temporary `.beton` beside `out`, then rename it to `out`."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset

    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     smart_threshold=smart_threshold, jpeg_quality=jpeg_quality),
              "label": IntField()}
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(max_hw, max_resolution),
                               num_workers=min(num_workers, max(1, len(indices) // chunksize)))
        work = list(chunks(list(enumerate(int(i) for i in indices)), chunksize))
        _run_writer(writer, len(indices), work, worker_job_indexed_dataset, _Samples(src), reporter)
        before_rename(time.perf_counter() - start)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _run_writer(writer, num_samples: int, work: list, job: Callable, dataset: _Samples, reporter: Reporter) -> None:
    """FFCV's `_write_common`, with worker-death detection and our progress reporting."""
    writer.num_samples = num_samples
    writer.prepare()  # writes header + field descriptors, creates the shared metadata block
    todo, allocations, errors = _CTX.Queue(), _CTX.Queue(), _CTX.Queue()
    procs: list = []
    try:
        for item in work:
            todo.put(item)
        for _ in range(writer.num_workers):
            todo.put(None)
        done = _CTX.Value(ctypes.c_uint64, 0)
        from ffcv.memory_allocator import MemoryAllocator

        allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        args = (todo, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations, dataset)
        procs = [_CTX.Process(target=_guarded_job, args=(job, errors, *args)) for _ in range(writer.num_workers)]
        reporter.phase("writing .beton", num_samples)
        for p in procs:
            p.start()
        table: list = []
        received = 0
        # Each worker puts its allocation table once, after its last page is flushed; a failed worker exits 1.
        while received < len(procs):
            reporter.update(int(done.value))
            try:
                table.extend(allocations.get(timeout=0.1))
                received += 1
                continue
            except queue.Empty:
                pass
            if any(p.exitcode not in (None, 0) for p in procs):
                try:
                    message = errors.get(timeout=1.0)
                except queue.Empty:
                    message = "a writer process died (out of memory?)"
                raise UserError(f"writing failed, nothing was written: {message}")
        for p in procs:
            p.join()
        if int(done.value) != num_samples:
            raise UserError(f"writing failed: {int(done.value)} of {num_samples} samples written")
        reporter.update(num_samples)
        writer.finalize(table)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
        # Work left in a queue must not hold this process at exit (its feeder thread would wait for a reader).
        for q in (todo, allocations, errors):
            q.cancel_join_thread()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
