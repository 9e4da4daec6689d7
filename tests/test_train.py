"""train.py end to end on CPU: exact resume, SIGTERM, torchrun with 2 processes, outputs, failure paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

pytestmark = pytest.mark.slow

# A small MoCo v2 + MixMask run: 192 synthetic images at 16 px, batch 32 → 6 steps per epoch.
SMALL = [
    "data.synthetic_images=192", "data.synthetic_val_images=64", "data.resolution=16", "data.batch_size=32",
    "data.workers=1", "method.cifar_stem=false", "method.moco.queue_size=64", "mask.grid_size=4", "run.knn_every=0",
    "run.progress=false", "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0",
]


def train_cmd(repo_root: Path, out_dir: Path, *extra: str, backend: str = "ffcv") -> list[str]:
    data_dir = repo_root / "data" / "test-cache"  # shared by the tests: the synthetic .beton is made once
    return [sys.executable, "train.py", "--preset", "demo", *SMALL, f"data.backend={backend}",
            f"data.data_dir={data_dir}", f"run.out_dir={out_dir}", *extra]


def train(repo_root: Path, out_dir: Path, *extra: str, backend: str = "ffcv", check: bool = True,
          timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(repo_root, out_dir, *extra, backend=backend), cwd=repo_root,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start(repo_root: Path, out_dir: Path, *extra: str, backend: str = "ffcv") -> subprocess.Popen:
    """A run in the background: each run here uses one core, so two independent runs of a test go side by side."""
    return subprocess.Popen(train_cmd(repo_root, out_dir, *extra, backend=backend), cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, timeout: int = 300) -> None:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["method"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


@pytest.mark.parametrize(("backend", "stop"), [("torchvision", 6), ("ffcv", 9), ("dali", 9)])
def test_two_epochs_equal_one_epoch_resume_one_epoch(repo_root, tmp_path, backend, stop):
    """Stopped at an epoch's end (6) or mid-epoch (9: the resumed epoch starts at its 4th batch), then resumed."""
    straight = start(repo_root, tmp_path / "straight", "run.epochs=2", backend=backend)
    train(repo_root, tmp_path / "resumed", "run.epochs=2", f"run.max_steps={stop}", backend=backend)
    finish(straight)
    first = weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert (stopped["step"], stopped["step_in_epoch"]) == (stop, stop % 6)
    if backend == "dali" and stop % 6:
        assert stopped["loader"][0]["batch"] == 3  # DALI's random state where the epoch was left
    train(repo_root, tmp_path / "resumed", "run.epochs=2", backend=backend)  # run.resume=auto
    assert_same_weights(tmp_path / "straight" / "checkpoints" / "last.pt",
                        tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert not torch.equal(first["backbone.conv1.weight"], weights(tmp_path / "straight" / "checkpoints" /
                                                                   "last.pt")["backbone.conv1.weight"])
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (2, 12, 0)
    assert state["method"]["queue_ptr"].item() == (12 * 32) % 64


def test_sigterm_saves_and_resumes_to_the_same_weights(repo_root, tmp_path):
    straight = start(repo_root, tmp_path / "straight", "run.epochs=3")
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(repo_root, out, "run.epochs=3"), cwd=repo_root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the run is inside its second epoch
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before the signal: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert 8 <= state["step"] < 18
    finish(straight)
    train(repo_root, out, "run.epochs=3")
    assert_same_weights(tmp_path / "straight" / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")


def test_run_outputs_and_backbone_export(repo_root, tmp_path):
    out = tmp_path / "run"
    proc = train(repo_root, out, "run.epochs=2", "run.knn_every=1", "eval.knn_k=10", "run.tensorboard=true",
                 "run.ckpt_every=1", "run.keep_ckpts=1")
    for name in ("config.yaml", "metrics.jsonl", "backbone.pt", "loss_curve.png", "masks.png", "final_knn.json",
                 "checkpoints/last.pt", "checkpoints/epoch_0002.pt"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints" / "epoch_0001.pt").exists()  # keep_ckpts=1
    assert list((out / "tensorboard").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert len(train_rows) == 12 and all(r["loss"] > 0 for r in train_rows)
    assert {"loss_orig", "loss_mixmask", "lam_mean_mixmask", "lr", "images_per_s", "data_wait"} <= train_rows[0].keys()
    assert [r["epoch"] for r in records if r["kind"] == "knn"] == [1, 2]
    final = json.loads((out / "final_knn.json").read_text())
    assert 0 <= final["knn_top1"] <= 100 and 0 <= final["knn_top1_random_init"] <= 100
    assert "kNN top-1 on the held-out split" in proc.stderr
    config = (out / "config.yaml").read_text()
    assert "computed:" in config and "commit:" in config and "torch:" in config
    missing, unexpected = torchvision.models.resnet18().load_state_dict(
        torch.load(out / "backbone.pt", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_torchrun_two_cpu_processes(repo_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "train.py", "--preset", "demo", *SMALL, "data.backend=torchvision", "data.workers=0",
           f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}", "run.epochs=1",
           "run.knn_every=1", "eval.knn_k=10"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 6 and len(state["rng"]) == 2  # 192 / 32 global → 6 steps; both ranks' RNG saved
    assert state["method"]["queue_ptr"].item() == (6 * 32) % 64  # the gathered global batch was enqueued
    assert "world_size: 2" in (out / "config.yaml").read_text()
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # e.g. DDP's broadcast_buffers FutureWarning (step.py)


def test_torchrun_max_restarts_resumes_a_killed_worker(repo_root, tmp_path):
    """A worker killed mid-run: torchrun restarts it and it resumes from last.pt with nothing from the user.

    One process, so the restart does not hinge on a gloo mesh reconnecting on a loaded 2-core machine; the
    multi-process group itself is covered by test_torchrun_two_cpu_processes.
    """
    import psutil

    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--max-restarts", "1",
           "--master_port", "29544", "train.py", "--preset", "demo", *SMALL, "data.backend=torchvision",
           "data.workers=0", f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}",
           "run.epochs=10", "run.ckpt_every=100"]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ckpt = out / "checkpoints" / "last.pt"
        deadline = time.time() + 240
        while time.time() < deadline and not ckpt.is_file():  # wait for the first epoch's checkpoint
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "train.py" in " ".join(p.cmdline()) and p.pid != proc.pid]
        assert workers, "the worker process was not found"
        workers[0].kill()  # a crash (SIGKILL: no chance to save); torchrun starts it again
        killed_at = torch.load(ckpt, weights_only=False)["step"]  # the restarted worker needs seconds to write
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr
    state = torch.load(ckpt, weights_only=False)
    assert killed_at < 60 and (state["epoch"], state["step"]) == (10, 60)


def test_corrupt_checkpoint_is_one_line_and_left_untouched(repo_root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"\x80\x02garbage")
    proc = train(repo_root, out, "run.epochs=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "corrupt or truncated" in proc.stderr
    assert (out / "checkpoints" / "last.pt").read_bytes() == b"\x80\x02garbage"


def test_non_finite_loss_stops_with_a_clear_message(repo_root, tmp_path):
    out = tmp_path / "run"
    train(repo_root, out, "run.epochs=4", "run.max_steps=6")  # one good epoch → last.pt
    good = weights(out / "checkpoints" / "last.pt")
    proc = train(repo_root, out, "run.epochs=4", "optim.base_lr=1e30", "run.allow_config_change=true", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "last good checkpoint" in proc.stderr
    after = weights(out / "checkpoints" / "last.pt")
    assert all(torch.equal(good[k], after[k]) for k in good)

