"""Atomic checkpoints: write to a temporary file, fsync, rename; load with one clear error when corrupt.

A checkpoint holds everything needed to resume exactly (DESIGN.md, Reliability): the plain (uncompiled, unwrapped)
method's state dict — backbone, heads, momentum encoder, queue —, the optimizer, the position in the schedule
(epoch, step, step within the epoch), every rank's RNG states and loader position, and the resolved config with
provenance. There is no grad-scaler state: training autocasts to bf16, which needs no loss scaling (checkpoints
written with a `"scaler": None` entry still load; the key is ignored).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixmask.errors import UserError
from mixmask.run.provenance import provenance

CHECKPOINT_VERSION = 1
_PERIODIC = re.compile(r"epoch_(\d+)\.pt$")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` so that a crash at any point leaves either the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: teammates could not read the run
        os.replace(tmp, path)
        # fsync the directory so the rename itself survives a power loss.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Checkpointer:
    """Writes this run's checkpoints: `last.pt` at every save, and `epoch_NNNN.pt` (the newest `keep` of them) when
    the save is periodic.

    Every rank calls `save` at the same step (it gathers each rank's RNG states and loader position, so a resumed
    rank continues its own streams); rank 0 alone writes. `config` and `computed` are stored with every checkpoint.
    """

    def __init__(self, ckpt_dir: Path, *, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 mask_generator: torch.Generator | None, loader: Any, config: dict, computed: dict, keep: int,
                 rank: int = 0, world_size: int = 1):
        self.ckpt_dir, self.last = Path(ckpt_dir), Path(ckpt_dir) / "last.pt"
        self.method, self.optimizer, self.mask_generator, self.loader = method, optimizer, mask_generator, loader
        self.config, self.computed, self.keep = config, computed, keep
        self.rank, self.world_size = rank, world_size

    def save(self, epoch: int, step: int, step_in_epoch: int, *, periodic: bool) -> Path | None:
        """Checkpoint the run at `step`, `step_in_epoch` batches into `epoch` (0: the epoch has not begun)."""
        mine = (rng_state(self.mask_generator), self.loader.position_state() if step_in_epoch else None)
        gathered: list = [mine]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, mine)
        if self.rank != 0:
            return None
        state = {"version": CHECKPOINT_VERSION, "method": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step": step,
                 "step_in_epoch": step_in_epoch, "rng": [g[0] for g in gathered], "loader": [g[1] for g in gathered],
                 "config": self.config, "computed": self.computed, "provenance": provenance()}
        save_atomic(state, self.last)
        if periodic:
            save_atomic(state, self.ckpt_dir / f"epoch_{epoch:04d}.pt")
            prune_periodic(self.ckpt_dir, self.keep)
        return self.last


def load_method_state(method: torch.nn.Module, ckpt: dict, path: str | Path, model: str) -> None:
    """Load a checkpoint's method weights into `method` (this run's `model`); UserError naming both models when the
    checkpoint was trained as another architecture or method, instead of load_state_dict's key dump."""
    expected, stored = method.state_dict(), ckpt["method"]
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    reshaped = [k for k in expected if k in stored and tuple(expected[k].shape) != tuple(stored[k].shape)]
    if missing or unexpected or reshaped:
        m = ckpt.get("config", {}).get("method", {}) if isinstance(ckpt.get("config"), dict) else {}
        was = f"{m.get('name')}/{m.get('branch')} {m.get('arch')}" if m else "another model"
        example = (reshaped or missing or unexpected)[0]
        raise UserError(f"{path} holds a {was}, not this run's {model} ({len(reshaped)} weights shaped "
                        f"differently, {len(missing)} missing, {len(unexpected)} unexpected, e.g. {example!r}); "
                        "resume with the config it was trained with, or start fresh with run.resume=none")
    method.load_state_dict(stored)


def is_torch_file(path: Path) -> bool:
    """Whether `path` starts as `torch.save` output does: a zip archive, or a legacy-format pickle (protocol opcode).

    Checked before `torch.load`, whose unpickler would otherwise read any file: on random bytes it fails with
    whatever opcode comes up, sometimes with a second error printed on the way out.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


# What unpickling may build besides tensors, containers, numbers and strings: numpy arrays (the legacy numpy RNG
# state in every checkpoint is a uint32 array), by the functions and types their pickles name.
NUMPY_ARRAY_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnsafeFile(Exception):
    """A torch file whose pickle names other Python objects: `read_torch_file` does not build them."""


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """What `torch.save` wrote to `path`, read without running code from the file (`weights_only=True`).

    Tensors, containers, numbers, strings and numpy arrays load; a pickle naming any other object raises
    `UnsafeFile` (unpickling it could run arbitrary code, and a file this project wrote holds none); a file that is
    not whole `torch.save` output raises ValueError or one of torch's errors.
    """
    if not is_torch_file(path):
        raise ValueError("not a zip archive or a pickle")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused object ("... GLOBAL posix.mkdir whose module ...", "Unsupported global: GLOBAL
        # x.y was not ..."); a damaged pickle fails on an opcode instead ("Unsupported operand 103"): corrupt.
        names = re.findall(r"GLOBAL (\S+)", str(err))
        if not names:
            raise
        raise UnsafeFile(f"pickled Python objects beyond tensors, numbers, strings and numpy arrays "
                         f"({', '.join(dict.fromkeys(names))}); they are not loaded, since unpickling them can run "
                         "code") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_atomic`; UserError (one line) when missing, truncated or not ours.

    Keep the default CPU location for a resume (see `resume_from`): RNG states must stay CPU ByteTensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = read_torch_file(path, map_location)
    except UnsafeFile as err:
        raise UserError(f"checkpoint {str(path)!r} holds {err}; this project's checkpoints hold none") from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}); "
                        "the previous checkpoints in its folder are untouched") from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "config" not in ckpt:
        raise UserError(f"{str(path)!r} is not a training checkpoint of this project (no 'method'/'config' entries)")
    return ckpt


def resume_from(path: str | Path, *, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                mask_generator: torch.Generator | None, rank: int, world_size: int = 1,
                model: str = "model") -> tuple[int, int, int, dict | None]:
    """Restore weights, queue, optimizer and this rank's RNG streams from `path`; return (epoch, step, step_in_epoch,
    loader position). The loader position is what this rank's loader recorded where its epoch was left (DALI's
    random state), None when the checkpoint has none or another world size wrote it.

    The file is read onto the CPU whatever the training device: `load_state_dict` copies the weights onto the
    module's device and casts the optimizer state to its parameters' device, except `step`, which stays where the
    optimizer keeps it (a CPU scalar unless capturable or fused: on the GPU its `.item()` would sync every step),
    and the RNG states must be CPU ByteTensors for `torch.set_rng_state` / `Generator.set_state`. `model` names
    this run's method for the one-line error when the checkpoint holds another one.
    """
    state = load_checkpoint(path, map_location="cpu")
    load_method_state(method, state, path, model)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)], mask_generator)
    positions = state.get("loader") or []
    loader = positions[rank] if len(positions) == world_size else None
    return state["epoch"], state["step"], state["step_in_epoch"], loader


def rng_state(mask_generator: torch.Generator | None = None) -> dict:
    """Every RNG the run draws from, for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global state is what libraries draw from)
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if mask_generator is not None:
        state["mask_generator"] = mask_generator.get_state()
    return state


def set_rng_state(state: dict, mask_generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if mask_generator is not None and state.get("mask_generator") is not None:
        mask_generator.set_state(state["mask_generator"])


def find_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: `auto` → last.pt if present, `none` → None, else the given path."""
    if resume == "none":
        return None
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"run.resume={resume!r}: no such checkpoint (use auto, none or a path to a .pt file)")
    return path


def prune_periodic(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` periodic checkpoints (epoch_N.pt); last.pt is never touched."""
    periodic = sorted((p for p in ckpt_dir.glob("epoch_*.pt") if _PERIODIC.search(p.name)),
                      key=lambda p: int(_PERIODIC.search(p.name).group(1)))  # type: ignore[union-attr]
    removed = periodic[:-keep] if keep > 0 else periodic
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
