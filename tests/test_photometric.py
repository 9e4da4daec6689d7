"""Batched photometric ops against torchvision.transforms.v2.functional applied per image with the same parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines import photometric as P
from pipelines.augment import AugSpec, recipe

ATOL = 2e-5  # float32 round-off; the hue round trip differs from torchvision's by a few ulp at most


def _images(batch: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    x[0] = 0.5  # a flat grey image exercises the max == min branches of the HSV conversion
    x[1, :, :4] = 1.0  # saturated pixels exercise the clamps
    return x


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (P.adjust_brightness, TF.adjust_brightness, 0.3, 1.7),
        (P.adjust_contrast, TF.adjust_contrast, 0.3, 1.7),
        (P.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (P.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_match_torchvision_per_image(ours, theirs, low, high):
    x = _images()
    factors = torch.linspace(low, high, x.shape[0])
    got = ours(x.clone(), factors)
    for i in range(x.shape[0]):
        want = theirs(x[i], float(factors[i]))
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    x = _images()
    torch.testing.assert_close(P.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=ATOL, rtol=0)
    torch.testing.assert_close(P.solarize(x, 0.5), TF.solarize(x, 0.5), atol=0, rtol=0)


def test_blur_per_sample_sigma_matches_torchvision():
    x = _images(size=32)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    got = P.gaussian_blur(x, sigma, kernel_size=7)
    for i in range(x.shape[0]):
        want = TF.gaussian_blur(x[i], kernel_size=[7, 7], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_apply_uses_the_drawn_parameters_in_the_drawn_order():
    spec = recipe("byol", 224)[1]  # every op enabled: jitter, gray, blur 0.1, solarize 0.2
    x = _images(batch=8, size=32)
    g = torch.Generator().manual_seed(3)
    params = P.sample_params(spec, 8, g, torch.Generator().manual_seed(4), torch.device("cpu"))
    params.jitter[:] = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    params.gray[:] = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    params.blur[:] = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    params.solarize[:] = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    got = P.apply_photometric(x, spec, params)
    names = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    values = {0: params.brightness, 1: params.contrast, 2: params.saturation, 3: params.hue}
    for i in range(8):
        y = x[i]
        if params.jitter[i]:
            for k in params.jitter_order:
                y = names[k](y, float(values[k][i]))
        if params.gray[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if params.blur[i]:
            k = spec.blur_kernel_size(32)
            y = TF.gaussian_blur(y, kernel_size=[k, k], sigma=[float(params.sigma[i])] * 2)
        if params.solarize[i]:
            y = TF.solarize(y, 0.5)
        torch.testing.assert_close(got[i], y, atol=1e-4, rtol=0)


def test_module_normalises_to_dtype_channels_last_and_is_seeded():
    spec = recipe("mocov2", 224)[0]
    images = (torch.rand(16, 40, 40, 3) * 255).to(torch.uint8)  # HWC input, as FFCV's ToTensor gives it
    mod = P.Photometric(spec, device=torch.device("cpu"), seed=7, dtype=torch.bfloat16)
    out = mod(images)
    assert out.shape == (16, 3, 40, 40) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(spec.mean, spec.std))
    high = max((1 - m) / s for m, s in zip(spec.mean, spec.std))
    assert low - 0.05 <= out.float().min() and out.float().max() <= high + 0.05
    mod.reseed(7)
    torch.testing.assert_close(mod(images), out, atol=0, rtol=0)
    assert not torch.equal(mod(images), out)  # the stream moves on between batches


def test_rates_follow_the_spec():
    spec = AugSpec(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2)
    g = torch.Generator().manual_seed(0)
    params = P.sample_params(spec, 20000, g, torch.Generator(), torch.device("cpu"))
    for name, p in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.2)):
        assert abs(getattr(params, name).float().mean().item() - p) < 0.015, name
    assert 0.6 - 1e-6 <= params.brightness.min() and params.brightness.max() <= 1.4 + 1e-6
    assert -0.1 <= params.hue.min() and params.hue.max() <= 0.1
