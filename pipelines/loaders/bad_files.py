"""Unreadable image files met while loading: skipped, replaced by the next readable file, counted per epoch.

A file that cannot be decoded takes the place of the next readable one in the split (same position in the batch),
so every rank keeps its batch size and step count. The loader lists what it skipped in the epoch (`bad_files`),
and stops with one line once more than `max_bad_fraction` of the rank's epoch is unreadable.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TypeVar

from mixmask.errors import UserError

T = TypeVar("T")


class BadFileTally:
    """(path, reason) of the unreadable files met in the current epoch, with the stop rule."""

    def __init__(self, max_bad_fraction: float, samples_per_epoch: int) -> None:
        self.max_bad_fraction, self.samples_per_epoch = max_bad_fraction, samples_per_epoch
        self.epoch = 0
        self.files: dict[str, str] = {}

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.files = epoch, {}

    def add(self, path: str, reason: str) -> None:
        """Record a skipped file; UserError once the epoch's share of unreadable files passes the limit."""
        self.files[path] = reason
        if len(self.files) > self.max_bad_fraction * self.samples_per_epoch:
            first, why = next(iter(self.files.items()))
            raise UserError(f"{len(self.files)} unreadable image(s) in epoch {self.epoch + 1} "
                            f"(of {self.samples_per_epoch} on this rank; first: {first}: {why}) exceed "
                            f"data.max_bad_fraction={self.max_bad_fraction:g}; remove or replace them "
                            "(python -m pipelines.convert imagefolder lists every one) or raise the limit")


def first_readable(files: list[str], index: int, read: Callable[[str], T]) -> tuple[int, T, list[tuple[str, str]]]:
    """(index, value, skipped) for the first of files[index], files[index + 1], … (wrapping) that `read` accepts.

    `read` raises `pipelines.sources.CorruptImageError` for a file it cannot use; UserError when none can be read.
    """
    from pipelines.sources import CorruptImageError

    skipped: list[tuple[str, str]] = []
    for k in range(len(files)):
        i = (index + k) % len(files)
        try:
            return i, read(files[i]), skipped
        except CorruptImageError as err:
            skipped.append((files[i], err.reason))
    raise UserError(f"none of the {len(files)} image files can be read (first: {skipped[0][0]}: {skipped[0][1]})")


def encoded_bytes(path: str):
    """The file's bytes (numpy uint8) once a header parse and, for JPEG, the end-of-image marker look sound.

    A cheap check for decoders that cannot name a failing file (DALI): random bytes, empty and truncated JPEGs
    are caught here without decoding; CorruptImageError otherwise.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from pipelines.sources import CorruptImageError

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise CorruptImageError(path, "missing file") from None
    if data.size == 0:
        raise CorruptImageError(path, "empty file")
    raw = data.tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not an image") from None
    except (OSError, ValueError, SyntaxError) as err:  # worded as `pipelines.sources.decode_file` does
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        kind = "truncated" if "truncat" in detail.lower() else "corrupt"
        raise CorruptImageError(path, f"{kind} ({detail})") from None
    if w < 1 or h < 1:
        raise CorruptImageError(path, f"unsupported size {w}x{h}")
    if fmt == "JPEG" and b"\xff\xd9" not in raw[-1024:]:
        raise CorruptImageError(path, "truncated (JPEG without its end-of-image marker)")
    return data
