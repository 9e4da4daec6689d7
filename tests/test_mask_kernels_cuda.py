"""The CUDA mask kernel's toolchain and launch: a missing NVVM/libdevice is one line naming the fix; no per-step noise.

The toolchain is simulated as missing by pointing `CUDA_HOME` nowhere, in a fresh interpreter (numba reads the
environment at import). numba's built-in CUDA target then finds no libdevice; `numba-cuda` finds the pip
`nvidia-*` wheels first, so there the same setting must leave the toolchain working (a cluster with only the driver
and pip wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

# The kernel's first launch, under the one-line error convention of every entry point (cli_entry).
_LAUNCH = textwrap.dedent(
    """
    import numpy as np
    from mixmask.errors import cli_entry
    from mixmask.core.mask_kernels_cuda import launch_block_masks, toolchain_problem

    @cli_entry
    def main():
        print("problem:", toolchain_problem(), flush=True)
        launch_block_masks(np.zeros((4, 2), np.int64), np.full(4, 8, np.int32), np.zeros((4, 4, 4), np.uint8))

    main()
    """
)


def _numba_cuda_implementation() -> str:
    from numba import cuda

    return getattr(cuda, "implementation", "Built-in")


def _launch_without_toolchain(repo_root) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "NUMBA_ENABLE_CUDASIM", "CONDA_PREFIX")}
    env.update(CUDA_HOME="/nonexistent/cuda", PYTHONPATH=str(repo_root))
    return subprocess.run([sys.executable, "-c", _LAUNCH], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_missing_toolchain_is_one_line_naming_the_fix(repo_root):
    if _numba_cuda_implementation() != "Built-in":
        pytest.skip("numba-cuda finds the pip wheels whatever CUDA_HOME says (see the next test)")
    proc = _launch_without_toolchain(repo_root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "problem: None" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: the CUDA mask kernel cannot be compiled")
    assert "numba-cuda[cu13]" in lines[0] and "libdevice" in lines[0]


def test_numba_cuda_finds_the_toolchain_in_pip_wheels(repo_root):
    if _numba_cuda_implementation() == "Built-in":
        pytest.skip("numba's built-in CUDA target is installed, not numba-cuda (requirements.txt)")
    proc = _launch_without_toolchain(repo_root)
    assert "problem: None" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "cannot be compiled" not in proc.stderr  # without a GPU the launch fails at the driver, not the toolchain


@pytest.mark.gpu
def test_small_launches_do_not_warn_about_occupancy():
    import torch

    from mixmask.core.masks import block_masks

    gen = torch.Generator(device="cuda").manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numba's NumbaPerformanceWarning fires below 128 blocks (< 16k masks)
        masks = block_masks(64, 8, 0.5, generator=gen, device="cuda")
        torch.cuda.synchronize()
    assert masks.shape == (64, 8, 8) and masks.any()
