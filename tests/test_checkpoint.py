"""Atomic checkpoints: a killed save leaves the previous checkpoint loadable; corrupt files are one clear error."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mixmask.errors import UserError
from mixmask.run.checkpoint import find_resume, is_torch_file, load_checkpoint, prune_periodic, save_atomic

WRITER = """
import sys, torch
from mixmask.run.checkpoint import save_atomic
big = {"method": {"w": torch.randn(64, 1024, 1024)}, "config": {}, "n": 1}
print("ready", flush=True)
while True:
    save_atomic(big, sys.argv[1])
"""


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, repo_root):
    path = tmp_path / "last.pt"
    save_atomic({"method": {"w": torch.ones(3)}, "config": {}, "n": 0}, path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=repo_root, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)  # inside the first 256 MB write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(path)
    assert state["n"] in (0, 1)  # the old or the new file, never a torn one
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
    for p in leftovers:  # a killed writer can leave its temporary file behind, never under the final name
        assert p.name.startswith(".last.pt.") and p.name.endswith(".tmp")


def test_corrupt_and_foreign_checkpoints_are_one_line_errors(tmp_path):
    good = tmp_path / "last.pt"
    save_atomic({"method": {"w": torch.ones(3)}, "config": {}}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n" * 100)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    garbage.write_bytes(b"\x80\x02garbage")  # a pickle's first bytes, then damage: not taken for unsafe objects
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    assert load_checkpoint(good)["method"]["w"].sum() == 3  # untouched


class _RunsCodeWhenLoaded:
    """An object whose unpickling calls a function (`os.mkdir` here; it could be anything)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (str(self.folder),)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, zipped):
    marker = tmp_path / "ran"
    path = tmp_path / "last.pt"
    torch.save({"method": {"w": torch.ones(2)}, "config": {}, "payload": _RunsCodeWhenLoaded(marker)}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(UserError, match="not loaded, since unpickling them can run code") as err:
        load_checkpoint(path)
    assert not marker.exists()
    assert "(posix.mkdir)" in str(err.value)  # the refused object is named
    # What every checkpoint holds loads: tensors, containers, numbers, strings and numpy's RNG state.
    torch.save({"method": {"w": torch.ones(2)}, "config": {"a": [1, 2.5, "x", None]},
                "rng": {"numpy": np.random.get_state()}}, path, _use_new_zipfile_serialization=zipped)  # noqa: NPY002
    state = load_checkpoint(path)
    assert state["rng"]["numpy"][1].dtype == np.uint32 and state["config"]["a"] == [1, 2.5, "x", None]


def test_only_what_torch_save_writes_reaches_the_unpickler(tmp_path):
    zipped, legacy, text = tmp_path / "zip.pt", tmp_path / "legacy.pt", tmp_path / "notes.txt"
    torch.save({"w": torch.ones(2)}, zipped)
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    text.write_text("PK but not a zip")
    assert is_torch_file(zipped) and is_torch_file(legacy)
    assert not is_torch_file(text)


def test_find_resume_and_pruning(tmp_path):
    assert find_resume("auto", tmp_path) is None
    assert find_resume("none", tmp_path) is None
    save_atomic({"method": {}, "config": {}}, tmp_path / "last.pt")
    assert find_resume("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(UserError, match="no such checkpoint"):
        find_resume(str(tmp_path / "nope.pt"), tmp_path)
    for e in (2, 4, 6, 8, 10):
        save_atomic({"method": {}, "config": {}}, tmp_path / f"epoch_{e:04d}.pt")
    removed = prune_periodic(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch_0008.pt", "epoch_0010.pt", "last.pt"]



def _tiny_run(repo_root, out, *extra: str) -> subprocess.CompletedProcess:
    """train.py for a few steps of the demo (MoCo v2 + MixMask, AdamW) on 64 synthetic 16 px images."""
    cmd = [sys.executable, "train.py", "--preset", "demo", "data.synthetic_images=64", "data.synthetic_val_images=32",
           "data.resolution=16", "data.batch_size=16", "data.workers=1", "data.backend=torchvision",
           f"data.data_dir={repo_root / 'data' / 'test-cache'}", "method.cifar_stem=false", "method.moco.queue_size=32",
           "mask.grid_size=4", "run.knn_every=0", "run.progress=false", "run.tensorboard=false", f"run.out_dir={out}",
           *extra]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*to a meta parameter:UserWarning")  # copying into meta is a no-op, as meant
def test_resume_onto_a_non_cpu_device_restores_rng_optimizer_and_schedule(repo_root, tmp_path):
    """train.py writes last.pt; the resume path restores it into a model on `meta` (standing in for CUDA on a CPU host).

    Loading with map_location=device made the RNG states device tensors (set_rng_state: "RNG state must be a
    torch.ByteTensor") and left AdamW's `step` on the device; the file must be read to the CPU and load_state_dict
    left to place each tensor.
    """
    from mixmask.run.build import build_method_from_config
    from mixmask.run.checkpoint import resume_from
    from mixmask.run.config_cli import from_dict
    from mixmask.run.optim import build_optimizer

    _tiny_run(repo_root, tmp_path / "run", "run.device=cpu", "run.max_steps=2")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False)

    cfg = from_dict(saved["config"])
    assert cfg.optim.name == "adamw"  # an optimizer with a `step` entry in its state
    method = build_method_from_config(cfg).to("meta")
    optimizer = build_optimizer(cfg.optim.name, method, lr=1.0, weight_decay=cfg.optim.weight_decay)
    mask_gen = torch.Generator()
    torch.manual_seed(12345)
    mask_gen.manual_seed(678)
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002 (the legacy global state is what a checkpoint restores)

    position = resume_from(last, method=method, optimizer=optimizer, mask_generator=mask_gen, rank=0)

    assert position[:3] == (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (0, 2, 2)
    rng = saved["rng"][0]
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert torch.equal(mask_gen.get_state(), rng["mask_generator"])
    assert random.getstate() == rng["python"]
    assert np.array_equal(np.random.get_state()[1], rng["numpy"][1])  # noqa: NPY002
    states = list(optimizer.state.values())
    assert len(states) == sum(p.requires_grad for p in method.parameters())
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 2 for s in states)  # where AdamW reads it
    assert all(s["exp_avg"].device.type == "meta" for s in states)  # placed on the parameters' device
    assert optimizer.param_groups[0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"] != 1.0


@pytest.mark.slow
@pytest.mark.gpu
def test_train_resumes_on_cuda(repo_root, tmp_path):
    _tiny_run(repo_root, tmp_path / "run", "run.device=cuda", "run.max_steps=2")
    proc = _tiny_run(repo_root, tmp_path / "run", "run.device=cuda", "run.max_steps=4")
    assert "resumed from" in proc.stderr + proc.stdout
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 4 and saved["rng"][0]["cuda"] is not None
