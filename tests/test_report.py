"""Run reports: curves and λ histogram PNGs from a metrics.jsonl, and the Table-5 style comparison of runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixmask.run.metrics import read_metrics
from mixmask.run.report import lambda_values, run_summary, to_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The smallest real MixMask* run (both λ kinds logged): 64 synthetic images at 16 px, 4 steps.
TINY_RUN = [
    "data.synthetic_images=64", "data.synthetic_val_images=32", "data.resolution=16", "data.batch_size=16",
    "data.workers=0", "data.backend=torchvision", "method.cifar_stem=false", "method.moco.queue_size=32",
    "method.branch=mixmask-unmix", "mask.grid_size=4", "run.knn_every=0", "run.progress=false",
    "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0", "run.epochs=1",
]


@pytest.fixture(scope="module")
def real_run(repo_root, tmp_path_factory) -> Path:
    """A run directory written by a real (tiny) train.py run: what the report must read."""
    out = tmp_path_factory.mktemp("real") / "tiny"
    proc = subprocess.run([sys.executable, "train.py", "--preset", "demo", *TINY_RUN,
                           f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def make_run(root: Path, name: str, *, branch: str, knn: list[float], evals: dict | None = None) -> Path:
    """A run directory shaped like train.py's for the comparison table: config.yaml, metrics.jsonl (train + knn
    records), eval JSONs. λ is not faked here: the λ tests read a real run (`real_run`)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"preset": f"demo-{branch}", "method": {"name": "moco", "branch": branch}, "computed": {"lr": 0.06}}))
    lines = []
    for step in range(10, 210, 10):
        rec = {"kind": "train", "step": step, "loss": 8 * math.exp(-step / 100), "loss_orig": 4 * math.exp(-step / 90),
               "lr": 0.06, "epoch": step // 50}
        lines.append(json.dumps(rec))
    for i, acc in enumerate(knn):
        lines.append(json.dumps({"kind": "knn", "step": 50 * (i + 1), "epoch": i + 1, "knn_top1": acc}))
    lines.append('{"kind": "train", "step": 2')  # a killed run's truncated last line is ignored
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for protocol, results in (evals or {}).items():
        (run / f"eval_{protocol}.json").write_text(json.dumps({"protocol": protocol, "results": results}))
    return run


def test_lambda_histogram_reads_what_training_writes(real_run):
    lam = lambda_values(read_metrics(real_run / "metrics.jsonl"))
    assert sorted(lam) == ["mixmask", "unmix"]  # MixMask*: one λ series per mixed batch
    assert all(len(v) == 4 and all(0.0 < x < 1.0 for x in v) for v in lam.values())
    out = write_report([real_run])
    data = (real_run / "tiny_lambda.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert out["rows"][0]["steps"] == 4 and out["rows"][0]["branch"] == "mixmask-unmix"


def test_lambda_histogram_of_a_vanilla_run_is_empty(tmp_path):
    run = make_run(tmp_path, "vanilla", branch="vanilla", knn=[20.0])
    assert lambda_values(read_metrics(run / "metrics.jsonl")) == {}
    write_report([run])
    assert (run / "vanilla_lambda.png").read_bytes()[:8] == PNG_MAGIC


def test_single_run_report_writes_pngs_next_to_the_run(tmp_path):
    run = make_run(tmp_path, "demo", branch="mixmask", knn=[30.0, 42.5, 41.0])
    out = write_report([run])
    for name in ("demo_curves.png", "demo_lambda.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    row = out["rows"][0]
    assert row["knn_final"] == 41.0 and row["knn_best"] == 42.5 and row["steps"] == 200
    assert row["branch"] == "mixmask" and row["preset"] == "demo-mixmask"


def test_comparison_table_of_several_runs(tmp_path):
    a = make_run(tmp_path / "x", "demo", branch="vanilla", knn=[20.0, 25.0],
                 evals={"linear": {"top1": 51.25, "top5": 90.0}, "knn": {"top1": 24.0, "top5": 70.0}})
    b = make_run(tmp_path / "y", "demo", branch="mixmask", knn=[22.0, 31.0, 30.5],
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
    a = make_run(tmp_path, "vanilla", branch="vanilla", knn=[20.0])
    b = make_run(tmp_path, "mixmask", branch="mixmask", knn=[25.0])
    out_dir = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "eval.py", "report", str(a), str(b), "--out", str(out_dir)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mixmask" in proc.stdout and "knn_best" in proc.stdout
    assert (out_dir / "mixmask_lambda.png").is_file() and (out_dir / "comparison.md").is_file()
    proc = subprocess.run([sys.executable, "eval.py", "report", str(tmp_path / "nope")], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
