"""Import ffcv without recompiling numba's typed-dict helpers in every process.

ffcv builds a `numba.typed.Dict` when it is imported (`ffcv.fields.rgb_image.IMAGE_MODES`) and reads it when a
loader generates its code; numba compiles its dict helpers for that each time, about 3 s of CPU per process (every
`train.py`, `eval.py` and `bench.py` run on the ffcv backend, and the converter). Those helpers are plain `njit`
functions, so numba can keep the compiled code on disk like any `cache=True` function: after the first process,
ffcv imports in well under a second.
"""

from __future__ import annotations

from types import ModuleType


def cache_typed_dict_helpers() -> None:
    """Turn on numba's on-disk cache for its typed-dict helpers; nothing happens where it cannot cache."""
    from numba.core.dispatcher import Dispatcher
    from numba.typed import typeddict

    for value in vars(typeddict).values():
        if isinstance(value, Dispatcher):
            try:
                value.enable_caching()
            except RuntimeError:  # no writable cache location (read-only install, no NUMBA_CACHE_DIR)
                return


def import_ffcv() -> ModuleType:
    """`ffcv`, imported with the typed-dict helpers cached (call before any `from ffcv ... import`)."""
    cache_typed_dict_helpers()
    import ffcv

    return ffcv
