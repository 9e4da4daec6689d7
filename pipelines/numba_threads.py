"""Numba's threading layer for FFCV's loader and the fused photometric kernel: OpenMP first, then TBB.

Both run numba `prange` code, FFCV's from its loader thread while the main thread runs the fused kernel, so the
layer must be thread-safe: OpenMP or TBB (numba's `workqueue` fallback aborts on concurrent launches). Numba's
default order tries TBB first, and with TBB a process can finish its work and then never exit: interpreter
shutdown waits in numba's `unload_tbb` for ever when the process may use one CPU core (`taskset`, a Slurm job with
one CPU, a container's CPU limit) and either

- the layer started and the process then forked: importing ffcv starts it (`ffcv.pipeline.compiler` sets numba's
  thread count at import), so a run that converts a missing `.beton` (the converter forks its writers) hung after
  writing its outputs, on CI's clean clone; a DataLoader's workers fork too; or
- the first parallel region ran from a thread other than the main one (FFCV's loader thread; numba issue 10556,
  also seen with oneTBB 2022.3 under cgroup CPU limits).

Both hang here with TBB 2021.8 and exit at once with OpenMP (`tests/test_numba_threads.py`), so OpenMP goes first;
TBB stays the fallback where no OpenMP runtime loads, workqueue the last resort. The order is set as numba's own
environment variable, which numba reads when it is imported and again whenever its configuration reloads (its
compiler reloads it when a `NUMBA_*` variable changed, which would undo a plain `numba.config` assignment), and
which child processes inherit. `pipelines/__init__.py` calls this, so it runs before any data code imports numba
or ffcv. A user's own `NUMBA_THREADING_LAYER` or `NUMBA_THREADING_LAYER_PRIORITY` wins.
"""

from __future__ import annotations

import os
import sys

PRIORITY = ("omp", "tbb", "workqueue")
USER_SETTINGS = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")


def prefer_openmp() -> None:
    """Make numba try OpenMP before TBB, unless the user chose a layer or an order."""
    if any(name in os.environ for name in USER_SETTINGS):
        return
    os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = " ".join(PRIORITY)
    numba = sys.modules.get("numba")
    if numba is not None and numba.config.THREADING_LAYER == "default":  # imported already: takes effect now
        numba.config.THREADING_LAYER_PRIORITY = list(PRIORITY)
