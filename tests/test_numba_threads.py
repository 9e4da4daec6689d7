"""pipelines.numba_threads: a process on one CPU core that ran numba parallel code exits when its work is done.

With numba's default order (TBB first) both cases below finished their work and then hung in interpreter shutdown
(`unload_tbb`) on one core: CI's clean clone hit the second through `train.py`, which converted its kNN `.beton`
(the converter forks its writers) after importing ffcv had started numba's threads. Each case runs in a fresh
interpreter pinned to one core.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import multiprocessing, os, sys, threading
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import numpy as np
import pipelines  # noqa: F401  (sets numba's threading layer order)
import numba
os.environ["NUMBA_DEBUG_CACHE"] = "0"  # a NUMBA_ variable set later: numba's compiler reloads its configuration

@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

if sys.argv[1] == "thread":  # the first parallel region from a thread other than the main one, as FFCV's loader
    worker = threading.Thread(target=total, args=(np.ones(1000),))
    worker.start()
    worker.join()
else:  # a parallel region, then a fork, as a run that prepares a missing .beton after training
    total(np.ones(1000))
    child = multiprocessing.get_context("fork").Process(target=print)
    child.start()
    child.join()
print(numba.threading_layer())
"""


def probe(repo_root, case: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    return subprocess.run([sys.executable, "-c", PROBE, case], cwd=repo_root, capture_output=True, text=True,
                          env={**clean, **env}, timeout=90)


@pytest.mark.parametrize("case", ["thread", "fork"])
def test_a_one_core_process_that_ran_parallel_code_exits(repo_root, case):
    try:
        proc = probe(repo_root, case)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {case} case hung at exit (numba's threading layer at interpreter shutdown)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "omp"


def test_the_users_own_choice_of_layer_wins(repo_root):
    proc = probe(repo_root, "fork", NUMBA_THREADING_LAYER="workqueue")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "workqueue"
