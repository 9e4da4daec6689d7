"""The BEiT blocked-mask kernel compiled for CUDA by numba: one thread per mask, launched on torch's current stream.

Imported only when masks are drawn on a CUDA device (or under numba's CUDA simulator in the tests), so CPU-only
users never initialise numba's CUDA target. The algorithm body is shared with the CPU kernel
(`mixmask.mask_kernels.make_block_mask_body`), so the same keys give the same masks.
"""

from __future__ import annotations

from numba import cuda

from mixmask.mask_kernels import make_block_mask_body

THREADS_PER_BLOCK = 128

_fill_one_gpu = make_block_mask_body(cuda.jit(device=True))


@cuda.jit
def _block_masks_kernel(keys, targets, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        _fill_one_gpu(out, i, int(keys[i, 0]), int(keys[i, 1]), int(targets[i]))


def launch_block_masks(keys, targets, out, stream=0) -> None:
    """Launch one thread per mask filling `out` in place; arguments are CUDA arrays (or host arrays in the simulator).

    Shape:
        keys: (n, 2) int64 in [0, 2**31); targets: (n,) int32 cell counts; out: (n, g, g) uint8, zeros on entry
    """
    n = out.shape[0]
    if n == 0:
        return
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    _block_masks_kernel[blocks, THREADS_PER_BLOCK, stream](keys, targets, out)


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
