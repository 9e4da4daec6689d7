"""The README's main command end to end: the demo preset trains MoCo v2 + MixMask on the synthetic default and its
backbone beats a random-init one on kNN (the acceptance claim of the demo, checked rather than assumed).

The demo is the suite's longest run (minutes) and most other tests leave a core idle (one-thread subprocesses), so
conftest.py starts this very command in the background when the session starts and runs this test last: the test
waits for the run and checks what it wrote. Run alone (`pytest tests/test_demo.py`) it is the same command, started
then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TIMEOUT_S = 1800  # how long the test waits for the run (about 5 minutes alone on 2 idle cores, more when busy)


def demo_command(repo_root: Path, out: Path) -> list[str]:
    return [sys.executable, "train.py", "--preset", "demo", "run.progress=false", "run.tensorboard=false",
            f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}"]


def start_demo(repo_root: Path, out: Path) -> subprocess.Popen:
    """The demo command as a child process; its stderr goes to `out`.stderr (a pipe nobody reads could fill)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".stderr"), "w") as stderr:
        return subprocess.Popen(demo_command(repo_root, out), cwd=repo_root, stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_demo_trains_a_backbone_that_beats_random_init(demo_run):
    proc, out = demo_run
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    stderr = out.with_suffix(".stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads((out / "final_knn.json").read_text())
    trained, random_init = result["knn_top1"], result["knn_top1_random_init"]
    print(f"demo kNN top-1: trained {trained:.1f}% vs random init {random_init:.1f}%")
    assert trained > random_init + 3.0, (trained, random_init)  # measured: 100.0 vs 93.4
    for name in ("loss_curve.png", "masks.png", "backbone.pt", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
