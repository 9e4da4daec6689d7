"""Mistakes a user can make get one line on stderr, no traceback, and a non-zero exit; machine limits adapt.

Every case runs the real command line (`train.py`, `bench.py`, `python -m mixmask.export`) in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(repo_root: Path, *args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kwargs)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one line on stderr holding every needle; returns that line."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- 12. worker counts adapt to the cores this process may use

def test_paper_preset_runs_on_a_machine_with_fewer_cores_than_its_workers(repo_root, tmp_path):
    """cifar100-* asks for 8 loader workers; FFCV's numba threads cannot exceed the usable cores (2 here, by
    affinity, whatever the machine)."""
    cores = min(2, len(os.sched_getaffinity(0)))
    proc = run(repo_root, "train.py", "--preset", "cifar100-moco-mixmask", "data.source=synthetic",
               "data.synthetic_images=64", "data.synthetic_val_images=32", "data.batch_size=16",
               "data.resolution=16", "run.max_steps=2", "run.device=cpu", "method.queue_size=64",
               "run.knn_every=0", "run.progress=false", "run.tensorboard=false",
               f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={tmp_path / 'run'}",
               preexec_fn=lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: data.workers=8 lowered to {cores}" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
