"""Fused CPU kernel for `pipelines.photometric.Photometric`: one view's whole photometric chain in one compiled call.

The torch path runs each op as a separate pass over a float32 (B, 3, H, W) batch and materialises every
intermediate (the hue op alone makes some thirty full-size temporaries): on 2 CPU cores a MoCo v2 view of 32
images at 224 px takes ~75 ms, the hue op ~50 ms of it, more than FFCV's decode and both crops. Here one numba
kernel takes the uint8 (B, H, W, 3) batch and the parameters that `sample_params` already drew, and for each
image (images run in parallel) keeps a planar float32 copy that stays in cache while it goes through colour
jitter in the batch's order, grayscale, Gaussian blur, solarize and normalisation, writing float32 (B, H, W, 3)
= NCHW in channels_last memory: ~6 ms for the same view.

Every op repeats the torch path's float32 arithmetic expression for expression (same constants, same evaluation
order, no fused multiply-add: `fastmath=False`), so the colour ops agree with it to the last bit or so. Two
things are summed in another order and differ by float32 round-off only: the contrast op's mean grey level
(accumulated here in float64) and the blur's convolution. Ops work row by row on contiguous rows, one op per
inner loop, so LLVM can vectorise each loop (selects instead of branches); `error_model="numpy"` matters for
that: numba's default Python error model checks every float division for zero, which blocks vectorisation
(the hue loop runs ~18x slower with it).

Threads: `prange` over the images runs on numba's threading layer, while FFCV's decoder runs its own parallel
numba code from its loader thread at the same time. That needs a thread-safe layer, TBB or OpenMP, which numba
picks by default where either is installed; its fallback `workqueue` layer aborts the process on concurrent
launches, so `can_fuse` declines once numba reports that layer (FFCV's first batch has launched it by then).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from pipelines.augment import AugSpec
from pipelines.photometric import PhotometricParams, gaussian_kernels  # photometric imports this module lazily

# ITU-R 601-2 luma, as float32 like torch's scalar multiply on a float32 tensor uses them.
_L0, _L1, _L2 = np.float32(0.2989), np.float32(0.587), np.float32(0.114)
_ZERO, _ONE, _TWO, _FOUR, _SIX = (np.float32(v) for v in (0.0, 1.0, 2.0, 4.0, 6.0))
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3  # codes of `PhotometricParams.jitter_order`


@njit(fastmath=False, error_model="numpy", cache=True, inline="always")
def _clamp01(v):
    v = v if v > _ZERO else _ZERO
    return v if v < _ONE else _ONE


@njit(fastmath=False, error_model="numpy", cache=True, inline="always")
def _mod6(a):
    # torch.remainder(a, 6) for a in (-6, 12): fmod is exact there (a, or a - 6 by Sterbenz), then + 6 if negative.
    a = a - _SIX if a >= _SIX else a
    return a + _SIX if a < _ZERO else a


@njit(fastmath=False, error_model="numpy", cache=True)
def _blend_rows(r, g, b, factor, offset):
    """x * f + offset, clamped: brightness (offset 0) and contrast (offset = mean * (1 - f))."""
    for x in range(r.shape[0]):
        r[x] = _clamp01(r[x] * factor + offset)
        g[x] = _clamp01(g[x] * factor + offset)
        b[x] = _clamp01(b[x] * factor + offset)


@njit(fastmath=False, error_model="numpy", cache=True)
def _saturation_rows(r, g, b, factor):
    keep = _ONE - factor
    for x in range(r.shape[0]):
        grey = (r[x] * _L0 + g[x] * _L1 + b[x] * _L2) * keep
        r[x] = _clamp01(r[x] * factor + grey)
        g[x] = _clamp01(g[x] * factor + grey)
        b[x] = _clamp01(b[x] * factor + grey)


@njit(fastmath=False, error_model="numpy", cache=True)
def _hue_rows(r, g, b, shift):
    """`photometric.adjust_hue`: Pillow's RGB -> HSV sectors, shift, closed-form HSV -> RGB."""
    shift6 = _SIX * shift
    for x in range(r.shape[0]):
        rv, gv, bv = r[x], g[x], b[x]
        maxc = max(rv, max(gv, bv))
        minc = min(rv, min(gv, bv))
        crange = maxc - minc
        flat = crange == _ZERO
        s = crange / (_ONE if flat else maxc)
        inv_range = _ONE / (_ONE if flat else crange)
        if maxc == rv:
            h6 = (gv - bv) * inv_range
        elif maxc == gv:
            h6 = _TWO + (bv - rv) * inv_range
        else:
            h6 = _FOUR + (rv - gv) * inv_range
        h6 = _mod6(h6 + shift6)  # h6 in [-1, 5] and shift6 in [-3, 3]: the sum is in [-4, 8]
        vs = maxc * s
        k = _mod6(np.float32(5.0) + h6)
        r[x] = _clamp01(maxc - vs * _clamp01(min(k, _FOUR - k)))
        k = _mod6(np.float32(3.0) + h6)
        g[x] = _clamp01(maxc - vs * _clamp01(min(k, _FOUR - k)))
        k = _mod6(_ONE + h6)
        b[x] = _clamp01(maxc - vs * _clamp01(min(k, _FOUR - k)))


@njit(fastmath=False, error_model="numpy", cache=True)
def _jitter_rows(r, g, b, ops, start, stop, factors, contrast_offset):
    """Apply ops[start:stop] (codes as in `jitter_order`) to one row; `factors` is this image's (4,) draws."""
    for j in range(start, stop):
        op = ops[j]
        if op == _BRIGHTNESS:
            _blend_rows(r, g, b, factors[_BRIGHTNESS], _ZERO)
        elif op == _CONTRAST:
            _blend_rows(r, g, b, factors[_CONTRAST], contrast_offset)
        elif op == _SATURATION:
            _saturation_rows(r, g, b, factors[_SATURATION])
        else:
            _hue_rows(r, g, b, factors[_HUE])


@njit(fastmath=False, error_model="numpy", cache=True)
def _grey_sum(r, g, b):
    # float64: a float32 running sum over 50k pixels would drift from torch's pairwise float32 mean.
    total = 0.0
    for x in range(r.shape[0]):
        total += r[x] * _L0 + g[x] * _L1 + b[x] * _L2
    return total


@njit(fastmath=False, error_model="numpy", cache=True)
def _reflect(j, n):
    # torch's "reflect" padding (the edge is not repeated); valid for pad < n, which the caller checks.
    if j < 0:
        return -j
    return 2 * n - 2 - j if j >= n else j


@njit(fastmath=False, error_model="numpy", cache=True)
def _taps_into(acc, src, rows, offsets, weights):
    """acc[x] = sum_t weights[t] * src[rows[t], x + offsets[t]], four taps per sweep over acc.

    Taps outside and pixels inside keep the inner loop a vectorisable multiply-add; four taps per sweep quarter
    the loads and stores of `acc`, which bound a one-tap-per-sweep loop.
    """
    width = acc.shape[0]
    acc[:] = _ZERO
    k = weights.shape[0]
    quads = k - k % 4
    for t in range(0, quads, 4):
        # Shifted views, indexed by the loop counter alone: numba knows it is >= 0 and drops the
        # negative-index wrap-around that would stop vectorisation.
        r0, r1 = src[rows[t], offsets[t]:], src[rows[t + 1], offsets[t + 1]:]
        r2, r3 = src[rows[t + 2], offsets[t + 2]:], src[rows[t + 3], offsets[t + 3]:]
        w0, w1, w2, w3 = weights[t], weights[t + 1], weights[t + 2], weights[t + 3]
        for x in range(width):
            acc[x] += (w0 * r0[x] + w1 * r1[x]) + (w2 * r2[x] + w3 * r3[x])
    for t in range(quads, k):
        r0, w0 = src[rows[t], offsets[t]:], weights[t]
        for x in range(width):
            acc[x] += w0 * r0[x]


@njit(fastmath=False, error_model="numpy", cache=True)
def _blur_planes(planes, scratch, weights):
    """Separable blur of planar (3, H, W) in place, along W then H, reflect padding, as `gaussian_blur`."""
    _, height, width = planes.shape
    k = weights.shape[0]
    pad = k // 2
    padded = np.empty((1, width + 2 * pad), np.float32)
    taps = np.arange(k)  # along W, tap t of output x reads padded[x + t]
    first = np.zeros(k, np.int64)
    rows = np.empty(k, np.int64)
    for c in range(3):
        for y in range(height):
            row = planes[c, y]
            for x in range(width + 2 * pad):
                padded[0, x] = row[_reflect(x - pad, width)]
            _taps_into(scratch[c, y], padded, first, taps, weights)
        for y in range(height):
            for t in range(k):
                rows[t] = _reflect(y + t - pad, height)
            _taps_into(planes[c, y], scratch[c], rows, first, weights)


@njit(fastmath=False, error_model="numpy", cache=True)
def _load_row(src_row, r, g, b):
    """uint8 (W, 3) -> three float32 rows in [0, 1], as `x.float() / 255`."""
    flat = src_row.reshape(-1)  # flat stride-3 indexing is what LLVM vectorises as an interleaved access
    inv255 = np.float32(255.0)
    for x in range(r.shape[0]):
        r[x] = np.float32(flat[3 * x]) / inv255
        g[x] = np.float32(flat[3 * x + 1]) / inv255
        b[x] = np.float32(flat[3 * x + 2]) / inv255


@njit(fastmath=False, error_model="numpy", cache=True)
def _finish_row(r, g, b, out_row, solarize, threshold, mean, std):
    """Solarize (maybe), normalise, and interleave into one (W, 3) row of the channels_last output."""
    flat = out_row.reshape(-1)
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = std[0], std[1], std[2]
    for x in range(r.shape[0]):
        rv, gv, bv = r[x], g[x], b[x]
        if solarize:
            rv = _ONE - rv if rv >= threshold else rv
            gv = _ONE - gv if gv >= threshold else gv
            bv = _ONE - bv if bv >= threshold else bv
        flat[3 * x] = (rv - m0) / s0
        flat[3 * x + 1] = (gv - m1) / s1
        flat[3 * x + 2] = (bv - m2) / s2


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def photometric_kernel(src, out, ops, jitter, factors, gray, blur, weights, solarize, threshold, mean, std):
    """The photometric chain of `apply_photometric` + normalisation, one image per parallel iteration.

    Shape:
        src: (B, H, W, 3) uint8; out: (B, H, W, 3) float32, written; ops: (n,) int64 enabled jitter ops in the
        batch's order; jitter, gray, blur, solarize: (B,) bool per-sample switches (already ANDed with whether
        the spec enables the op); factors: (B, 4) float32 brightness, contrast, saturation, hue shift;
        weights: (B, k) float32 blur kernels; mean, std: (3,) float32
    """
    batch, height, width, _ = src.shape
    for i in prange(batch):
        planes = np.empty((3, height, width), np.float32)
        f = factors[i]
        n_ops = ops.shape[0] if jitter[i] else 0
        # Contrast needs the mean grey level of the image as it is when contrast runs: the ops before it make a
        # first pass that also sums the grey level, contrast and the rest a second pass.
        split = n_ops
        for j in range(n_ops):
            if ops[j] == _CONTRAST:
                split = j
        passes = 2 if split < n_ops else 1
        grey_total = 0.0
        for p in range(passes):
            start, stop = (0, split) if p == 0 else (split, n_ops)
            # torch: mean * (1 - f), both float32; only read in the second pass.
            offset = np.float32(grey_total / (height * width)) * (_ONE - f[_CONTRAST])
            last = p == passes - 1
            for y in range(height):
                r, g, b = planes[0, y], planes[1, y], planes[2, y]
                if p == 0:
                    _load_row(src[i, y], r, g, b)
                _jitter_rows(r, g, b, ops, start, stop, f, offset)
                if not last:
                    grey_total += _grey_sum(r, g, b)
                    continue
                if gray[i]:
                    for x in range(width):
                        luma = r[x] * _L0 + g[x] * _L1 + b[x] * _L2
                        r[x] = luma
                        g[x] = luma
                        b[x] = luma
                if not blur[i]:  # no blur: finish while the row is hot
                    _finish_row(r, g, b, out[i, y], solarize[i], threshold, mean, std)
        if blur[i]:
            _blur_planes(planes, np.empty_like(planes), weights[i])
            for y in range(height):
                _finish_row(planes[0, y], planes[1, y], planes[2, y], out[i, y], solarize[i], threshold, mean, std)


def can_fuse(images: torch.Tensor, spec: AugSpec) -> bool:
    """Whether the fused kernel handles this uint8 batch; otherwise the torch path runs (and reports the problem).

    Shape:
        images: (B, H, W, 3) or (B, 3, H, W) uint8 on the CPU
    """
    if images.ndim != 4 or images.dtype != torch.uint8 or images.device.type != "cpu":
        return False
    if _threading_layer() == "workqueue":  # not thread-safe: FFCV's thread may be in a parallel region now
        return False
    height, width = _hwc(images).shape[1:3]
    # torch's reflect padding refuses a pad as large as the side; leave that error to it.
    return spec.blur_p == 0 or spec.blur_kernel_size(width) // 2 < min(height, width)


def _threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet; the first one picks TBB or OpenMP where installed
        return None


def _hwc(images: torch.Tensor) -> torch.Tensor:
    # The same layout rule as `photometric.to_float_nchw`.
    if images.shape[-1] == 3 and images.shape[1] != 3:
        return images
    return images.permute(0, 2, 3, 1)


def fused_photometric(images: torch.Tensor, spec: AugSpec, params: PhotometricParams, mean: torch.Tensor,
                      std: torch.Tensor) -> torch.Tensor:
    """`apply_photometric` then `(x - mean) / std`, fused, with the parameters `sample_params` drew on the CPU.

    Shape:
        images: (B, H, W, 3) or (B, 3, H, W) uint8; mean, std: 3 values
        -> (B, 3, H, W) float32 in channels_last memory
    """
    src = _hwc(images).contiguous().numpy()  # strided views would cost numba its vectorised loads
    batch, height, width, _ = src.shape
    enabled = {_BRIGHTNESS: spec.brightness > 0, _CONTRAST: spec.contrast > 0, _SATURATION: spec.saturation > 0,
               _HUE: spec.hue > 0}
    ops = np.array([k for k in params.jitter_order if enabled[k]] if spec.has_jitter else [], dtype=np.int64)
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], dim=1)

    def switch(on: bool, mask: torch.Tensor) -> np.ndarray:
        return (mask if on else torch.zeros_like(mask)).numpy()

    blur = switch(spec.blur_p > 0, params.blur)
    kernel_size = spec.blur_kernel_size(width) if spec.blur_p > 0 else 1
    weights = gaussian_kernels(params.sigma, kernel_size)  # the torch path's weights, bit for bit
    out = torch.empty((batch, height, width, 3), dtype=torch.float32)
    photometric_kernel(src, out.numpy(), ops, switch(spec.has_jitter, params.jitter), factors.float().numpy(),
                       switch(spec.grayscale_p > 0, params.gray), blur, weights.numpy(),
                       switch(spec.solarize_p > 0, params.solarize), np.float32(spec.solarize_threshold),
                       mean.reshape(3).float().numpy(), std.reshape(3).float().numpy())
    return out.permute(0, 3, 1, 2)  # (B, 3, H, W) view of (B, H, W, 3) memory: channels_last
