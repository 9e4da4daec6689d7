"""Run reports (matplotlib, headless): loss and kNN curves, the λ histogram, and a comparison table of runs
like the paper's Table 5 (final / best kNN and every `eval_*.json` result)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mixmask.run.metrics import read_metrics


def plot_training_curves(run_dir: Path, out: Path, *, knn_reference: float | None = None) -> Path:
    """Loss terms (left), kNN top-1 (right) over optimizer steps; written atomically to `out`.

    `knn_reference` (e.g. a random-init backbone's kNN top-1) is drawn as a dashed line on the kNN panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    knn: list[tuple[int, float]] = []
    for r in records:
        if r.get("kind") == "knn" and r.get("knn_top1") is not None:
            knn.append((r["step"], r["knn_top1"]))
        elif r.get("kind") == "train":
            for k, v in r.items():
                if k.startswith("loss") and isinstance(v, (int, float)):
                    series[k].append((r["step"], v))
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*pts)
        ax_loss.plot(xs, ys, label=name, lw=2 if name == "loss" else 1)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss terms")
    if series:
        ax_loss.legend(fontsize=8)
    if knn:
        xs, ys = zip(*knn)
        ax_knn.plot(xs, ys, marker="o", label="trained")
    if knn_reference is not None:
        ax_knn.axhline(knn_reference, ls="--", color="grey", label=f"random init ({knn_reference:.1f}%)")
        ax_knn.legend(fontsize=8)
    ax_knn.set_xlabel("step")
    ax_knn.set_ylabel("top-1 (%)")
    ax_knn.set_title("kNN monitor (held-out split)")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def lambda_values(records: list[dict]) -> dict[str, list[float]]:
    """The logged mean λ per mixed-batch kind (`lam_mean_<kind>`, as the methods write it), one per log step.

    Empty for the vanilla branch; two kinds (`mixmask`, `unmix`) for MixMask*.
    """
    values: dict[str, list[float]] = {}
    for r in records:
        if r.get("kind") != "train":
            continue
        for key, value in r.items():
            if key.startswith("lam_mean_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key[len("lam_mean_"):], []).append(float(value))
    return values


def plot_lambda_histogram(run_dir: Path, out: Path, *, bins: int = 30) -> Path:
    """Histogram of the logged mean λ (share of each image's own pixels in its mixed image) over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_kind = lambda_values(read_metrics(Path(run_dir) / "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = ("tab:blue", "tab:orange", "tab:green")
    for (kind, values), color in zip(sorted(per_kind.items()), colors):
        ax.hist(values, bins=bins, range=(0.0, 1.0), color=color, edgecolor="white", alpha=0.7,
                label=f"{kind}: mean {sum(values) / len(values):.3f}")
    if per_kind:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no λ logged (vanilla branch?)", ha="center", va="center", transform=ax.transAxes)
    steps = max((len(v) for v in per_kind.values()), default=0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("batch mean λ")
    ax.set_ylabel("log steps")
    ax.set_title(f"λ over training ({steps} log steps)")
    return _save(fig, out)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    """One row of the comparison table: the run's preset, method and branch, its kNN monitor, its eval results."""
    import yaml

    run_dir = Path(run_dir)
    cfg: dict = {}
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    records = read_metrics(run_dir / "metrics.jsonl")
    knn = [float(r["knn_top1"]) for r in records if r.get("kind") == "knn" and r.get("knn_top1") is not None]
    final = _read_json(run_dir / "final_knn.json") or {}
    if isinstance(final.get("knn_top1"), (int, float)):
        knn.append(float(final["knn_top1"]))
    steps = [r["step"] for r in records if r.get("kind") == "train" and "step" in r]
    row: dict[str, Any] = {
        "run": run_dir.name,
        "preset": cfg.get("preset", ""),
        "method": cfg.get("method", {}).get("name", ""),
        "branch": cfg.get("method", {}).get("branch", ""),
        "steps": max(steps) if steps else None,
        "knn_final": knn[-1] if knn else None,
        "knn_best": max(knn) if knn else None,
    }
    for path in sorted(run_dir.glob("eval_*.json")):
        data = _read_json(path)
        if not data or not isinstance(data.get("results"), dict):
            continue
        protocol = data.get("protocol", path.stem.removeprefix("eval_"))
        for key, value in data["results"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{protocol}_{key}"] = float(value)
    return row


def comparison_columns(rows: list[dict]) -> list[str]:
    """Fixed leading columns, then every eval result column present in any row, in a stable order."""
    fixed = ["run", "preset", "method", "branch", "steps", "knn_final", "knn_best"]
    extra = sorted({k for r in rows for k in r if k not in fixed})
    return fixed + extra


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table (accuracies in percent, 2 decimals; '–' where a run lacks a result)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> dict[str, Any]:
    """PNGs per run (`<run>_curves.png`, `<run>_lambda.png`) and, for every call, `comparison.md` / `.json`.

    `out_dir` defaults to the run's own directory when one run is given, else `report/` in the working directory.
    Returns `{"rows", "columns", "files"}`.
    """
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out_dir) if out_dir is not None else (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    names = [d.resolve().name for d in run_dirs]
    for run_dir, name in zip(run_dirs, names):
        # Two runs with the same folder name (runs/a/demo, runs/b/demo) would overwrite each other's PNGs.
        tag = name if names.count(name) == 1 else f"{run_dir.resolve().parent.name}_{name}"
        files.append(str(plot_training_curves(run_dir, out / f"{tag}_curves.png")))
        files.append(str(plot_lambda_histogram(run_dir, out / f"{tag}_lambda.png")))
    rows = [run_summary(d) for d in run_dirs]
    columns = comparison_columns(rows)
    (out / "comparison.md").write_text(to_markdown(rows, columns))
    (out / "comparison.json").write_text(json.dumps({"columns": columns, "rows": rows}, indent=2))
    files += [str(out / "comparison.md"), str(out / "comparison.json")]
    return {"rows": rows, "columns": columns, "files": files}
