"""The JSON sidecar `FILE.beton.json` that travels with every `.beton`: source, split, class names and counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixmask.errors import UserError

SIDECAR_FORMAT = "mixmask-beton-sidecar"
SIDECAR_VERSION = 1


def dataset_record(src, rows, skipped: list[tuple[str, str]], seconds: float) -> dict:
    """What every converter sidecar records about the written samples (`.beton` and shards alike).

    `src` is the `pipelines.sources.Source` read, `rows` the source indices written (in order), `skipped` the
    (path, reason) of every image left out.
    """
    import datetime as dt

    import numpy as np

    labels = np.fromiter((src.label(int(i)) for i in rows), dtype=np.int64, count=len(rows))
    return {
        "source": src.name,
        "split": src.split,
        "source_info": src.describe(),
        "class_names": list(src.class_names),
        "num_classes": len(src.class_names),
        "class_counts": np.bincount(labels, minlength=len(src.class_names)).tolist(),
        "num_written": int(len(rows)),
        "num_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "seconds": round(seconds, 3),
        "images_per_s": round(len(rows) / max(seconds, 1e-9), 1),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


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


def label_map(train_classes: list[str], other_classes: list[str], *, other: str) -> tuple[list[int] | None, list[str]]:
    """Map another split's label ids onto the train split's class list, the one list labels come from.

    Returns (map, lacking): `map[k]` is the train label id of the other split's class k (None when the two lists
    are the same), and `lacking` the train classes the other split has no folder for (it is still evaluated
    correctly on the classes it has). A class the train split lacks is a UserError naming it: no train label
    exists for it.
    """
    if list(other_classes) == list(train_classes):
        return None, []
    train_id = {name: k for k, name in enumerate(train_classes)}
    unknown = [name for name in other_classes if name not in train_id]
    if unknown:
        raise UserError(f"the {other} split has {len(unknown)} classes the train split lacks ({_names(unknown)}); "
                        "labels come from the train split's class list: remove them from the "
                        f"{other} split or convert both splits from the same classes")
    present = set(other_classes)
    return [train_id[name] for name in other_classes], [n for n in train_classes if n not in present]


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def lacking_note(lacking: list[str], *, other: str) -> str:
    """One line: which train classes the other split lacks."""
    return f"note: the {other} split lacks {len(lacking)} of the train split's classes ({_names(lacking)}); " \
           "it is evaluated on the classes it has, with the train split's label ids"
