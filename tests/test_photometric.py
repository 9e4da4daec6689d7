"""Batched photometric ops against torchvision.transforms.v2.functional applied per image with the same parameters."""

from __future__ import annotations

from dataclasses import replace

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


# The fused CPU kernel (pipelines.photometric_cpu) against the torch path it replaces on the CPU.

UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: compare in [0, 1] at ATOL
MIXED = AugSpec(hue=0.5, jitter_p=0.7, grayscale_p=0.4, blur_p=0.5, solarize_p=0.5, **UNIT)  # every op, masks mixed
SWITCHED_OFF = {
    "all on": {}, "no brightness": {"brightness": 0.0}, "no contrast": {"contrast": 0.0},
    "no saturation": {"saturation": 0.0}, "no hue": {"hue": 0.0}, "no jitter": {"jitter_p": 0.0},
    "no gray": {"grayscale_p": 0.0}, "no blur": {"blur_p": 0.0}, "no solarize": {"solarize_p": 0.0},
    "gray only": {"jitter_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0},
    # A threshold that pixels hit exactly: `>=` and `>` differ only there.
    "solarize at 128": {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 1.0,
                        "solarize_threshold": 128 / 255},
}
ORDERS = ([0, 1, 2, 3], [1, 3, 0, 2], [3, 2, 1, 0], [2, 0, 3, 1], [3, 0, 2, 1])  # contrast at every position


def _uint8_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, height, width, 3), generator=g, dtype=torch.uint8)
    x[0, : height // 2] = 128  # flat grey pixels: the max == min branches of the HSV conversion
    x[-1, :, :3] = 255  # saturated pixels: the clamps
    return x


def _torch_path(images: torch.Tensor, spec: AugSpec, params: P.PhotometricParams) -> torch.Tensor:
    x = P.apply_photometric(P.to_float_nchw(images), spec, params)
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _fused(images: torch.Tensor, spec: AugSpec, params: P.PhotometricParams) -> torch.Tensor:
    from pipelines.photometric_cpu import fused_photometric

    return fused_photometric(images, spec, params, torch.tensor(spec.mean), torch.tensor(spec.std))


@pytest.mark.parametrize("switch", list(SWITCHED_OFF))
@pytest.mark.parametrize(("batch", "height", "width"), [(6, 37, 29), (1, 31, 40), (3, 64, 64)])
def test_fused_kernel_matches_the_torch_path(switch, batch, height, width):
    spec = replace(MIXED, **SWITCHED_OFF[switch])
    images = _uint8_images(batch, height, width, seed=batch)
    for seed, order in enumerate(ORDERS):
        params = P.sample_params(spec, batch, torch.Generator().manual_seed(seed), torch.Generator(),
                                 torch.device("cpu"))
        params.jitter_order = order
        got = _fused(images, spec, params)
        assert got.shape == (batch, 3, height, width) and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, _torch_path(images, spec, params), atol=ATOL, rtol=0)


def test_fused_kernel_matches_torchvision_per_image():
    spec = AugSpec(hue=0.5, jitter_p=1.0, grayscale_p=0.3, blur_p=0.5, solarize_p=0.5, **UNIT)
    images = _uint8_images(8, 32, 32, seed=5)
    params = P.sample_params(spec, 8, torch.Generator().manual_seed(9), torch.Generator().manual_seed(2),
                             torch.device("cpu"))
    got = _fused(images, spec, params)
    x = P.to_float_nchw(images)
    steps = {0: (TF.adjust_brightness, params.brightness), 1: (TF.adjust_contrast, params.contrast),
             2: (TF.adjust_saturation, params.saturation), 3: (TF.adjust_hue, params.hue)}
    k = spec.blur_kernel_size(32)
    for i in range(8):
        y = x[i]
        if params.jitter[i]:
            for op in params.jitter_order:
                fn, values = steps[op]
                y = fn(y, float(values[i]))
        if params.gray[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if params.blur[i]:
            y = TF.gaussian_blur(y, kernel_size=[k, k], sigma=[float(params.sigma[i])] * 2)
        if params.solarize[i]:
            y = TF.solarize(y, 0.5)
        torch.testing.assert_close(got[i], y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_module_fused_cpu_equals_reference_and_keeps_the_streams(layout, channels_last):
    spec = recipe("byol", 224)[1]  # ImageNet normalisation, solarize on
    images = _uint8_images(5, 23, 41, seed=1)
    if layout == "chw":
        images = images.permute(0, 3, 1, 2).contiguous()
    fused = P.Photometric(spec, device=torch.device("cpu"), seed=4, channels_last=channels_last)
    reference = P.Photometric(spec, device=torch.device("cpu"), seed=4, channels_last=channels_last, fused_cpu=False)
    for _ in range(3):  # the same draws batch after batch
        got, want = fused(images), reference(images)
        assert got.dtype == torch.float32 and got.shape == want.shape == (5, 3, 23, 41)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, want, atol=ATOL / min(spec.std), rtol=0)


def test_module_dispatches_to_the_fused_kernel_only_for_uint8_to_float32(monkeypatch):
    import pipelines.photometric_cpu as C

    calls = []
    real = C.fused_photometric
    monkeypatch.setattr(C, "fused_photometric", lambda *a: calls.append(1) or real(*a))
    spec = recipe("mocov2", 224)[0]
    images = _uint8_images(2, 40, 40)
    P.Photometric(spec, device=torch.device("cpu"))(images)
    assert len(calls) == 1
    P.Photometric(spec, device=torch.device("cpu"), dtype=torch.bfloat16)(images)
    P.Photometric(spec, device=torch.device("cpu"))(images.float() / 255)
    P.Photometric(spec, device=torch.device("cpu"), fused_cpu=False)(images)
    assert len(calls) == 1
    assert not C.can_fuse(_uint8_images(2, 2, 40), spec)  # blur pad 2 >= height: the torch path reports it
    monkeypatch.setattr(C, "_threading_layer", lambda: "workqueue")  # aborts on launches from two threads
    assert not C.can_fuse(images, spec)
