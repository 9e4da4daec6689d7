"""Plots of a run's metrics.jsonl (matplotlib, headless): loss terms, mean λ and the kNN monitor."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mixmask.metrics import read_metrics


def plot_training_curves(run_dir: Path, out: Path) -> Path:
    """Loss terms (left), kNN top-1 (right) over optimizer steps; written atomically to `out`."""
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
        ax_knn.plot(xs, ys, marker="o")
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
