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
    """The file's bytes (numpy uint8, read-only) once its start and end look like a whole image.

    A cheap check for decoders that cannot name a failing file (DALI): empty files, random bytes and truncated
    JPEG / PNG files are caught here without decoding; CorruptImageError otherwise. A file damaged inside is
    left to the decoder.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from pipelines.sources import CorruptImageError

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorruptImageError(path, "missing file") from None
    if not raw:
        raise CorruptImageError(path, "empty file")
    # JPEG and PNG by their first and last bytes (a few microseconds); other formats by PIL's header parse.
    if raw[:3] == b"\xff\xd8\xff":
        if b"\xff\xd9" not in raw[-1024:]:
            raise CorruptImageError(path, "truncated (JPEG without its end-of-image marker)")
        return np.frombuffer(raw, dtype=np.uint8)
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in raw[-64:]:
            raise CorruptImageError(path, "truncated (PNG without its end chunk)")
        return np.frombuffer(raw, dtype=np.uint8)
    try:  # BytesIO over bytes shares them (no copy); PIL reads the header only
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not an image") from None
    except (OSError, ValueError, SyntaxError) as err:  # worded as `pipelines.sources.decode_file` does
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        kind = "truncated" if "truncat" in detail.lower() else "corrupt"
        raise CorruptImageError(path, f"{kind} ({detail})") from None
    if w < 1 or h < 1:
        raise CorruptImageError(path, f"unsupported size {w}x{h}")
    return np.frombuffer(raw, dtype=np.uint8)
