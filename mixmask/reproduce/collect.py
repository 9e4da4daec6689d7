"""Collect the measured numbers of a table's runs beside the paper's published ones: Markdown, JSON and a PNG.

Measured values are read from what the producers write: `eval_linear.json` (eval.py: `results.top1`),
`eval_knn.json` when present (eval.py knn) else `final_knn.json` (train.py: `knn_top1`). Published values come from
`mixmask/reproduce/paper_results.yaml`, each with its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mixmask.reproduce.tables import Run, Table

PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.yaml"


def load_paper(path: Path = PAPER_RESULTS) -> dict[str, Any]:
    """`{"sources": {id: text}, "tables": {table: {dataset: {cell key: {value, source} | None}}}}`."""
    return yaml.safe_load(Path(path).read_text())


def paper_value(paper: dict, table: str, dataset: str, key: str) -> tuple[float | None, str | None]:
    """The published number of one cell and its source text, or (None, None) when the paper's value is unknown."""
    entry = ((paper.get("tables") or {}).get(table) or {}).get(dataset, {}).get(key)
    if not entry or entry.get("value") is None:
        return None, None
    return float(entry["value"]), paper["sources"][entry["source"]]


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def measured(run: Run) -> dict[str, float | None]:
    """Linear and kNN top-1 (%) of a run, None where its result file is missing."""
    linear = (_json(run.run_dir / "eval_linear.json") or {}).get("results", {}).get("top1")
    knn = (_json(run.run_dir / "eval_knn.json") or {}).get("results", {}).get("top1")
    if knn is None:
        knn = (_json(run.run_dir / "final_knn.json") or {}).get("knn_top1")
    return {"linear": None if linear is None else float(linear), "knn": None if knn is None else float(knn)}


def collect(table: Table, dataset: str, runs: list[Run], paper: dict) -> list[dict[str, Any]]:
    """One record per cell: row, column, run, measured linear / kNN, the published value and its source."""
    by_cell = {key: run for run in runs for key in run.cells}
    records = []
    for cell in table.cells(dataset):
        run = by_cell.get(cell.key)
        value, source = paper_value(paper, table.name, dataset, cell.key)
        ours = measured(run) if run is not None else {"linear": None, "knn": None}
        records.append({"row": cell.row, "column": cell.column, "key": cell.key, "run": cell.run,
                        "run_dir": str(run.run_dir) if run is not None else None,
                        "overrides": list(cell.overrides), "ours": ours.get(table.metric), "ours_knn": ours["knn"],
                        "paper": value, "paper_source": source})
    return records


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _delta(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or paper is None else f"{ours - paper:+.2f}"


def to_markdown(table: Table, dataset: str, records: list[dict], *, tiny: bool = False) -> str:
    """The table in the paper's layout (rows x columns), each cell's measured value beside the published one."""
    metric = {"linear": "linear top-1 (%)", "knn": "kNN top-1 (%)"}[table.metric]
    rows, columns = table.rows(dataset), table.columns(dataset)
    cell = {(r["row"], r["column"]): r for r in records}
    out = [f"## {table.title} — {dataset}", ""]
    if tiny:
        out += ["**Scale tiny**: synthetic data and a few steps per run. These numbers check the pipeline, they are "
                "not comparable to the paper's.", ""]
    out += [f"{metric}: ours / paper (Δ = ours − paper). " + table.note, ""]
    if len(columns) == 1:
        header = ["", "ours", "paper", "Δ", "ours kNN", "run", "overrides"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for row in rows:
            r = cell[(row, columns[0])]
            out.append("| " + " | ".join([row, _fmt(r["ours"]), _fmt(r["paper"]), _delta(r["ours"], r["paper"]),
                                          _fmt(r["ours_knn"]), r["run"], " ".join(r["overrides"]) or "–"]) + " |")
    else:
        header = [""] + [f"{c} {side}" for c in columns for side in ("ours", "paper")]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for row in rows:
            values = [_fmt(cell[(row, c)][side]) for c in columns for side in ("ours", "paper")]
            out.append("| " + " | ".join([row, *values]) + " |")
        if table.metric != "knn":
            out += ["", "kNN top-1 (%), ours (train.py's final kNN):", "",
                    "| | " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in range(len(columns) + 1)) + "|"]
            for row in rows:
                out.append("| " + " | ".join([row, *(_fmt(cell[(row, c)]["ours_knn"]) for c in columns)]) + " |")
    sources = sorted({r["paper_source"] for r in records if r["paper_source"]})
    out += ["", "Published values: " + ("; ".join(sources) if sources else
                                         "none of this table's values could be read from a source here "
                                         "(`mixmask/reproduce/paper_results.yaml` keeps them as null)") + "."]
    return "\n".join(out) + "\n"


def plot(table: Table, dataset: str, records: list[dict], out: Path) -> Path:
    """Bars of ours beside the paper's per cell; one panel per row for row x column tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = table.rows(dataset), table.columns(dataset)
    panels = [(row, [r for r in records if r["row"] == row]) for row in rows] if len(columns) > 1 else \
        [(columns[0], records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 3.2 * len(panels)), 4.2), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (title, recs) in zip(axes[0], panels):
        labels = [r["column"] if len(columns) > 1 else r["row"] for r in recs]
        xs = range(len(recs))
        ours = [r["ours"] if r["ours"] is not None else 0.0 for r in recs]
        paper = [r["paper"] if r["paper"] is not None else 0.0 for r in recs]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="ours", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper", color="tab:grey")
        at_bottom = ax.get_xaxis_transform()  # x in data, y in axes fraction
        for x, r in zip(xs, recs):
            if r["paper"] is None:
                ax.text(x + 0.2, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, transform=at_bottom)
            if r["ours"] is None:
                ax.text(x - 0.2, 0.02, "pending", ha="center", va="bottom", fontsize=7, rotation=90,
                        transform=at_bottom)

        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    values = [r[side] for r in records for side in ("ours", "paper") if r[side] is not None]
    axes[0][0].set_ylim(0, 1.15 * max([*values, 1.0]))  # shared by every panel
    axes[0][0].set_ylabel({"linear": "linear top-1 (%)", "knn": "kNN top-1 (%)"}[table.metric])
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{table.title} — {dataset}", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def write_results(table: Table, dataset: str, runs: list[Run], out_dir: Path, *, tiny: bool = False,
                  paper: dict | None = None) -> dict[str, Any]:
    """`results.md`, `results.json` and `results.png` in `out_dir`; returns the records and the file paths."""
    records = collect(table, dataset, runs, load_paper() if paper is None else paper)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(to_markdown(table, dataset, records, tiny=tiny))
    js = out_dir / "results.json"
    js.write_text(json.dumps({"table": table.name, "dataset": dataset, "metric": table.metric, "tiny": tiny,
                              "cells": records}, indent=2) + "\n")
    png = plot(table, dataset, records, out_dir / "results.png")
    return {"records": records, "files": [str(md), str(js), str(png)]}
