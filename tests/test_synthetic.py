"""The synthetic default: deterministic per index, any resolution, class signal in structure rather than colour."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sources import open_source
from pipelines.synthetic import class_params, generate, split_seed


def test_shapes_dtypes_and_balanced_labels():
    images, labels = generate(50, 7, 20, seed=1)
    assert images.shape == (50, 20, 20, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [8, 7, 7, 7, 7, 7, 7]
    assert images.std() > 20  # not flat


@pytest.mark.parametrize("resolution", [4, 17, 96])
def test_any_resolution(resolution):
    images, _ = generate(6, 3, resolution, seed=0)
    assert images.shape == (6, resolution, resolution, 3)


def test_image_same_alone_or_in_batch():
    batch, labels = generate(40, 10, 32, seed=5)
    for i in (0, 13, 39):
        one, lab = generate(1, 10, 32, seed=5, start=i)
        np.testing.assert_array_equal(one[0], batch[i])
        assert lab[0] == labels[i]
    tail, _ = generate(15, 10, 32, seed=5, start=25)
    np.testing.assert_array_equal(tail, batch[25:])


def test_seeds_and_splits_differ_but_repeat():
    a, _ = generate(20, 4, 16, seed=0)
    np.testing.assert_array_equal(a, generate(20, 4, 16, seed=0)[0])
    b, _ = generate(20, 4, 16, seed=1)
    assert (a != b).any(axis=(1, 2, 3)).all()
    assert split_seed(0, "train") != split_seed(0, "val") and split_seed(1, "train") != split_seed(0, "val")
    train = open_source("synthetic", split="train", num_images=8, resolution=16)
    val = open_source("synthetic", split="val", num_images=8, resolution=16)
    assert not any(np.array_equal(train.load(i), val.load(i)) for i in range(8))


def test_class_definitions_do_not_depend_on_seed_or_count():
    small, big = class_params(5), class_params(40)
    for key in small:
        np.testing.assert_array_equal(small[key], big[key][:5])
    assert len(set(zip(big["shape"], big["texture"]))) == 14  # 7 shapes x 2 textures all in use


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y, num_classes):
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(num_classes)])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == test_y).mean())


def test_class_signal_lives_in_structure_not_mean_colour():
    train_x, train_y = generate(1000, 10, 32, split_seed(0, "train"))
    test_x, test_y = generate(500, 10, 32, split_seed(0, "val"))

    def mean_colour(x):
        return x.reshape(len(x), -1, 3).mean(1)

    def spectrum(x):  # translation-invariant structure: log magnitude of the grey image's 2-D FFT
        grey = x.astype(np.float32).mean(-1)
        grey -= grey.mean((1, 2), keepdims=True)
        return np.log1p(np.abs(np.fft.fft2(grey))).reshape(len(x), -1)

    by_colour = _nearest_centroid_accuracy(mean_colour(train_x), train_y, mean_colour(test_x), test_y, 10)
    by_structure = _nearest_centroid_accuracy(spectrum(train_x), train_y, spectrum(test_x), test_y, 10)
    assert by_colour < 0.25, by_colour  # chance is 0.10
    assert by_structure > 0.45 and by_structure > by_colour + 0.25, (by_structure, by_colour)
