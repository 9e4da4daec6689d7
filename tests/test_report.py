"""Run reports: curves and λ histogram PNGs from a metrics.jsonl, and the Table-5 style comparison of runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from mixmask.metrics import read_metrics
from mixmask.report import lambda_values, run_summary, to_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, *, branch: str, knn: list[float], lam: bool, evals: dict | None = None) -> Path:
    """A run directory as train.py leaves it: config.yaml, metrics.jsonl (train + knn records), eval JSONs."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"preset": f"demo-{branch}", "method": {"name": "moco", "branch": branch}, "computed": {"lr": 0.06}}))
    lines = []
    for step in range(10, 210, 10):
        rec = {"kind": "train", "step": step, "loss": 8 * math.exp(-step / 100), "loss_orig": 4 * math.exp(-step / 90),
               "lr": 0.06, "epoch": step // 50}
        if lam:
            rec["lam_mean"] = 0.5 + 0.05 * math.sin(step)
        lines.append(json.dumps(rec))
    for i, acc in enumerate(knn):
        lines.append(json.dumps({"kind": "knn", "step": 50 * (i + 1), "epoch": i + 1, "knn_top1": acc}))
    lines.append('{"kind": "train", "step": 2')  # a killed run's truncated last line is ignored
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for protocol, results in (evals or {}).items():
        (run / f"eval_{protocol}.json").write_text(json.dumps({"protocol": protocol, "results": results}))
    return run


def test_single_run_report_writes_pngs_next_to_the_run(tmp_path):
    run = make_run(tmp_path, "demo", branch="mixmask", knn=[30.0, 42.5, 41.0], lam=True)
    out = write_report([run])
    for name in ("demo_curves.png", "demo_lambda.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    lam = lambda_values(read_metrics(run / "metrics.jsonl"))
    assert len(lam) == 20 and all(0.45 <= v <= 0.55 for v in lam)
    row = out["rows"][0]
    assert row["knn_final"] == 41.0 and row["knn_best"] == 42.5 and row["steps"] == 200
    assert row["branch"] == "mixmask" and row["preset"] == "demo-mixmask"


def test_comparison_table_of_several_runs(tmp_path):
    a = make_run(tmp_path / "x", "demo", branch="vanilla", knn=[20.0, 25.0], lam=False,
                 evals={"linear": {"top1": 51.25, "top5": 90.0}, "knn": {"top1": 24.0, "top5": 70.0}})
    b = make_run(tmp_path / "y", "demo", branch="mixmask", knn=[22.0, 31.0, 30.5], lam=True,
                 evals={"linear": {"top1": 55.5, "top5": 92.0}, "semisup": {"top1": 40.0, "top5": 80.0}})
    out_dir = tmp_path / "report"
    out = write_report([a, b], out_dir)
    # Same run folder name in two places: the PNGs are told apart by the parent folder.
    for name in ("x_demo_curves.png", "x_demo_lambda.png", "y_demo_curves.png", "y_demo_lambda.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert out["columns"][:7] == ["run", "preset", "method", "branch", "steps", "knn_final", "knn_best"]
    assert {"linear_top1", "linear_top5", "knn_top1", "semisup_top1"} <= set(out["columns"])
    md = (out_dir / "comparison.md").read_text().splitlines()
    assert len(md) == 4 and md[0].startswith("| run | preset")
    header = [c.strip() for c in md[0].strip("|").split("|")]
    vanilla = dict(zip(header, (c.strip() for c in md[2].strip("|").split("|"))))
    assert vanilla["branch"] == "vanilla" and vanilla["knn_best"] == "25.00" and vanilla["linear_top1"] == "51.25"
    assert vanilla["semisup_top1"] == "–"
    saved = json.loads((out_dir / "comparison.json").read_text())
    assert saved["rows"][1]["linear_top1"] == 55.5 and saved["rows"][1]["knn_final"] == 30.5


def test_run_summary_reads_final_knn_and_tolerates_missing_files(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    row = run_summary(run)
    assert row["knn_final"] is None and row["method"] == ""
    (run / "final_knn.json").write_text(json.dumps({"knn_top1": 33.0}))
    assert run_summary(run)["knn_final"] == 33.0
    assert "| – |" in to_markdown([row], ["run", "knn_best"])


def test_report_cli(tmp_path, repo_root):
    a = make_run(tmp_path, "vanilla", branch="vanilla", knn=[20.0], lam=False)
    b = make_run(tmp_path, "mixmask", branch="mixmask", knn=[25.0], lam=True)
    out_dir = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "eval.py", "report", str(a), str(b), "--out", str(out_dir)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mixmask" in proc.stdout and "knn_best" in proc.stdout
    assert (out_dir / "mixmask_lambda.png").is_file() and (out_dir / "comparison.md").is_file()
    proc = subprocess.run([sys.executable, "eval.py", "report", str(tmp_path / "nope")], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
