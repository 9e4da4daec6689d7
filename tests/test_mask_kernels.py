"""The compiled BEiT kernel: CPU determinism, CPU == CUDA kernel (numba's simulator here, a real GPU under `gpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mixmask.core.mask_kernels import block_masks_cpu


def _inputs(n: int, grid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**31, size=(n, 2), dtype=np.int64)
    targets = rng.integers(0, grid * grid + 1, size=n).astype(np.int32)
    return keys, targets


def _cpu(keys: np.ndarray, targets: np.ndarray, grid: int) -> np.ndarray:
    out = np.zeros((len(keys), grid, grid), dtype=np.uint8)
    block_masks_cpu(keys, targets, out)
    return out


def test_cpu_kernel_is_a_function_of_the_keys():
    keys, targets = _inputs(200, 8, seed=0)
    first, second = _cpu(keys, targets, 8), _cpu(keys, targets, 8)
    assert np.array_equal(first, second)
    # Rows are independent: masks do not depend on their position in the batch.
    assert np.array_equal(_cpu(keys[::-1].copy(), targets[::-1].copy(), 8), first[::-1])


def test_cpu_kernel_never_exceeds_the_target_and_only_writes_ones():
    keys, targets = _inputs(500, 8, seed=1)
    out = _cpu(keys, targets, 8)
    assert set(np.unique(out)) <= {0, 1}
    assert (out.reshape(500, -1).sum(1) <= targets).all()
    # A target of zero is an empty mask; a 2x2 grid only ever gets single cells (h, w < 2).
    assert out[targets == 0].sum() == 0


def test_cpu_kernel_blocks_fit_strictly_inside_the_grid():
    # BEiT's strict fit (h < g, w < g): at grid 2 only 1x1 blocks exist, and a 1x1 block needs a sampled area
    # below 2.25, so a target of 4 (area drawn in [4, 4]) never places anything, a target of 1 at most one cell.
    keys = np.random.default_rng(2).integers(0, 2**31, size=(2000, 2), dtype=np.int64)
    assert _cpu(keys, np.full(2000, 4, dtype=np.int32), 2).sum() == 0
    cells = _cpu(keys, np.full(2000, 1, dtype=np.int32), 2).reshape(2000, -1).sum(1)
    assert set(np.unique(cells)) == {0, 1}


_SIMULATOR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from numba import config
    assert config.ENABLE_CUDASIM
    from mixmask.core.mask_kernels_cuda import launch_block_masks
    keys = np.array(json.loads(sys.argv[1]), dtype=np.int64)
    targets = np.array(json.loads(sys.argv[2]), dtype=np.int32)
    out = np.zeros((len(keys), int(sys.argv[3]), int(sys.argv[3])), dtype=np.uint8)
    launch_block_masks(keys, targets, out)
    print(json.dumps(out.tolist()))
    """
)


@pytest.mark.parametrize("grid", [2, 8, 14])
def test_cuda_kernel_in_simulator_matches_cpu_kernel(grid, repo_root):
    # NUMBA_ENABLE_CUDASIM must be set before numba is imported, hence a fresh interpreter.
    keys, targets = _inputs(40, grid, seed=grid)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [sys.executable, "-c", _SIMULATOR_SCRIPT, json.dumps(keys.tolist()), json.dumps(targets.tolist()), str(grid)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    simulated = np.array(json.loads(result.stdout.strip().splitlines()[-1]), dtype=np.uint8)
    expected = _cpu(keys, targets, grid)
    assert expected.sum() > 0
    assert np.array_equal(simulated, expected)


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_kernel_on_device():
    from mixmask.core.mask_kernels_cuda import launch_block_masks_torch

    keys, targets = _inputs(4096, 8, seed=3)
    out = torch.zeros((4096, 8, 8), dtype=torch.uint8, device="cuda")
    launch_block_masks_torch(torch.from_numpy(keys).cuda(), torch.from_numpy(targets).cuda(), out)
    assert np.array_equal(out.cpu().numpy(), _cpu(keys, targets, 8))


@pytest.mark.gpu
def test_masks_and_mix_on_cuda_do_not_sync_the_host():
    from mixmask.core.masks import block_masks, discrete_masks
    from mixmask.core.mixing import mix, random_permutation, reverse_permutation
    from mixmask.core.operator import MixingOperator

    # Built outside the guarded region: the constructor's one-time CPU Monte Carlo check of the blocked rule.
    operator = MixingOperator("mixmask-unmix", mask_kind="block", grid_size=8, share="pair")
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    block_masks(256, 8, 0.5, generator=gen, device="cuda")  # compile and load the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = block_masks(256, 8, 0.5, generator=gen, device="cuda")
        mixed, lam = mix(images, masks, reverse_permutation(256, "cuda"))
        discrete = discrete_masks(256, 8, (0.3, 0.7), generator=gen, device="cuda")
        mix(images, discrete, random_permutation(256, gen, "cuda"))
        operator(images, gen)  # random matching, per-pair masks, Un-Mix
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert masks.is_cuda and mixed.dtype == torch.bfloat16
    assert abs(lam.mean().item() - 0.5) < 0.02
