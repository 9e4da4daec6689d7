"""One run per run directory: an exclusive lock held by the training run, and the config check on resume.

The lock is `fcntl.flock` on `RUN_DIR/run.lock`, which holds the PID of its holder. The kernel drops the lock when
its process exits however it exits (SIGKILL included), so a lock file left by a dead run is simply taken over.

A resume continues the stored run; keys that alter the model, the data or the schedule must not change on the way
(`check_resume_config`). What may change is listed in `MAY_CHANGE`, everything else is refused, so a key added to
the config later is protected until someone decides otherwise. `run.allow_config_change=true` overrides the check
deliberately (the run then mixes two configs; the changed keys are still reported).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixmask.errors import UserError

LOCK_NAME = "run.lock"

# Keys that may differ between the stored config and the resuming one: where things are written or read from,
# how often the run logs, checkpoints and monitors, how fast it runs, and the evaluation settings.
MAY_CHANGE: frozenset[str] = frozenset({
    "preset",  # a name only: the values it produced are compared key by key
    "run.epochs",  # upward only (checked separately): train on, the schedule is stretched to the new length
    "run.max_steps", "run.out_dir", "run.resume", "run.allow_config_change",
    "run.device", "run.compile", "run.channels_last",
    "run.log_every", "run.ckpt_every", "run.keep_ckpts", "run.knn_every", "run.tensorboard", "run.progress",
    "data.workers", "data.os_cache", "data.batches_ahead", "data.data_dir", "data.val_path",
})
MAY_CHANGE_SECTIONS: tuple[str, ...] = ("eval.",)


class RunLock:
    """An exclusive lock on a run directory for the lifetime of this object (or of the process)."""

    def __init__(self, run_dir: Path, pid: int) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write {self.path} ({err.strerror}): run.out_dir must be a writable "
                            "folder") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            self.close()
            raise UserError(f"run directory {run_dir} is in use by another training run (PID {holder}); wait for "
                            "it to finish, stop it, or use another run.out_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'run': {'epochs': 3}} → {'run.epochs': 3}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _in_use(flat: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The keys a run of `method` reads: every method has a section `method.<name>`, only its own counts (None:
    none does)."""
    own = f"method.{method}."
    return {k: v for k, v in flat.items() if k.count(".") < 2 or not k.startswith("method.") or k.startswith(own)}


def may_change(key: str) -> bool:
    return key in MAY_CHANGE or key.startswith(MAY_CHANGE_SECTIONS)


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) keys whose values differ between a checkpoint's config and the resuming config.

    `run.epochs` lowered is refused (the schedule would end before where the run already is, or be compressed).
    """
    old_flat, new_flat = flatten(stored), flatten(new)
    # Only the run's own method section counts; when the method itself changes, `method.name` says so alone.
    method = old_flat.get("method.name") if old_flat.get("method.name") == new_flat.get("method.name") else None
    old_flat, new_flat = _in_use(old_flat, method), _in_use(new_flat, method)
    refused, allowed = [], []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        missing = object()
        a, b = old_flat.get(key, missing), new_flat.get(key, missing)
        if a is missing or b is missing:  # a key the other version of the config does not have
            if a is missing and may_change(key):
                continue
            refused.append(key)
            continue
        if a == b:
            continue
        lowered_epochs = key == "run.epochs" and isinstance(a, int) and isinstance(b, int) and b < a
        (allowed if may_change(key) and not lowered_epochs else refused).append(key)
    return refused, allowed


def describe(keys: list[str], stored: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """'optim.base_lr 0.06 → 0.1, data.batch_size 512 → 256' (the first `limit` keys)."""
    old_flat, new_flat = flatten(stored), flatten(new)
    parts = [f"{k} {old_flat.get(k, '(absent)')!r} → {new_flat.get(k, '(absent)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def check_resume_config(stored: dict[str, Any], new: dict[str, Any], *, checkpoint: Path,
                        allow_change: bool) -> list[str]:
    """UserError (one line) when the resuming config alters the model, the data or the schedule of the stored run.

    Returns one-line notes on the changes that are allowed (or overridden with `allow_change`).
    """
    from mixmask.run.config import upgrade_saved_config  # an older run's flat method keys, in today's sections

    stored = upgrade_saved_config(stored)
    refused, allowed = config_changes(stored, new)
    notes = []
    if refused and not allow_change:
        raise UserError(f"{checkpoint} was trained with another config: {describe(refused, stored, new)}; "
                        "a resume must not change the model, the data or the schedule. Start fresh with another "
                        "run.out_dir, or pass run.allow_config_change=true to resume with the change deliberately")
    if refused:
        notes.append(f"resuming with a changed config (run.allow_config_change=true): {describe(refused, stored, new)}")
    if allowed:
        notes.append(f"resuming with {describe(allowed, stored, new)}")
    return notes


def lock_run_dir(run_dir: Path, *, pid: int, is_main: bool, distributed: bool,
                 prepare: Callable[[], object] | None = None) -> RunLock | None:
    """Rank 0 runs `prepare` (e.g. the check that the folder is writable) and takes the lock; every rank raises the
    same UserError when either fails.

    Every rank must call this (a collective when distributed), so a refused rank 0 does not leave the others
    waiting in the first collective of the run.
    """
    lock, error = None, ""
    if is_main:
        try:
            if prepare is not None:
                prepare()
            lock = RunLock(run_dir, pid)
        except UserError as err:
            error = str(err)
    if distributed:
        import torch.distributed as dist

        message = [error]
        dist.broadcast_object_list(message, src=0)
        error = message[0]
    if error:
        raise UserError(error)
    return lock


def refuse_fresh_start_over(ckpt_dir: Path, resume: str) -> None:
    """UserError when `run.resume=none` would start a new run over the checkpoints of an existing one."""
    last = Path(ckpt_dir) / "last.pt"
    if resume == "none" and last.is_file():
        raise UserError(f"run.resume=none but {last} holds an earlier run; resume it with run.resume=auto, or "
                        "start fresh with another run.out_dir (nothing is deleted for you)")
