"""The torchvision reference backend: contract, sharding, seeding, worker-count independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.loaders import build_eval_loader, build_two_view_loader
from tests.loader_fixtures import (
    GEOMETRY_ONLY,
    check_batch_contract,
    check_seeded,
    check_shards_and_epochs,
    collect,
    write_gradient_folder,
)

N, BATCH, RES = 42, 3, 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    write_gradient_folder(root)
    return str(root)


def _make(folder, workers=0, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY)):
    def make(*, rank, world_size, seed):
        return build_two_view_loader("torchvision", source="imagefolder", path=folder, resolution=RES,
                                     batch_size_per_rank=BATCH, recipe=recipe, rank=rank, world_size=world_size,
                                     seed=seed, workers=workers, device=torch.device("cpu"))
    return make


def test_contract(folder):
    check_batch_contract(_make(folder)(rank=0, world_size=1, seed=0), BATCH, RES, N)


def test_shards_and_epochs(folder):
    check_shards_and_epochs(_make(folder), N, BATCH)


def test_seeded(folder):
    check_seeded(_make(folder))


def test_workers_do_not_change_the_batches(folder):
    zero, two = _make(folder, 0)(rank=0, world_size=1, seed=3), _make(folder, 2)(rank=0, world_size=1, seed=3)
    np.testing.assert_array_equal(collect(zero)["view2"], collect(two)["view2"])


def test_mocov2_recipe_normalises_and_bf16(folder):
    loader = build_two_view_loader("torchvision", source="imagefolder", path=folder, resolution=RES,
                                   batch_size_per_rank=4, recipe="mocov2", rank=0, world_size=1, seed=0, workers=0,
                                   device=torch.device("cpu"), dtype=torch.bfloat16)
    batch = next(iter(loader))
    assert batch.view1.dtype == torch.bfloat16 and batch.view1.min() < -1.0 and batch.view1.max() > 1.0


def test_eval_loader_keeps_every_sample_in_order(folder):
    loader = build_eval_loader("torchvision", source="imagefolder", path=folder, split="train", resolution=RES,
                               batch_size_per_rank=8, train_aug=False, rank=0, world_size=1, workers=0,
                               device=torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == sorted(labels.tolist()) and len(labels) == N  # no shuffle, no drop_last
    assert batches[0][0].shape == (8, 3, RES, RES)


def test_synthetic_needs_no_path():
    loader = build_two_view_loader("torchvision", source="synthetic", path=None, resolution=32, batch_size_per_rank=8,
                                   recipe="simclr", rank=0, world_size=1, seed=0, workers=0,
                                   device=torch.device("cpu"),
                                   synthetic={"num_images": 32, "num_classes": 4, "resolution": 32})
    assert len(loader) == 4
    batch = next(iter(loader))
    assert batch.view1.shape == (8, 3, 32, 32) and int(batch.labels.max()) < 4
