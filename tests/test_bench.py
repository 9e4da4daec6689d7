"""bench.py end to end at tiny sizes: every mode runs on CPU and writes complete JSON (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def bench(repo_root, tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", *args, "--warmup", "1", "--repeats", "2", "--json", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("mode", "settings", "commit", "versions", "device", "results"):
        assert key in report, key
    assert report["results"], "no rows"
    for row in report["results"]:
        assert row["name"] and row["images_per_s"] > 0
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    return report


def test_masks_mode_pairs_per_sample_with_official(repo_root, tmp_path):
    rows = bench(repo_root, tmp_path, "masks", "--batch-sizes", "16", "--resolutions", "32", "--grids", "4")["results"]
    names = [r["name"] for r in rows]
    assert any("official" in n for n in names) and any("per-sample" in n for n in names)
    assert any("ratio_vs_official" in r for r in rows)


def test_step_mode_reports_forward_equivalents(repo_root, tmp_path):
    rows = bench(repo_root, tmp_path, "step", "--methods", "moco", "--branches", "vanilla,mixmask",
                 "--resolution", "16", "--batch-size", "8", "--no-cifar-stem")["results"]
    assert [r["forward_equivalents"] for r in rows] == [4, 7]


def test_loader_mode_compares_backends_to_torchvision(repo_root, tmp_path):
    rows = bench(repo_root, tmp_path, "loader", "--backend", "torchvision,ffcv,dali", "--resolution", "32",
                 "--batch-size", "16", "--batches", "2", "--workers", "1", "--num-images", "128")["results"]
    assert [r["backend"] for r in rows] == ["torchvision", "ffcv", "dali"]
    assert rows[0]["ratio_vs_torchvision"] == pytest.approx(1.0)


def test_e2e_mode_reports_data_wait(repo_root, tmp_path):
    rows = bench(repo_root, tmp_path, "e2e", "--steps", "2", "--preset", "demo", "data.synthetic_images=128",
                 "data.resolution=16", "data.batch_size=16", "data.workers=1", "method.queue_size=64",
                 f"data.data_dir={repo_root / 'data' / 'test-cache'}")["results"]
    assert 0.0 <= rows[0]["data_wait"] <= 1.0
