"""The mask figure command: writes a real PNG, and user mistakes are one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import torch

from mixmask.core.masks import discrete_masks
from mixmask.core.mixing import upsample_masks
from mixmask.visualize import mixed_and_switched, render_mask_figure, sample_photographs


def test_photographs_are_real_and_distinct():
    photos = sample_photographs(64)
    assert photos.shape == (2, 3, 64, 64)
    assert 0.0 <= photos.min() and photos.max() <= 1.0
    assert photos.std() > 0.1 and (photos[0] - photos[1]).abs().mean() > 0.1


def test_figure_pairs_show_the_mixed_and_the_switched_image():
    photos = sample_photographs(40)
    mask = discrete_masks(1, 3, 0.5, generator=torch.Generator().manual_seed(1))[0]
    mixed, switched, lam = mixed_and_switched(photos, mask)
    keep = upsample_masks(mask[None], 40, 40)[0]  # (1, H, W), 3 cells over 40 px: a grid that does not divide
    assert torch.equal(mixed, torch.where(keep, photos[0], photos[1]))
    assert torch.equal(switched, torch.where(keep, photos[1], photos[0]))
    assert lam == keep.float().mean().item()


def test_render_writes_one_row_per_grid(tmp_path):
    one = render_mask_figure(tmp_path / "one.png", (4,), resolution=64)
    three = render_mask_figure(tmp_path / "three.png", (2, 4, 8), resolution=64)
    small, large = mpimg.imread(one), mpimg.imread(three)
    assert small.shape[1] == large.shape[1] and large.shape[0] > 2 * small.shape[0]
    assert np.asarray(large).std() > 0.1  # not a blank canvas


def test_cli_writes_png_and_reports_mistakes_in_one_line(tmp_path, repo_root):
    out = tmp_path / "fig.png"
    command = [sys.executable, "-m", "mixmask.visualize", "--resolution", "32", "--grid-sizes", "2", "4"]
    done = subprocess.run([*command, "--out", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [*command, "--out", str(tmp_path / "missing" / "fig.png")], cwd=repo_root, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
