"""The embedded default dataset: class-structured images drawn procedurally, seeded, at any resolution.

Each class is a family: a shape type (circle, square, triangle, ring, cross, star, bar), a texture kind
(stripes or checker) with a class frequency and orientation, and a hue centre. Every image then draws its own
position, scale, rotation, texture phase, palette (hue jittered around the class centre, free saturation and
value), a two-colour gradient background and luminance noise. The palette overlaps between classes on purpose:
the class lives in shape and texture, so a classifier on mean colour alone does poorly and augmentations matter.

All randomness comes from a counter-based hash of (seed, image index, parameter), so image i is identical whether
it is generated alone or inside any batch, and generation vectorises over the batch with numpy.
"""

from __future__ import annotations

import numpy as np

NUM_SHAPES = 7
# Bumped whenever the images a (seed, index) produces change: cached .beton files carry it in their name.
GENERATOR_VERSION = 1
# Class definitions hang off this fixed stream (not the user seed) so train and val share the same classes.
_CLASS_STREAM = 0xC1A55
_GOLDEN = 0x9E3779B97F4A7C15


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
    """Per-class shape, texture kind, frequency (cycles per image width), orientation (rad) and hue centre."""
    c = np.arange(num_classes)
    u = _uniforms(_keys(_CLASS_STREAM, c), 4)
    # Cycle the shape so neighbouring class ids differ in shape; texture separates classes sharing one.
    shape = c % NUM_SHAPES
    texture = (c // NUM_SHAPES) % 2
    # Frequencies spread over a few octaves that stay below Nyquist at 32 px.
    freq = 1.5 + 4.5 * ((c * 0.618034 + u[:, 0]) % 1.0)
    orient = np.pi * ((c * 0.381966 + u[:, 1]) % 1.0)
    hue = (c * 0.618034 + 0.25 * u[:, 2]) % 1.0
    return {"shape": shape, "texture": texture, "freq": freq, "orient": orient, "hue": hue}


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
    p = _uniforms(keys, 18)

    # Pixel-centre coordinates in [-1, 1]; the same at every resolution so images scale cleanly.
    ax = ((np.arange(r, dtype=np.float32) + 0.5) / r) * 2.0 - 1.0
    x, y = ax[None, None, :], ax[None, :, None]  # (1, 1, R) and (1, R, 1)

    def col(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None]

    # Background: a two-colour linear gradient in a random direction.
    bg1 = _hsv_to_rgb(p[:, 0], 0.6 * p[:, 1], 0.15 + 0.75 * p[:, 2])
    bg2 = _hsv_to_rgb(p[:, 0] + 0.5 * p[:, 3] - 0.25, 0.6 * p[:, 4], 0.15 + 0.75 * p[:, 5])
    beta = 2.0 * np.pi * p[:, 6]
    t = np.clip(0.5 + 0.5 * (x * col(np.cos(beta)) + y * col(np.sin(beta))), 0.0, 1.0)[..., None]
    img = bg1[:, None, None, :] * (1.0 - t) + bg2[:, None, None, :] * t  # (N, R, R, 3)

    # Foreground geometry: centre, scale and rotation per image.
    cx, cy = col(0.8 * p[:, 7] - 0.4), col(0.8 * p[:, 8] - 0.4)
    scale = col(0.38 + 0.32 * p[:, 9])
    theta = 2.0 * np.pi * p[:, 10]
    cos_t, sin_t = col(np.cos(theta)), col(np.sin(theta))
    dx, dy = x - cx, y - cy
    u = (dx * cos_t + dy * sin_t) / scale
    v = (-dx * sin_t + dy * cos_t) / scale
    dist = np.empty((n, r, r), np.float32)
    shape_of = cls["shape"][labels]
    for kind in np.unique(shape_of):
        sel = shape_of == kind
        dist[sel] = _shape_distance(int(kind), u[sel], v[sel])
    # Anti-aliased coverage: one pixel is 2/R in image units, 2/(R·scale) in shape units.
    mask = np.clip(0.5 - dist * (scale * (r / 2.0)), 0.0, 1.0)[..., None]

    # Texture: class frequency and orientation (small jitter), random phase; stripes or checker.
    freq = col(cls["freq"][labels] * (0.9 + 0.2 * p[:, 11]))
    alpha = cls["orient"][labels] + 0.3 * (p[:, 12] - 0.5)
    phase = col(2.0 * np.pi * p[:, 13])
    along = x * col(np.cos(alpha)) + y * col(np.sin(alpha))
    a = np.sin(np.pi * freq * along + phase)
    tex = 0.5 + 0.5 * a
    checker = cls["texture"][labels] == 1
    if checker.any():
        across = -x * col(np.sin(alpha[checker])) + y * col(np.cos(alpha[checker]))
        b = np.sin(np.pi * freq[checker] * across + phase[checker])
        tex[checker] = 0.5 + 0.5 * np.tanh(4.0 * a[checker] * b)
    tex = tex[..., None]

    # Palette: hue jittered widely around the class centre so colour alone is a weak cue.
    hue = cls["hue"][labels] + 0.6 * (p[:, 14] - 0.5)
    fg1 = _hsv_to_rgb(hue, 0.45 + 0.55 * p[:, 15], 0.6 + 0.4 * p[:, 16])
    fg2 = _hsv_to_rgb(hue + 0.5, 0.3 + 0.7 * p[:, 17], 0.05 + 0.4 * p[:, 16])
    fg = fg2[:, None, None, :] * (1.0 - tex) + fg1[:, None, None, :] * tex
    img = img * (1.0 - mask) + fg * mask

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
