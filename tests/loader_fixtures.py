"""Tiny datasets with known content for the loader tests, built once per session under a pytest tmp folder.

Gradient images make every geometric augmentation measurable: red rises left to right (flip and horizontal crop
extent), green rises top to bottom (vertical crop extent), blue encodes the label (image/label alignment).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.augment import AugSpec

GRADIENT_SIZE = (48, 64)  # (H, W): not square, as photographs are
NUM_CLASSES = 3
IMAGES_PER_CLASS = 14  # 42 images: not a multiple of 2 ranks x batch 4, so padding and tails are exercised


def label_blue(label: int) -> int:
    return 40 + 80 * label


def gradient_image(label: int, size: tuple[int, int] = GRADIENT_SIZE) -> np.ndarray:
    """HWC uint8: R = column ramp, G = row ramp, B = label code.

    Shape:
        returns (H, W, 3) uint8
    """
    h, w = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.round(np.linspace(0, 255, w))[None, :]
    img[..., 1] = np.round(np.linspace(0, 255, h))[:, None]
    img[..., 2] = label_blue(label)
    return img


def write_gradient_folder(root: Path, *, quality: int = 95) -> Path:
    """An ImageFolder `root/train/<class>/*.jpg` of gradient images; returns `root/train`."""
    train = root / "train"
    for c in range(NUM_CLASSES):
        (train / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for k in range(IMAGES_PER_CLASS):
            Image.fromarray(gradient_image(c)).save(train / f"class_{c}" / f"img_{k:03d}.jpg", quality=quality)
    return train


def write_gradient_beton(folder_root: Path, out: Path) -> Path:
    """The gradient folder through the converter (raw mode: the decoded JPEG pixels kept exact)."""
    from pipelines.convert import convert

    convert("imagefolder", out, root=folder_root, split="train", write_mode="raw", workers=1)
    return out


GEOMETRY_ONLY = AugSpec(crop_scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.3, blur_p=0.0,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def measure_views(view: np.ndarray) -> dict[str, np.ndarray]:
    """Read flip, grayscale and crop extent off gradient views normalised with mean 0, std 1.

    Shape:
        view: (B, 3, H, W) float in [0, 1]
    """
    r, g, b = view[:, 0], view[:, 1], view[:, 2]
    gray = (np.abs(r - g).max(axis=(1, 2)) < 0.02) & (np.abs(g - b).max(axis=(1, 2)) < 0.02)
    row_r = r.mean(axis=1)  # (B, W): the red ramp along the columns
    flipped = row_r[:, 0] > row_r[:, -1]
    width_frac = np.abs(row_r[:, -1] - row_r[:, 0])
    col_g = g.mean(axis=2)
    height_frac = np.abs(col_g[:, -1] - col_g[:, 0])
    return {"gray": gray, "flipped": flipped, "area": width_frac * height_frac, "blue": b.mean(axis=(1, 2))}


# ---------------------------------------------------------------- checks shared by the per-backend test files
def collect(loader) -> dict[str, np.ndarray]:
    """One pass over a two-view loader, as numpy arrays (views in NCHW)."""
    out: dict[str, list] = {"view1": [], "view2": [], "labels": [], "index": []}
    for batch in loader:
        for key in out:
            out[key].append(getattr(batch, key).float().numpy() if key.startswith("view") else
                            getattr(batch, key).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def check_batch_contract(loader, batch_size: int, resolution: int, num_samples: int) -> None:
    """Shapes, dtypes, layout, value range, labels matching the pixels, and the two views differing."""
    batch = next(iter(loader))
    for view in (batch.view1, batch.view2):
        assert view.shape == (batch_size, 3, resolution, resolution)
        assert view.dtype == torch.float32 and view.is_contiguous(memory_format=torch.channels_last)
        assert float(view.min()) >= -0.01 and float(view.max()) <= 1.01  # GEOMETRY_ONLY: mean 0, std 1
    assert batch.labels.dtype == torch.long and batch.index.dtype == torch.long
    assert batch.labels.shape == batch.index.shape == (batch_size,)
    assert int(batch.index.min()) >= 0 and int(batch.index.max()) < num_samples
    for view in (batch.view1, batch.view2):
        m = measure_views(view.float().numpy())
        colour = ~m["gray"]
        expected = np.array([label_blue(int(c)) / 255 for c in batch.labels])
        np.testing.assert_allclose(m["blue"][colour], expected[colour], atol=0.03)
    assert not torch.equal(batch.view1, batch.view2)


def check_shards_and_epochs(make_loader, num_samples: int, batch_size: int, epochs: int = 3) -> None:
    """Two ranks: same step count, disjoint shards covering the dataset, every epoch; epochs reorder."""
    loaders = [make_loader(rank=r, world_size=2, seed=0) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == (-(-num_samples // 2)) // batch_size
    orders = []
    for epoch in range(epochs):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            index = np.concatenate([b.index.numpy() for b in loader])
            assert len(index) == len(loader) * batch_size  # steps stay right, epoch after epoch
            seen.append(index)
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(range(num_samples))
        orders.append(seen[0])
    assert not np.array_equal(orders[0], orders[1])


def check_seeded(make_loader) -> None:
    """A seed reproduces the batches; set_epoch(e) reproduces epoch e; another seed or epoch differs."""
    a, b = make_loader(rank=0, world_size=1, seed=5), make_loader(rank=0, world_size=1, seed=5)
    first, again = collect(a), collect(b)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    a.set_epoch(1)
    other = collect(a)
    assert not np.array_equal(other["index"], first["index"])
    a.set_epoch(0)
    np.testing.assert_array_equal(collect(a)["view1"], first["view1"])
    c = make_loader(rank=0, world_size=1, seed=6)
    assert not np.array_equal(collect(c)["view1"], first["view1"])


def geometry_stats(make_loader, epochs: int) -> dict[str, np.ndarray]:
    """Flip, grayscale and crop-area measurements over `epochs` epochs of both views (GEOMETRY_ONLY spec)."""
    loader = make_loader(rank=0, world_size=1, seed=11)
    parts = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        data = collect(loader)
        parts += [measure_views(data["view1"]), measure_views(data["view2"])]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
