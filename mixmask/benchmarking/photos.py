"""An ImageNet-like JPEG folder for loader benchmarks, made offline from scikit-image's bundled photographs.

Each file is a random crop of one of the photographs, resized to about 500×375 (ImageNet's typical size) and
saved at JPEG quality 90, in an ImageFolder layout (`root/train/<class>/*.jpg`, one class per photograph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_photo_folder(root: str | Path, num_images: int, *, size: tuple[int, int] = (500, 375), quality: int = 90,
                      seed: int = 0) -> Path:
    """Write `num_images` JPEGs under `root/train/<photo>/` (skipped when already complete); returns `root`."""
    from skimage import data

    root = Path(root)
    per_class = -(-num_images // len(PHOTOS))
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        folder = root / "train" / name
        if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= per_class:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        photo = np.asarray(getattr(data, name)())[..., :3]
        h, w = photo.shape[:2]
        for i in range(per_class):
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = Image.fromarray(photo[top:top + ch, left:left + cw])
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.resize(size, Image.Resampling.BILINEAR).save(folder / f"{name}_{i:05d}.jpg", quality=quality)
    return root
