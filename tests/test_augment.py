"""The augmentation recipes carry the papers' numbers; small images drop the blur; unknown names are one-line errors."""

from __future__ import annotations

import pytest

from mixmask.errors import UserError
from pipelines.augment import AugSpec, recipe


def test_mocov2_is_the_official_mixmask_recipe():
    v1, v2 = recipe("mocov2", 224)
    assert v1 == v2
    assert v1.crop_scale == (0.2, 1.0) and v1.flip_p == 0.5
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p) == (0.4, 0.4, 0.4, 0.1, 0.8)
    assert v1.grayscale_p == 0.2 and v1.blur_p == 0.5 and v1.blur_sigma == (0.1, 2.0) and v1.solarize_p == 0
    assert v1.blur_kernel_size(224) == 23


def test_mocov1_jitters_always_and_never_blurs():
    v1, _ = recipe("mocov1", 224)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p) == (0.4, 0.4, 0.4, 0.4, 1.0)
    assert v1.grayscale_p == 0.2 and v1.blur_p == 0


def test_simclr_uses_strength_half():
    v1, _ = recipe("simclr", 224)
    assert v1.crop_scale == (0.08, 1.0)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))


def test_byol_is_asymmetric():
    v1, v2 = recipe("byol", 224)
    assert (v1.blur_p, v2.blur_p) == (1.0, 0.1)
    assert (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)


@pytest.mark.parametrize("name", ["mocov1", "mocov2", "simclr", "byol"])
@pytest.mark.parametrize("resolution", [32, 64])
def test_small_images_drop_blur_keep_the_rest(name, resolution):
    small, big = recipe(name, resolution), recipe(name, 224)
    for s, b in zip(small, big):
        assert s.blur_p == 0
        assert (s.crop_scale, s.grayscale_p, s.solarize_p, s.jitter_p) == (
            b.crop_scale, b.grayscale_p, b.solarize_p, b.jitter_p)


def test_unknown_recipe_names_the_choices():
    with pytest.raises(UserError, match=r"unknown augmentation recipe 'mocov3'.*did you mean 'mocov[12]'.*valid: "):
        recipe("mocov3", 224)


def test_impossible_values_are_user_errors():
    with pytest.raises(UserError, match="flip_p"):
        AugSpec(flip_p=1.5)
    with pytest.raises(UserError, match="crop_scale"):
        AugSpec(crop_scale=(0.5, 0.2))
