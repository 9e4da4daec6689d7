"""Faults that used to leave a mess: preemption under torchrun, a stopped converter, bad images, overwrites, umask.

Each case runs the real command (torchrun, `python -m pipelines.convert`, `train.py`) the way a user or SLURM would.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow

# 192 synthetic images at 16 px, global batch 32 → 6 steps per epoch (as tests/test_train.py).
SMALL = [
    "data.synthetic_images=192", "data.synthetic_val_images=64", "data.resolution=16", "data.batch_size=32",
    "method.cifar_stem=false", "method.moco.queue_size=64", "mask.grid_size=4", "run.knn_every=0",
    "run.progress=false", "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the signal: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("the run did not reach the step to signal at")


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# ---- 7. preemption under torchrun / SLURM

def _launch(repo_root: Path, out: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixmask.run.launch", "--nproc_per_node", "2", "--master_port", str(port),
            "train.py", "--preset", "demo", *SMALL, "data.backend=torchvision", "data.workers=0",
            f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}", *extra]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_to_the_launcher_saves_on_every_rank_and_resumes(repo_root, tmp_path, sig):
    """The signal reaches torchrun's process group as SLURM sends it (the workers sit in their own sessions):
    every rank stops at the same step, the checkpoint holds both ranks' state, the launcher exits 0, nothing
    survives, and the same command resumes from there to the end."""
    out = tmp_path / "run"
    cmd = _launch(repo_root, out, 29621 + (sig == signal.SIGUSR1), "run.epochs=4")
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        _wait_for_rows(proc, out / "metrics.jsonl", 3)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=180)
        time.sleep(0.5)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        assert f"{sig.name} received: saved" in stderr
        assert not _alive(children), "a worker outlived the launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(children)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    stopped_at = state["step"]
    assert 3 <= stopped_at < 24 and len(state["rng"]) == 2  # saved by a collective both ranks joined
    if sig == signal.SIGUSR1:
        return  # the resume path is the same for both signals; run it once
    resumed = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at}" in resumed.stderr and "resumed from" in resumed.stderr
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == 24


# ---- 8. a stopped converter leaves no process and no temporary file

def _convert_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.convert", "synthetic", "--out", str(out), "--resolution", "64",
            "--workers", "2", "--no-progress", *extra]


@pytest.mark.parametrize("how", ["SIGTERM to the converter", "SIGINT to its process group (Ctrl+C)"])
def test_stopped_converter_ends_its_workers_and_removes_its_temporary_file(repo_root, tmp_path, how):
    out = tmp_path / "big.beton"
    proc = subprocess.Popen(_convert_cmd(out, "--num-images", "20000"), cwd=repo_root, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        # Signal once the workers are writing: the temporary file holds a few pages of images.
        while sum(p.stat().st_size for p in tmp_path.glob(".big.beton.tmp-*")) < 2**22:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the conversion was not caught writing: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the converter started no worker process"
        if how.startswith("SIGTERM"):
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(children)
    assert proc.returncode == 128 + (signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "conversion stopped" in lines[0] and "Traceback" not in stderr, stderr[-2000:]
    assert not _alive(children), "a converter worker survived"
    assert list(tmp_path.iterdir()) == [], "the temporary file (or a partial output) was left behind"


# ---- 11. no silent replacement of an existing output; files readable by the user's group as the umask says

def test_convert_refuses_an_existing_output_unless_overwrite(repo_root, tmp_path):
    out = tmp_path / "small.beton"
    args = ["--num-images", "40", "--num-classes", "4"]
    first = subprocess.run(_convert_cmd(out, *args), cwd=repo_root, capture_output=True, text=True, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    before = out.read_bytes()
    again = subprocess.run(_convert_cmd(out, "--num-images", "30", "--num-classes", "3"), cwd=repo_root,
                           capture_output=True, text=True, env=ENV)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == f"error: --out {out} already exists; pass --overwrite to replace it, or choose " \
                                   "another name"
    assert out.read_bytes() == before
    forced = subprocess.run(_convert_cmd(out, "--num-images", "30", "--num-classes", "3", "--overwrite"),
                            cwd=repo_root, capture_output=True, text=True, env=ENV)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads(Path(f"{out}.json").read_text())["num_written"] == 30


# ---- 9. an unreadable image is skipped, counted and listed, on the torchvision and DALI (CPU) backends

def _folder_with_a_corrupt_jpeg(root: Path) -> Path:
    """The gradient ImageFolder (3 classes x 14 JPEGs) with one file cut in half, as a failed copy leaves it."""
    from tests.loader_fixtures import write_gradient_folder

    train = write_gradient_folder(root)
    bad = train / "class_1" / "img_005.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_loader_skips_an_unreadable_jpeg_and_lists_it_each_epoch(tmp_path, backend):
    from pipelines.loaders import build_two_view_loader
    from tests.loader_fixtures import GEOMETRY_ONLY

    bad = _folder_with_a_corrupt_jpeg(tmp_path)
    loader = build_two_view_loader(backend, source="imagefolder", path=str(tmp_path), resolution=16,
                                   batch_size_per_rank=6, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), rank=0,
                                   world_size=1, seed=0, workers=1, device=torch.device("cpu"),
                                   max_bad_fraction=0.05)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 7 and all(b.view1.shape[0] == 6 for b in batches)
        assert len(loader.bad_files) == 1
        path, reason = loader.bad_files[0]
        assert path == str(bad) and "truncat" in reason


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_loader_stops_with_one_line_past_max_bad_fraction(tmp_path, backend):
    from mixmask.errors import UserError
    from pipelines.loaders import build_two_view_loader
    from tests.loader_fixtures import GEOMETRY_ONLY

    _folder_with_a_corrupt_jpeg(tmp_path)
    (tmp_path / "train" / "class_2" / "img_000.jpg").write_bytes(os.urandom(2000))
    loader = build_two_view_loader(backend, source="imagefolder", path=str(tmp_path), resolution=16,
                                   batch_size_per_rank=6, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), rank=0,
                                   world_size=1, seed=0, workers=1, device=torch.device("cpu"),
                                   max_bad_fraction=0.03)  # 1 of 42 is allowed, 2 are not
    with pytest.raises(UserError, match=r"2 unreadable image\(s\) in epoch 1 .* exceed data.max_bad_fraction=0.03"):
        list(loader)


def test_train_goes_on_past_an_unreadable_jpeg_and_logs_it(repo_root, tmp_path):
    bad = _folder_with_a_corrupt_jpeg(tmp_path / "data")
    common = ["train.py", "--preset", "demo", "data.source=imagefolder", f"data.path={tmp_path / 'data'}",
              "data.backend=torchvision", "data.workers=0", "data.resolution=16", "data.batch_size=6",
              "method.cifar_stem=false", "method.moco.queue_size=12", "mask.grid_size=4", "run.knn_every=0",
              "run.progress=false", "run.tensorboard=false", "run.epochs=1", "run.max_steps=7"]
    proc = subprocess.run([sys.executable, *common, "data.max_bad_fraction=0.05", f"run.out_dir={tmp_path / 'run'}"],
                          cwd=repo_root,
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"epoch 1: skipped 1 unreadable image(s): {bad} (truncated" in proc.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == 7
    stopped = subprocess.run([sys.executable, *common, "data.max_bad_fraction=0", f"run.out_dir={tmp_path / 'r0'}"],
                             cwd=repo_root, capture_output=True, text=True, env=ENV, timeout=300)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: 1 unreadable image(s) in epoch 1")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_and_exports_follow_the_users_umask(repo_root, tmp_path, umask):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--preset", "demo", "data.resolution=16", "data.batch_size=8",
           "data.workers=0", "data.backend=torchvision", "data.synthetic_images=16", "data.synthetic_val_images=16",
           "method.cifar_stem=false", "method.moco.queue_size=16", "mask.grid_size=4", "run.progress=false",
           "run.tensorboard=false", "run.epochs=1", "run.max_steps=1", "run.knn_every=0", f"run.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = subprocess.run([sys.executable, "-m", "mixmask.export", str(out / "checkpoints" / "last.pt"),
                             "--detectron2", str(out / "d2.pkl")], cwd=repo_root, capture_output=True, text=True,
                            env=ENV, timeout=120, preexec_fn=lambda: os.umask(umask))
    assert export.returncode == 0, export.stderr[-2000:]
    for name in ("checkpoints/last.pt", "backbone.pt", "d2.pkl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
