"""Where a result came from: git commit, library versions, host and device (saved with runs and benchmarks)."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for dist in ("torchvision", "nvidia-dali-cuda130", "ffcv", "numba", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device | str | None = None) -> dict:
    return {"commit": git_commit(), "versions": versions(), "host": platform.node(), "device": device_name(device)}
