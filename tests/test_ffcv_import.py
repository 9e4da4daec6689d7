"""pipelines.ffcv_import: a second process imports ffcv with numba's typed-dict helpers from the disk cache."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from pipelines.ffcv_import import import_ffcv
import_ffcv()
from numba.typed import typeddict
print(sum(typeddict._setitem.stats.cache_hits.values()), sum(typeddict._setitem.stats.cache_misses.values()))
"""


def test_the_second_import_reads_the_compiled_helpers_from_the_cache(repo_root, tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def hits_and_misses() -> tuple[int, int]:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=repo_root, capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        hits, misses = proc.stdout.split()
        return int(hits), int(misses)

    assert hits_and_misses() == (0, 1)  # compiled once (ffcv sets its IMAGE_MODES entries) and written
    assert hits_and_misses() == (1, 0)  # read back: nothing compiled
