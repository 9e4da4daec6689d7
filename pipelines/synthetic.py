"""The embedded default dataset: class-structured images drawn procedurally, seeded, at any resolution.

Each class is a textured shape: a silhouette (circle, square, triangle, ring, cross, star, bar) filled with a
texture kind (stripes or checker) at a class frequency and orientation, both fixed in the object's own frame. Every
image then draws only nuisances of the kinds the two-view augmentations also apply: the object's position and
scale (random resized crop), its hue within ±0.1 of a shared palette (hue jitter), saturation and brightness
(colour jitter) and the near-grey background's level. No colour is tied to a class.

Why this design: contrastive learning separates whatever tells one image from another *after* augmentation.
Here two images of a class differ only in what the augmentations randomise anyway, so what survives augmentation
is the class (shape and texture), and a self-supervised backbone learns it within the CPU demo's few hundred steps.
Nuisances the augmentations leave intact (a random rotation, a random hue, a gradient background, a texture phase
of its own per image) would be better instance cues than the class: with them (generator version 1) the demo's
trained backbone stayed below a random-init one on kNN. A random-init backbone does well on these images too
(their classes are clean), so the demo prints both and tests/test_demo.py checks the margin.

All randomness comes from a counter-based hash of (seed, image index, parameter), so image i is identical whether
it is generated alone or inside any batch, and generation vectorises over the batch with numpy.
"""

from __future__ import annotations

import numpy as np

NUM_SHAPES = 7
# Bumped whenever the images a (seed, index) produces change: cached .beton files carry it in their name.
GENERATOR_VERSION = 2
# Class definitions hang off this fixed stream (not the user seed) so train and val share the same classes.
_CLASS_STREAM = 0xC1A55
_GOLDEN = 0x9E3779B97F4A7C15

# Per-image nuisance ranges, in image units where the image spans [-1, 1].
CENTRE_RANGE = 0.15  # object centre offset, uniform in [-r, r] on each axis
SCALE_RANGE = (0.55, 0.85)  # object radius
HUE_CENTRE, HUE_JITTER = 0.0, 0.1  # foreground hue: centre ± jitter (turns of the hue circle; aug hue is ±0.1)
BRIGHTNESS_RANGE = (0.4, 1.0)  # whole-image brightness factor


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective avalanche on uint64 (wraps silently on arrays)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, index: np.ndarray) -> np.ndarray:
    """One uint64 key per index for the given seed stream."""
    base = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _mix64(base + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN))


def _uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) float64 uniforms in [0, 1): parameter k of item j depends only on (keys[j], k)."""
    streams = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03))[None, :]
    h = _mix64(keys[:, None] ^ streams)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_seed(seed: int, split: str) -> int:
    """The seed stream of a split: val draws different images from train for the same user seed."""
    return int(seed) * 2 + (0 if split == "train" else 1)


def class_params(num_classes: int) -> dict[str, np.ndarray]:
    """Per-class shape, texture kind, texture frequency (cycles per object diameter) and orientation (rad)."""
    c = np.arange(num_classes)
    u = _uniforms(_keys(_CLASS_STREAM, c), 2)
    # Cycle the shape so neighbouring class ids differ in shape; texture separates classes sharing one.
    shape = c % NUM_SHAPES
    texture = (c // NUM_SHAPES) % 2
    # Frequencies spread over a few octaves that stay resolvable at 32 px for the smallest objects.
    freq = 1.0 + 3.2 * ((c * 0.618034 + u[:, 0]) % 1.0)
    orient = np.pi * ((c * 0.381966 + u[:, 1]) % 1.0)
    return {"shape": shape, "texture": texture, "freq": freq, "orient": orient}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB for arrays of colours; returns (..., 3) float32 in [0, 1]."""
    h6 = (h % 1.0) * 6.0
    k = (np.array([5.0, 3.0, 1.0]) + h6[..., None]) % 6.0
    rgb = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def _shape_distance(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field of a unit shape (< 0 inside), in shape units."""
    au, av = np.abs(u), np.abs(v)
    if kind == 0:  # circle
        return np.sqrt(u * u + v * v) - 1.0
    if kind == 1:  # square
        return np.maximum(au, av) - 0.85
    if kind == 2:  # triangle (equilateral, pointing up in shape coordinates)
        return np.maximum(-v - 0.5, 0.866 * au + 0.5 * v - 0.5) * 1.6
    if kind == 3:  # ring
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28
    if kind == 4:  # cross
        return np.minimum(np.maximum(au - 0.33, av - 1.0), np.maximum(au - 1.0, av - 0.33))
    if kind == 5:  # five-pointed star
        r = np.sqrt(u * u + v * v)
        return r - (0.72 + 0.28 * np.cos(5.0 * np.arctan2(v, u)))
    return np.maximum(au - 1.0, av - 0.38)  # bar


def generate(
    num_images: int, num_classes: int, resolution: int, seed: int, *, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+num_images-1 of the stream `seed`: (N, R, R, 3) uint8 RGB and (N,) int64 labels.

    Labels cycle through the classes (image i has label i % num_classes), so any prefix is balanced.
    """
    if num_classes < 1 or resolution < 1 or num_images < 0 or start < 0:
        raise ValueError(f"bad synthetic parameters: {num_images=}, {num_classes=}, {resolution=}, {start=}")
    index = np.arange(start, start + num_images, dtype=np.int64)
    labels = index % num_classes
    n, r = num_images, resolution
    if n == 0:
        return np.zeros((0, r, r, 3), np.uint8), labels
    cls = class_params(num_classes)
    keys = _keys(seed, index)
    p = _uniforms(keys, 8)

    # Pixel-centre coordinates in [-1, 1]; the same at every resolution so images scale cleanly.
    ax = ((np.arange(r, dtype=np.float32) + 0.5) / r) * 2.0 - 1.0
    x, y = ax[None, None, :], ax[None, :, None]  # (1, 1, R) and (1, R, 1)

    def col(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float32)[:, None, None]

    # Object frame: u, v in units of the object's radius, centred on the object (no rotation).
    cx = col(CENTRE_RANGE * (2.0 * p[:, 0] - 1.0))
    cy = col(CENTRE_RANGE * (2.0 * p[:, 1] - 1.0))
    scale = col(SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * p[:, 2])
    u, v = (x - cx) / scale, (y - cy) / scale
    dist = np.empty((n, r, r), np.float32)
    shape_of = cls["shape"][labels]
    for kind in np.unique(shape_of):
        sel = shape_of == kind
        dist[sel] = _shape_distance(int(kind), u[sel], v[sel])
    # Anti-aliased coverage: one pixel is 2/R in image units, 2/(R·scale) in shape units.
    mask = np.clip(0.5 - dist * (scale * (r / 2.0)), 0.0, 1.0)[..., None]

    # Texture in the object's frame (it moves and scales with the object): stripes or checker.
    freq = col(cls["freq"][labels])
    alpha = cls["orient"][labels]
    along = u * col(np.cos(alpha)) + v * col(np.sin(alpha))
    a = np.sin(np.pi * freq * along)
    tex = 0.5 + 0.5 * a
    checker = cls["texture"][labels] == 1
    if checker.any():
        across = -u[checker] * col(np.sin(alpha[checker])) + v[checker] * col(np.cos(alpha[checker]))
        b = np.sin(np.pi * freq[checker] * across)
        tex[checker] = 0.5 + 0.5 * np.tanh(4.0 * a[checker] * b)
    tex = tex[..., None]

    # Palette: a light and a dark complementary colour around the shared hue; a near-grey background.
    hue = HUE_CENTRE + HUE_JITTER * (2.0 * p[:, 3] - 1.0)
    sat = 0.45 + 0.55 * p[:, 4]
    light = _hsv_to_rgb(hue, sat, np.ones(n))
    dark = _hsv_to_rgb(hue + 0.5, sat, np.full(n, 0.25))
    fg = dark[:, None, None, :] * (1.0 - tex) + light[:, None, None, :] * tex
    bg = _hsv_to_rgb(p[:, 5], 0.1 * p[:, 6], np.full(n, 0.55))[:, None, None, :]
    img = bg * (1.0 - mask) + fg * mask
    lo, hi = BRIGHTNESS_RANGE
    img *= col(lo + (hi - lo) * p[:, 7])[..., None]

    # Luminance noise from a 32-bit pixel hash keyed by the image: ±~3 grey levels.
    pix = np.arange(r * r, dtype=np.uint32).reshape(1, r, r)
    h = (pix * np.uint32(0x9E3779B1)) ^ (keys >> np.uint64(32)).astype(np.uint32)[:, None, None]
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    noise = ((h >> np.uint32(24)).astype(np.float32) - 127.5) * (6.0 / 255.0 / 255.0)
    img += noise[..., None]

    out = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return out, labels
