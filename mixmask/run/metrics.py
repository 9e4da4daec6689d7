"""Run outputs for metrics: JSON lines (`metrics.jsonl`) and TensorBoard scalars, written by rank 0 only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Append one JSON object per record to `metrics.jsonl`; mirror numeric fields to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 (closed in close())
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any], *, step: int, prefix: str = "train") -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"kind": prefix, "step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl file; a truncated last line (killed run) is ignored."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite `metrics.jsonl` without the records past `step` (and any truncated line); returns how many went.

    A resumed run continues from its checkpoint's step and logs the steps after it again: dropping what a killed
    run wrote past its last checkpoint keeps one history. The rewrite is atomic (temporary file, fsync, rename).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            continue
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines) - len(kept)
