"""The two-view augmentation spec as plain data, and the named recipes (MoCo v1, MoCo v2, SimCLR, BYOL).

Every backend (FFCV, DALI, torchvision) reads the same `AugSpec`: the loader does the geometric part (random
resized crop + horizontal flip) and the photometric part runs batched on the device (`pipelines.photometric`),
except in the torchvision reference, which applies the same spec per image in PIL as the official code does.

Recipes and the strengths they use (the papers' numbers):
- `mocov1` (He et al. 2020, official `main_moco.py`): crop scale (0.2, 1), grayscale p 0.2, colour jitter
  (0.4, 0.4, 0.4, 0.4) always applied, flip, no blur. MoCo v1 grayscales *before* jittering; every backend here
  jitters first (the only difference: hue/saturation jitter of an image that is then grayscaled shifts its grey
  level a little).
- `mocov2` (Chen et al. 2020, "Improved baselines"): crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
  grayscale p 0.2, Gaussian blur p 0.5 with σ ∈ [0.1, 2], flip. This is the official MixMask recipe.
- `simclr` (Chen et al. 2020): crop scale (0.08, 1), jitter strength s = 0.5, i.e. (0.8s, 0.8s, 0.8s, 0.2s) =
  (0.4, 0.4, 0.4, 0.1) with p 0.8 (SimCLR's CIFAR strength, and the same as MoCo v2; the paper's ImageNet s = 1
  is `dataclasses.replace`-able), grayscale p 0.2, blur p 0.5 σ ∈ [0.1, 2], flip.
- `byol` (Grill et al. 2020, Table 6): crop scale (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale
  p 0.2, blur p 1.0 / 0.1, solarize p 0.0 / 0.2 (asymmetric views).

Small images (resolution <= 64: CIFAR 32 px, Tiny-ImageNet 64 px) drop the blur, as the CIFAR variants of these
methods do (a 3-pixel kernel only smears 32-px images); the crop scales stay the recipe's: (0.2, 1) for MoCo,
(0.08, 1) for SimCLR and BYOL.

Blur kernel: odd, about 10% of the image side (23 px at 224), as in SimCLR; σ is drawn per sample.
Normalisation: ImageNet mean/std by default for every source (override with `dataclasses.replace`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mixmask.errors import UserError, choice_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # resolutions up to this drop the Gaussian blur, and evaluate on the uncropped image
# Evaluation centre crop above SMALL_IMAGE_MAX: the crop is this share of the resized short side (ImageNet's 224
# of 256, as MoCo's and SimCLR's evaluations); every eval loader reads it from here.
EVAL_CROP_RATIO = 0.875


@dataclass(frozen=True)
class AugSpec:
    """The augmentation of one view: geometric (loader side) and photometric (device side) parameters."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range, sampled log-uniformly
    flip_p: float = 0.5
    brightness: float = 0.4  # factor ~ U[max(0, 1 - b), 1 + b], torchvision's ColorJitter convention
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # shift ~ U[-h, h] in turns of the hue circle, h <= 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output crop
    blur_kernel_frac: float = 0.1  # kernel side as a fraction of the image side (made odd)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # pixels >= threshold (in [0, 1]) are inverted; 128 on uint8
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"aug {name} must be a probability in [0, 1], got {value}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise UserError(f"aug crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 <= self.hue <= 0.5:
            raise UserError(f"aug hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise UserError("aug brightness, contrast and saturation must be >= 0")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise UserError(f"aug blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")

    @property
    def has_jitter(self) -> bool:
        return self.jitter_p > 0 and (self.brightness or self.contrast or self.saturation or self.hue) > 0

    def blur_kernel_size(self, resolution: int) -> int:
        """Odd kernel side, about `blur_kernel_frac` of the image (23 at 224 px), at least 3."""
        return max(3, int(self.blur_kernel_frac * resolution) | 1)


def _mocov1() -> tuple[AugSpec, AugSpec]:
    spec = AugSpec(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, jitter_p=1.0,
                   grayscale_p=0.2, blur_p=0.0)
    return spec, spec


def _mocov2() -> tuple[AugSpec, AugSpec]:
    spec = AugSpec(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8,
                   grayscale_p=0.2, blur_p=0.5)
    return spec, spec


def _simclr() -> tuple[AugSpec, AugSpec]:
    s = 0.5  # colour strength; jitter = (0.8 s, 0.8 s, 0.8 s, 0.2 s)
    spec = AugSpec(crop_scale=(0.08, 1.0), brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
                   jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    return spec, spec


def _byol() -> tuple[AugSpec, AugSpec]:
    base = AugSpec(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8,
                   grayscale_p=0.2)
    return replace(base, blur_p=1.0, solarize_p=0.0), replace(base, blur_p=0.1, solarize_p=0.2)


RECIPES: dict[str, Callable[[], tuple[AugSpec, AugSpec]]] = {
    "mocov1": _mocov1,
    "mocov2": _mocov2,
    "simclr": _simclr,
    "byol": _byol,
}


def recipe(name: str, resolution: int) -> tuple[AugSpec, AugSpec]:
    """The (view1, view2) specs of a named recipe at `resolution`; small images (<= 64 px) get no blur."""
    if name not in RECIPES:
        raise choice_error("augmentation recipe", name, RECIPES)
    if resolution < 8:
        raise UserError(f"resolution must be at least 8 px, got {resolution}")
    view1, view2 = RECIPES[name]()
    if resolution <= SMALL_IMAGE_MAX:
        view1, view2 = replace(view1, blur_p=0.0), replace(view2, blur_p=0.0)
    return view1, view2


def resolve(spec: str | tuple[AugSpec, AugSpec], resolution: int) -> tuple[AugSpec, AugSpec]:
    """A recipe name or an explicit (view1, view2) pair, as a pair of specs."""
    if isinstance(spec, str):
        return recipe(spec, resolution)
    view1, view2 = spec
    if not isinstance(view1, AugSpec) or not isinstance(view2, AugSpec):
        raise UserError("recipe must be a name or a pair of AugSpec")
    return view1, view2
