"""The JSON sidecar `FILE.beton.json` that travels with every `.beton`: source, split, class names and counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixmask.errors import UserError

SIDECAR_FORMAT = "mixmask-beton-sidecar"
SIDECAR_VERSION = 1


def sidecar_path(beton: str | Path) -> Path:
    """Where the sidecar of `beton` lives: the same name with `.json` appended."""
    return Path(str(beton) + ".json")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sidecar(beton: str | Path) -> dict:
    """The sidecar of `beton` as a dict; UserError (one line) when it is missing or not ours."""
    path = sidecar_path(beton)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: convert with `python -m pipelines.convert` to get the sidecar") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable sidecar ({err})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{path} is not a mixmask .beton sidecar (no format {SIDECAR_FORMAT!r})")
    return data
