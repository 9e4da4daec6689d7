"""The DALI backend on its CPU path: contract, global-rank sharding, steps across epochs, seeding, arrays input."""

from __future__ import annotations

import pytest
import torch

from pipelines.loaders import build_eval_loader, build_two_view_loader
from tests.loader_fixtures import (
    GEOMETRY_ONLY,
    check_batch_contract,
    check_seeded,
    check_shards_and_epochs,
    write_gradient_folder,
)

N, BATCH, RES = 42, 3, 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    write_gradient_folder(root)
    return str(root)


def _make(folder, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), device="cpu"):
    def make(*, rank, world_size, seed):
        return build_two_view_loader("dali", source="imagefolder", path=folder, resolution=RES,
                                     batch_size_per_rank=BATCH, recipe=recipe, rank=rank, world_size=world_size,
                                     seed=seed, workers=2, device=torch.device(device))
    return make


def test_contract(folder):
    check_batch_contract(_make(folder)(rank=0, world_size=1, seed=0), BATCH, RES, N)


def test_shards_and_steps_stay_right_over_epochs(folder):
    check_shards_and_epochs(_make(folder), N, BATCH, epochs=4)


def test_seeded(folder):
    check_seeded(_make(folder))


def test_abandoned_epoch_does_not_leak_into_the_next(folder):
    loader = _make(folder)(rank=0, world_size=1, seed=0)
    full = [b.index for b in loader]
    for _batch in loader:  # stop after one batch, as max_steps does
        break
    assert torch.equal(torch.cat([b.index for b in loader]), torch.cat(full))


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_full_photometric_graph_runs_at_64px(folder, recipe):
    loader = build_two_view_loader("dali", source="imagefolder", path=folder, resolution=64, batch_size_per_rank=4,
                                   recipe=recipe, rank=0, world_size=1, seed=0, workers=1,
                                   device=torch.device("cpu"), dtype=torch.bfloat16)
    batch = next(iter(loader))
    assert batch.view1.shape == (4, 3, 64, 64) and batch.view1.dtype == torch.bfloat16
    assert torch.isfinite(batch.view1.float()).all() and batch.view1.float().std() > 0.1


def test_array_source_and_eval_loader():
    synthetic = {"num_images": 20, "num_classes": 4, "resolution": 32}
    loader = build_two_view_loader("dali", source="synthetic", path=None, resolution=32, batch_size_per_rank=8,
                                   recipe="mocov2", rank=0, world_size=1, seed=0, workers=1,
                                   device=torch.device("cpu"), synthetic=synthetic)
    assert len(loader) == 2 and next(iter(loader)).view2.shape == (8, 3, 32, 32)
    ev = build_eval_loader("dali", source="synthetic", path=None, split="train", resolution=32,
                           batch_size_per_rank=8, train_aug=False, rank=0, world_size=1, workers=1,
                           device=torch.device("cpu"), synthetic=synthetic)
    sizes = [len(y) for _, y in ev]
    assert sizes == [8, 8, 4] and len(ev) == 3


@pytest.mark.gpu
def test_mixed_decoder_on_gpu(folder):
    pytest.importorskip("nvidia.dali")  # a GPU machine without DALI (the GPU check's image) skips, not errors
    batch = next(iter(_make(folder, recipe="mocov2", device="cuda")(rank=0, world_size=1, seed=0)))
    assert batch.view1.is_cuda and batch.view1.shape == (BATCH, 3, RES, RES)


def _graph_devices(loader) -> list[str]:
    """Where each output of the loader's DALI graph runs, defined as `_run_epoch` defines it (no GPU needed to look)."""
    import numpy as np
    from nvidia.dali.pipeline import Pipeline

    from pipelines.loaders.dali_backend import _EpochSource

    source = _EpochSource(loader.split, np.arange(len(loader.split)), loader.batch_size, loader.steps,
                          loader.tally)
    with Pipeline(batch_size=loader.batch_size, num_threads=1, device_id=None):
        return [node.device for node in loader._graph(*loader._decoded(source))]


def test_array_and_file_sources_run_the_graph_on_the_gpu_for_a_cuda_device(folder):
    synthetic = {"num_images": 20, "num_classes": 4, "resolution": 32}
    arrays = build_two_view_loader("dali", source="synthetic", path=None, resolution=32, batch_size_per_rank=8,
                                   recipe="mocov2", rank=0, world_size=1, seed=0, workers=1,
                                   device=torch.device("cuda"), synthetic=synthetic)
    files = _make(folder, recipe="mocov2", device="cuda")(rank=0, world_size=1, seed=0)
    ev = build_eval_loader("dali", source="synthetic", path=None, split="train", resolution=32,
                           batch_size_per_rank=8, train_aug=False, rank=0, world_size=1, workers=1,
                           device=torch.device("cuda"), synthetic=synthetic)
    for loader in (arrays, files):
        assert _graph_devices(loader) == ["gpu", "gpu", "cpu", "cpu"]  # view1, view2 | labels, index
    assert _graph_devices(ev) == ["gpu", "cpu", "cpu"]
    cpu = build_two_view_loader("dali", source="synthetic", path=None, resolution=32, batch_size_per_rank=8,
                                recipe="mocov2", rank=0, world_size=1, seed=0, workers=1,
                                device=torch.device("cpu"), synthetic=synthetic)
    assert _graph_devices(cpu) == ["cpu"] * 4


@pytest.mark.gpu
def test_array_source_on_gpu():
    synthetic = {"num_images": 20, "num_classes": 4, "resolution": 32}
    loader = build_two_view_loader("dali", source="synthetic", path=None, resolution=32, batch_size_per_rank=8,
                                   recipe="byol", rank=0, world_size=1, seed=0, workers=1,
                                   device=torch.device("cuda"), synthetic=synthetic)
    batch = next(iter(loader))
    assert batch.view1.is_cuda and batch.view2.shape == (8, 3, 32, 32) and batch.labels.is_cuda
    assert torch.isfinite(batch.view1.float()).all() and batch.view1.float().std() > 0.1
