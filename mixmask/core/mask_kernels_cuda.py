"""The BEiT blocked-mask kernel compiled for CUDA by numba: one thread per mask, launched on torch's current stream.

Imported only when masks are drawn on a CUDA device (or under numba's CUDA simulator in the tests), so CPU-only
users never initialise numba's CUDA target. The algorithm body is shared with the CPU kernel
(`mixmask.core.mask_kernels.make_block_mask_body`), so the same keys give the same masks.

Compiling needs NVVM and libdevice. numba's built-in CUDA target finds them only through conda, `CUDA_HOME` or a
system CUDA; `numba-cuda[cu13]` (requirements.txt) finds the pip `nvidia-*` wheels. When neither works, the first
launch fails with one line naming the fix (`toolchain_problem` tells why) instead of numba's traceback.
"""

from __future__ import annotations

import functools
import math
import warnings

from numba import cuda

from mixmask.core.mask_kernels import make_block_mask_body
from mixmask.errors import UserError

THREADS_PER_BLOCK = 128
# Lowest compute capability CUDA 13 compiles for; the probe only needs NVVM and libdevice to accept it.
_PROBE_CC = (7, 5)
TOOLCHAIN_FIX = ("the CUDA mask kernel cannot be compiled: numba finds no CUDA toolchain (NVVM, libdevice); "
                 "install numba-cuda with its CUDA extra (pip install 'numba-cuda[cu13]', as in requirements.txt), "
                 "use the conda environment.yml, or set CUDA_HOME to a CUDA toolkit")

_fill_one_gpu = make_block_mask_body(cuda.jit(device=True))


@cuda.jit
def _block_masks_kernel(keys, targets, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        _fill_one_gpu(out, i, int(keys[i, 0]), int(keys[i, 1]), int(targets[i]))


def _probe(x):
    x[0] = math.log(x[1]) + math.exp(x[2])  # libdevice functions, as the mask body's log-uniform aspect ratio


@functools.cache
def toolchain_problem() -> str | None:
    """None when numba can compile CUDA code that links libdevice (no GPU or driver needed), else why not, in one line.

    Cached: the answer does not change within a process.
    """
    from numba import types

    try:
        cuda.compile_ptx(_probe, (types.float64[:],), cc=_PROBE_CC)
    except Exception as err:  # numba raises NvvmSupportError, RuntimeError, OSError... for a missing toolchain
        reason = " ".join(str(err).split()).split(". ")[0]  # numba's first sentence; the rest is conda advice
        return f"{type(err).__name__}: {reason[:200]}"
    return None


def launch_block_masks(keys, targets, out, stream=0) -> None:
    """Launch one thread per mask filling `out` in place; arguments are CUDA arrays (or host arrays in the simulator).

    Raises UserError (one line naming the fix) when the launch fails because the CUDA toolchain is missing.

    Shape:
        keys: (n, 2) int64 in [0, 2**31); targets: (n,) int32 cell counts; out: (n, g, g) uint8, zeros on entry
    """
    n = out.shape[0]
    if n == 0:
        return
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    try:
        with warnings.catch_warnings():
            # One thread per mask gives fewer than numba's 128-block threshold at any batch below 16k: the launch is
            # tiny by design, so the low-occupancy NumbaPerformanceWarning would only repeat at every step.
            warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-utilization")
            _block_masks_kernel[blocks, THREADS_PER_BLOCK, stream](keys, targets, out)
    except Exception:
        problem = toolchain_problem()
        if problem is None:
            raise  # not the toolchain: numba's own error is the useful one
        raise UserError(f"{TOOLCHAIN_FIX} ({problem})") from None


def launch_block_masks_torch(keys, targets, out) -> None:
    """Launch on torch CUDA tensors without a host sync: zero-copy views, torch's current stream.

    `sync=False`: numba would otherwise synchronise the producer stream named in `__cuda_array_interface__`; the
    kernel runs on that very stream, so stream order already gives the dependency.
    """
    import torch

    stream = cuda.external_stream(torch.cuda.current_stream(out.device).cuda_stream)
    launch_block_masks(
        cuda.as_cuda_array(keys, sync=False),
        cuda.as_cuda_array(targets, sync=False),
        cuda.as_cuda_array(out, sync=False),
        stream,
    )
