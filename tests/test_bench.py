"""bench.py end to end at tiny sizes: every mode writes complete JSON (no timing assertions).

Each test runs with `--device cpu` (bench.py's default `auto` would pick the GPU on a GPU host) and again on the
last CUDA device under the `gpu` marker, so `--device cuda:N` is exercised off device 0 where a host has several.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device_arg(device: str) -> str:
    if device == "cuda":
        import torch

        return f"cuda:{torch.cuda.device_count() - 1}"
    return device


def bench(repo_root, tmp_path, device: str, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", *args, "--device", _device_arg(device), "--warmup", "1",
                           "--repeats", "2", "--json", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("mode", "settings", "commit", "versions", "device", "results"):
        assert key in report, key
    assert report["settings"]["device"] == _device_arg(device)
    assert report["device"].startswith("cpu") == (device == "cpu"), report["device"]
    assert report["results"], "no rows"
    for row in report["results"]:
        assert row["name"] and row["images_per_s"] > 0
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    return report


@pytest.mark.parametrize("device", DEVICES)
def test_masks_mode_pairs_per_sample_with_official(repo_root, tmp_path, device):
    rows = bench(repo_root, tmp_path, device, "masks", "--batch-sizes", "16", "--resolutions", "32",
                 "--grids", "4")["results"]
    names = [r["name"] for r in rows]
    assert any("official" in n for n in names) and any("per-sample" in n for n in names)
    assert any("ratio_vs_official" in r for r in rows)


@pytest.mark.parametrize("device", DEVICES)
def test_step_mode_reports_forward_equivalents(repo_root, tmp_path, device):
    rows = bench(repo_root, tmp_path, device, "step", "--methods", "moco", "--branches", "vanilla,mixmask",
                 "--resolution", "16", "--batch-size", "8", "--no-cifar-stem")["results"]
    assert [r["forward_equivalents"] for r in rows] == [4, 7]


@pytest.mark.parametrize("device", DEVICES)
def test_loader_mode_compares_backends_to_torchvision(repo_root, tmp_path, device):
    if device == "cuda":  # the bare GPU image has neither: skip cleanly there (the GPU check's pytest row)
        pytest.importorskip("ffcv")
        pytest.importorskip("nvidia.dali")
    rows = bench(repo_root, tmp_path, device, "loader", "--backend", "torchvision,ffcv,dali", "--resolution", "32",
                 "--batch-size", "16", "--batches", "2", "--workers", "1", "--num-images", "128")["results"]
    assert [r["backend"] for r in rows] == ["torchvision", "ffcv", "dali"]
    assert rows[0]["ratio_vs_torchvision"] == pytest.approx(1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_e2e_mode_reports_data_wait(repo_root, tmp_path, device):
    if device == "cuda":
        pytest.importorskip("ffcv")  # the demo preset reads through FFCV
    rows = bench(repo_root, tmp_path, device, "e2e", "--steps", "2", "--preset", "demo", "data.synthetic_images=128",
                 "data.resolution=16", "data.batch_size=16", "data.workers=1", "method.moco.queue_size=64",
                 f"data.data_dir={repo_root / 'data' / 'test-cache'}")["results"]
    assert 0.0 <= rows[0]["data_wait"] <= 1.0


@pytest.mark.gpu
def test_cuda_device_index_becomes_the_current_device():
    """`--device cuda:N` makes N the current device (FFCV's stream and numba's context follow it), as train.py does."""
    import torch

    import bench as bench_cli

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices to tell cuda:N from the default device 0")
    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(0)
    try:
        assert bench_cli.main(["masks", "--device", f"cuda:{last}", "--batch-sizes", "16", "--resolutions", "32",
                               "--grids", "4", "--warmup", "1", "--repeats", "1"]) == 0
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(0)


def test_loader_mode_puts_the_ffcv_quasi_random_order_beside_the_random_one(repo_root, tmp_path):
    rows = bench(repo_root, tmp_path, "cpu", "loader", "--backend", "ffcv", "--ffcv-orders", "random,quasi_random",
                 "--no-os-cache", "--order-window", "32", "--resolution", "32", "--batch-size", "16", "--batches", "2",
                 "--workers", "1", "--num-images", "128")["results"]
    assert [(r["order"], r["os_cache"]) for r in rows] == [("random", False), ("quasi_random", False)]
    assert "quasi_random" in rows[1]["name"] and "quasi_random" not in rows[0]["name"]
