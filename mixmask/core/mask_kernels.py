"""Compiled BEiT blocked-mask kernel: one algorithm body, compiled by numba for the CPU (here) and CUDA (elsewhere).

The body is plain Python written in the subset that both `numba.njit` and `numba.cuda.jit(device=True)` compile, so
the CPU and GPU paths run the same instructions. Randomness comes from two 31-bit key words per mask, drawn by torch
from the caller's `torch.Generator` on the target device, expanded inside the kernel by a counter-based hash. The
kernel therefore needs no host round trip on the GPU (no `.item()`, no copies), and the same keys give the same
masks on either device.

Integer arithmetic is written so that numba's wrapping int64 arithmetic and Python's unbounded ints (the CUDA
simulator runs the body as Python) agree: every product of two 32-bit values is masked back to 32 bits before it
is shifted, so the low bits are identical either way.

Reference: Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (2021), `MaskingGenerator` in the official
code (`masking_generator.py`): min 4 patches per block, aspect log-uniform in [0.3, 1/0.3], 10 attempts per block,
`top = randint(0, g - h)` with `h < g`, stop at the target count or when a round adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit

MIN_PATCHES_PER_BLOCK = 4  # BEiT default `min_num_patches`
MIN_ASPECT = 0.3  # BEiT default `min_aspect`; max aspect is its inverse
ATTEMPTS_PER_BLOCK = 10
UNIFORMS_PER_ATTEMPT = 4  # area, aspect, top, left: always consumed so attempt k uses counters 4k .. 4k+3

_MASK32 = 0xFFFFFFFF
_LOG_ASPECT = math.log(1.0 / MIN_ASPECT)  # symmetric range [-_LOG_ASPECT, _LOG_ASPECT]


def make_block_mask_body(jit: Callable) -> Callable:
    """Build the per-mask BEiT body with `jit` (e.g. `njit` or `cuda.jit(device=True)`) applied to every helper.

    The returned function fills `out[i]` (uint8, zero on entry) with the BEiT mask for key words `keys[i]` and the
    target cell count `targets[i]`; 1 marks a BEiT-generated ("masked" in BEiT) cell, which MixMask keeps from the
    sample's own image.
    """

    @jit
    def lowbias32(x):
        # Chris Wellons' "lowbias32" integer hash: a bijection on 32 bits with low bias.
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & _MASK32
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & _MASK32
        x = x ^ (x >> 16)
        return x

    @jit
    def uniform(key_a, key_b, counter):
        # Counter-based stream: a Weyl step keyed by key_a, hashed, re-keyed by key_b, hashed again.
        x = lowbias32(((counter * 0x9E3779B9) + key_a) & _MASK32)
        x = lowbias32(x ^ key_b)
        return x * (1.0 / 4294967296.0)  # [0, 1), 32 random bits

    @jit
    def fill_one(out, i, key_a, key_b, target):
        g = out.shape[1]
        count = 0
        counter = 0
        while count < target:
            max_patches = target - count
            delta = 0
            for _attempt in range(ATTEMPTS_PER_BLOCK):
                u_area = uniform(key_a, key_b, counter)
                u_aspect = uniform(key_a, key_b, counter + 1)
                u_top = uniform(key_a, key_b, counter + 2)
                u_left = uniform(key_a, key_b, counter + 3)
                counter += UNIFORMS_PER_ATTEMPT
                # random.uniform(a, b) = a + (b - a) * random(); b < a when fewer than 4 cells remain, as in BEiT.
                area = MIN_PATCHES_PER_BLOCK + (max_patches - MIN_PATCHES_PER_BLOCK) * u_area
                aspect = math.exp(-_LOG_ASPECT + 2.0 * _LOG_ASPECT * u_aspect)
                # floor(x + 0.5) instead of Python's half-to-even round: differs only on exact halves (measure 0).
                h = int(math.floor(math.sqrt(area * aspect) + 0.5))
                w = int(math.floor(math.sqrt(area / aspect) + 0.5))
                if h < g and w < g:
                    # randint(0, g - h) is inclusive: g - h + 1 choices; u < 1 keeps top <= g - h.
                    top = int(math.floor(u_top * (g - h + 1)))
                    left = int(math.floor(u_left * (g - w + 1)))
                    already = 0
                    for r in range(top, top + h):
                        for c in range(left, left + w):
                            already += int(out[i, r, c])  # int(): Python + uint8 stays uint8 (NEP 50)
                    new_cells = h * w - already
                    if new_cells > 0 and new_cells <= max_patches:
                        for r in range(top, top + h):
                            for c in range(left, left + w):
                                out[i, r, c] = 1
                        delta += new_cells
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta

    return fill_one


_fill_one_cpu = make_block_mask_body(njit(cache=True))


@njit(cache=True)
def _block_masks_cpu(keys, targets, out):
    for i in range(out.shape[0]):
        _fill_one_cpu(out, i, int(keys[i, 0]), int(keys[i, 1]), int(targets[i]))


def block_masks_cpu(keys: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
    """Fill `out` in place with one BEiT mask per row on the CPU.

    Shape:
        keys: (n, 2) int64 in [0, 2**31); targets: (n,) int32 cell counts; out: (n, g, g) uint8, zeros on entry
    """
    _block_masks_cpu(keys, targets, out)
