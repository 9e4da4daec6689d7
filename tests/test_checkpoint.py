"""Atomic checkpoints: a killed save leaves the previous checkpoint loadable; corrupt files are one clear error."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from mixmask.checkpoint import find_resume, load_checkpoint, prune_periodic, save_atomic
from mixmask.errors import UserError

WRITER = """
import sys, torch
from mixmask.checkpoint import save_atomic
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
    assert load_checkpoint(good)["method"]["w"].sum() == 3  # untouched


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
