"""Figure of blocked and discrete masks with the mixed and switched images they make (like MixMask's Fig. 3).

    python -m mixmask.visualize --out masks.png [--grid-sizes 2 4 8] [--resolution 224] [--seed 0]

Two real photographs (scikit-image's bundled samples, no download), one row per grid size: the two images, then for
each mask kind the mask (white: the first image's own cells), the mixed image M ⊙ x1 + (1 − M) ⊙ x2 and the
switched one M ⊙ x2 + (1 − M) ⊙ x1. Both come out of one `mix` call on the pair with one shared mask and the
reverse pairing, as `mask.share=pair` (or `batch`) builds them in training; λ (the own pixel share) is in the
titles. Blocked masks at grid 2 are shown although training refuses them: BEiT's rule leaves them (nearly) empty.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixmask.core.masks import block_masks, check_mask_config, discrete_masks
from mixmask.core.mixing import mix, reverse_permutation, upsample_masks
from mixmask.errors import UserError, cli_entry


def sample_photographs(resolution: int) -> torch.Tensor:
    """Two photographs from scikit-image (astronaut, cat), centre-cropped square and resized.

    Shape:
        returns: (2, 3, resolution, resolution) float32 in [0, 1]
    """
    from skimage import data

    photos = []
    for image in (data.astronaut(), data.chelsea()):
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
        square = square.permute(2, 0, 1)[None].float() / 255.0
        size = (resolution, resolution)
        photos.append(F.interpolate(square, size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(photos).clamp(0.0, 1.0)


def _as_image(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def mixed_and_switched(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The mixed image M ⊙ x1 + (1 − M) ⊙ x2 and the switched one M ⊙ x2 + (1 − M) ⊙ x1, and their shared λ.

    One `mix` call on the pair with the mask shared by both members and the reverse pairing, as training builds them.

    Shape:
        images: (2, C, H, W); mask: (g, g) bool
        returns: mixed (C, H, W), switched (C, H, W), λ (the own pixel share of either)
    """
    mixed, lam = mix(images, mask.expand(2, *mask.shape), reverse_permutation(2, images.device))
    return mixed[0], mixed[1], float(lam[0])


def _refused_note(name: str, grid: int) -> str:
    try:
        check_mask_config("block" if name == "blocked" else name, grid, 0.5)
    except ValueError:
        return " (refused)"
    return ""


def render_mask_figure(
    out_path: str | Path, grid_sizes: tuple[int, ...] = (2, 4, 8), resolution: int = 224, seed: int = 0
) -> Path:
    """Write the mask figure to `out_path` (PNG) and return the path; one row per grid size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = sample_photographs(resolution)
    generator = torch.Generator().manual_seed(seed)
    columns = ["image 1", "image 2", "blocked mask", "mixed", "switched", "discrete mask", "mixed", "switched"]
    fig, axes = plt.subplots(len(grid_sizes), len(columns), figsize=(2.0 * len(columns), 2.2 * len(grid_sizes)))
    axes = np.atleast_2d(axes)
    for row, grid in enumerate(grid_sizes):
        panels = [(_as_image(images[0]), "image 1"), (_as_image(images[1]), "image 2")]
        for name, draw in (("blocked", block_masks), ("discrete", discrete_masks)):
            mask = draw(1, grid, 0.5, generator=generator)[0]
            mixed, switched, lam = mixed_and_switched(images, mask)
            shown_mask = upsample_masks(mask[None], resolution, resolution)[0, 0].float().numpy()
            panels += [
                (shown_mask, f"{name} mask {grid}×{grid}{_refused_note(name, grid)}"),
                (_as_image(mixed), f"mixed, λ={lam:.2f}"),
                (_as_image(switched), f"switched, λ={lam:.2f}"),
            ]
        for col, (panel, title) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"grid {grid}", fontsize=10)
    fig.suptitle(f"MixMask masks at {resolution} px (ratio 0.5; white = image 1's own cells)", fontsize=11)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixmask.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[2, 4, 8], help="one figure row per grid size")
    parser.add_argument("--resolution", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask generator")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {args.out!r}")
    if not out.parent.exists():
        raise UserError(f"--out folder {str(out.parent)!r} does not exist")
    bad = [g for g in args.grid_sizes if g < 2]
    if bad:
        raise UserError(f"--grid-sizes must be >= 2, got {bad[0]}")
    if not 8 <= args.resolution <= 2048:
        raise UserError(f"--resolution must be between 8 and 2048 pixels, got {args.resolution}")
    render_mask_figure(out, tuple(args.grid_sizes), args.resolution, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
