"""Batched photometric augmentation on the device, with per-sample random parameters from a torch.Generator.

Each op follows torchvision's semantics on float images in [0, 1] (`torchvision.transforms.v2.functional`):
brightness = blend with black, contrast = blend with the mean of the grayscale image, saturation = blend with the
grayscale image, hue = shift in HSV, grayscale = ITU-R 601-2 luma (0.2989, 0.587, 0.114), Gaussian blur with a
reflect-padded separable kernel, solarize = invert pixels >= threshold. The ops of ColorJitter run in a random
order drawn once per batch (torchvision draws it per image; per batch keeps the work batched and the expected
statistics are the same because the order is uniform over batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.augment import AugSpec

_LUMA = (0.2989, 0.587, 0.114)


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W) to float32 (B,3,H,W) in [0, 1].

    Shape:
        images: (B, H, W, 3) or (B, 3, H, W) uint8
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-d batch of images, got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma, repeated on three channels.

    Shape:
        images: (B, 3, H, W) float in [0, 1]
    """
    r, g, b = images.unbind(dim=1)
    luma = r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]
    return luma.unsqueeze(1).expand_as(images)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale by a per-sample factor, clamp to [0, 1].

    Shape:
        images: (B, 3, H, W) float; factor: (B,)
    """
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level of each image.

    Shape:
        images: (B, 3, H, W) float; factor: (B,)
    """
    mean = grayscale(images)[:, :1].mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (images * f + mean * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image.

    Shape:
        images: (B, 3, H, W) float; factor: (B,)
    """
    f = _per_sample(factor)
    return (images * f + grayscale(images) * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by a per-sample shift in turns (HSV as in Pillow and torchvision).

    Shape:
        images: (B, 3, H, W) float in [0, 1]; shift: (B,) in [-0.5, 0.5]
    """
    r, g, b = images.unbind(dim=1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    crange = maxc - minc
    eqc = crange == 0
    s = crange / torch.where(eqc, 1.0, maxc)
    inv_range = 1.0 / torch.where(eqc, 1.0, crange)
    r_is_max = maxc == r
    g_is_max = (maxc == g) & ~r_is_max
    # Hue in sixths of a turn, Pillow's sector formula: (g - b) / range if red is the max, 2 + (b - r) / range if
    # green, 4 + (r - g) / range if blue (a flat pixel gets 0 and keeps s = 0, so its hue never matters).
    h6 = torch.where(r_is_max, (g - b) * inv_range,
                     torch.where(g_is_max, 2.0 + (b - r) * inv_range, 4.0 + (r - g) * inv_range))
    h6 = torch.remainder(h6 + 6.0 * shift.view(-1, 1, 1), 6.0)

    # HSV back to RGB in closed form, all three channels at once: c_n = v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + h6) mod 6 with n = 5, 3, 1 for R, G, B (the same values as the sector table, with fewer passes).
    # The offsets are Python scalars: a tensor built from a list here would be a blocking host-to-device copy.
    k = torch.remainder(torch.stack((h6 + 5.0, h6 + 3.0, h6 + 1.0), dim=1), 6.0)
    f = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return (v - (v * s.unsqueeze(1)) * f).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-d Gaussian kernels, one per sample (torchvision's sampling grid).

    Shape:
        sigma: (B,) -> (B, kernel_size)
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1).float()).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample σ and reflect padding, as one grouped convolution per axis.

    Shape:
        images: (B, 3, H, W) float; sigma: (B,)
    """
    batch, channels, height, width = images.shape
    kernels = gaussian_kernels(sigma, kernel_size).repeat_interleave(channels, dim=0)  # (B*3, k)
    pad = kernel_size // 2
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, 1, kernel_size).to(x.dtype), groups=batch * channels)
    x = F.conv2d(x, kernels.view(-1, 1, kernel_size, 1).to(x.dtype), groups=batch * channels)
    return x.view(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the pixels at or above `threshold`.

    Shape:
        images: (B, 3, H, W) float in [0, 1]
    """
    return torch.where(images >= threshold, 1.0 - images, images)


@dataclass
class PhotometricParams:
    """Per-sample random draws for one batch (identity values where an op is not applied).

    Shape:
        every tensor: (B,); `jitter_order` is a permutation of the four ColorJitter ops (0 b, 1 c, 2 s, 3 h)
    """

    jitter: torch.Tensor  # bool
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    jitter_order: list[int]
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor
    solarize: torch.Tensor  # bool


def _uniform(low: float, high: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def sample_params(spec: AugSpec, batch: int, generator: torch.Generator, order_generator: torch.Generator,
                  device: torch.device) -> PhotometricParams:
    """Draw one batch of parameters; the jitter order comes from a CPU generator so drawing it never syncs."""

    def coin(p: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device) < p

    return PhotometricParams(
        jitter=coin(spec.jitter_p),
        brightness=_uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness, batch, generator, device),
        contrast=_uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast, batch, generator, device),
        saturation=_uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation, batch, generator, device),
        hue=_uniform(-spec.hue, spec.hue, batch, generator, device),
        jitter_order=torch.randperm(4, generator=order_generator).tolist(),
        gray=coin(spec.grayscale_p),
        blur=coin(spec.blur_p),
        sigma=_uniform(spec.blur_sigma[0], spec.blur_sigma[1], batch, generator, device),
        solarize=coin(spec.solarize_p),
    )


def _masked(images: torch.Tensor, mask: torch.Tensor, op, *args: torch.Tensor) -> torch.Tensor:
    """Apply `op` to the samples where `mask` is set (on CPU, writing into `images`).

    On CUDA every sample is computed and selected with `where` (no host sync in the loader's stream); on CPU only
    the selected samples are computed, which is what makes the fallback affordable.
    """
    if images.device.type == "cuda":
        return torch.where(_per_sample(mask), op(images, *args), images)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return images
    images[idx] = op(images[idx], *(a[idx] for a in args))
    return images


def apply_photometric(images: torch.Tensor, spec: AugSpec, params: PhotometricParams, *,
                      inplace: bool = False) -> torch.Tensor:
    """Colour jitter (random order), grayscale, blur, solarize on float images in [0, 1]; no normalisation.

    `inplace=True` lets the CPU path overwrite `images` (the module passes its own fresh copy).

    Shape:
        images: (B, 3, H, W) float in [0, 1] -> same
    """
    if not inplace:
        images = images.clone()
    if spec.has_jitter:
        ops = {
            0: (adjust_brightness, params.brightness, spec.brightness > 0),
            1: (adjust_contrast, params.contrast, spec.contrast > 0),
            2: (adjust_saturation, params.saturation, spec.saturation > 0),
            3: (adjust_hue, params.hue, spec.hue > 0),
        }

        def jitter(x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
            for k in params.jitter_order:
                fn, _, enabled = ops[k]
                if enabled:
                    x = fn(x, factors[k])
            return x

        images = _masked(images, params.jitter, jitter, params.brightness, params.contrast, params.saturation,
                         params.hue)
    if spec.grayscale_p > 0:
        images = _masked(images, params.gray, lambda x: grayscale(x).contiguous())
    if spec.blur_p > 0:
        kernel = spec.blur_kernel_size(images.shape[-1])
        images = _masked(images, params.blur, lambda x, s: gaussian_blur(x, s, kernel), params.sigma)
    if spec.solarize_p > 0:
        images = _masked(images, params.solarize, lambda x: solarize(x, spec.solarize_threshold))
    return images


class Photometric(nn.Module):
    """One view's photometric augmentation + normalisation, batched on the device.

    On the CPU, a uint8 batch with a float32 output goes through the fused numba kernel of
    `pipelines.photometric_cpu` (same draws, same results up to float32 round-off); `fused_cpu=False`
    keeps the torch ops, which stay the reference and the CUDA path.

    Shape:
        forward: (B, H, W, 3) or (B, 3, H, W) uint8 -> (B, 3, H, W) `dtype`, normalised, channels_last if asked
    """

    def __init__(self, spec: AugSpec, *, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, fused_cpu: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.fused_cpu = fused_cpu
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.generator = torch.Generator(device=self.device)
        self.order_generator = torch.Generator()
        self.register_buffer("mean", torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1), persistent=False)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart both random streams (the loader calls this at each epoch so a resumed run repeats the draws)."""
        self.generator.manual_seed(seed)
        self.order_generator.manual_seed(seed + 1)

    def _fuse(self, images: torch.Tensor) -> bool:
        if not (self.fused_cpu and self.device.type == "cpu" and self.dtype == torch.float32):
            return False
        # Imported here so the CUDA path never loads numba's CPU kernels.
        from pipelines.photometric_cpu import can_fuse

        return can_fuse(images, self.spec)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self._fuse(images):
            from pipelines.photometric_cpu import fused_photometric

            params = sample_params(self.spec, images.shape[0], self.generator, self.order_generator, self.device)
            x = fused_photometric(images, self.spec, params, self.mean, self.std)
            return x if self.channels_last else x.contiguous()
        x = to_float_nchw(images)
        params = sample_params(self.spec, x.shape[0], self.generator, self.order_generator, self.device)
        x = apply_photometric(x, self.spec, params, inplace=images.dtype == torch.uint8)  # uint8 → fresh copy
        x = ((x - self.mean) / self.std).to(self.dtype)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()
