"""eval.py end to end: one-line errors (missing / corrupt checkpoint, other architecture, class count) and real
runs of the protocols on a checkpoint written in train.py's format, on the synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixmask.run.build import build_method_from_config
from mixmask.run.checkpoint import save_atomic
from mixmask.run.config_cli import resolve, to_dict

# Small enough for 2 shared CPU cores: 16 px images, 60 + 40 synthetic images of 4 classes.
SMALL = ["data.backend=torchvision", "data.workers=0", "data.resolution=16", "data.synthetic_images=60",
         "data.synthetic_val_images=40", "data.synthetic_classes=4", "eval.batch_size=32", "eval.knn_k=10"]


def _run(repo_root: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *args], cwd=repo_root, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding checkpoints/last.pt in train.py's format (demo preset, small overrides)."""
    run = tmp_path_factory.mktemp("run")
    cfg = resolve("demo", None, ["method.moco.queue_size=128", "data.resolution=16",
                                 f"data.data_dir={run / 'data'}"])
    torch.manual_seed(0)
    method = build_method_from_config(cfg)
    state = {"version": 1, "method": method.state_dict(), "optimizer": {}, "scaler": None, "epoch": 1, "step": 2,
             "step_in_epoch": 0, "rng": [], "config": to_dict(cfg), "computed": {}, "provenance": {}}
    save_atomic(state, run / "checkpoints" / "last.pt")
    return run


def test_missing_checkpoint_is_one_line(repo_root, tmp_path):
    _one_line_error(_run(repo_root, "knn", "--checkpoint", str(tmp_path / "none.pt")), "does not exist")
    _one_line_error(_run(repo_root, "knn", "--checkpoint", str(tmp_path)), "no checkpoints/last.pt")


def test_corrupt_checkpoint_is_one_line(repo_root, run_dir, tmp_path):
    good = (run_dir / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    _one_line_error(_run(repo_root, "linear", "--checkpoint", str(bad)), "corrupt or truncated")


def test_other_architecture_is_one_line(repo_root, run_dir):
    proc = _run(repo_root, "knn", "--checkpoint", str(run_dir), "method.arch=resnet50")
    _one_line_error(proc, "resnet18 (ImageNet stem) backbone but method.arch=resnet50")


def test_class_count_and_config_errors(run_dir, capsys):
    import eval as eval_cli

    def fails(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            eval_cli.main(list(argv))
        assert exc.value.code == 2
        return capsys.readouterr().err

    ckpt = str(run_dir / "checkpoints" / "last.pt")
    assert "--num-classes 7 but the dataset" in fails("knn", "--checkpoint", ckpt, "--num-classes", "7", *SMALL)
    assert "unknown config key 'eval.knn_kk'" in fails("knn", "--checkpoint", ckpt, "eval.knn_kk=3")
    subset = run_dir / "subset.txt"
    subset.write_text("3\n60\n")
    assert "index 60 is out of range (the dataset has 60 images)" in fails(
        "semisup", "--checkpoint", ckpt, "--subset", str(subset), *SMALL)
    not_ours = run_dir / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, not_ours)
    assert "not a training checkpoint" in fails("knn", "--checkpoint", str(not_ours))


def _loaders_available() -> bool:
    try:
        from pipelines.loaders import build_eval_loader  # noqa: F401
    except ImportError:
        return False
    return True


needs_loaders = pytest.mark.skipif(not _loaders_available(), reason="pipelines.loaders.build_eval_loader not built yet")


@needs_loaders
def test_knn_end_to_end_on_synthetic_data(repo_root, run_dir):
    out = run_dir / "knn.json"
    proc = _run(repo_root, "knn", "--checkpoint", str(run_dir), "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "top1" in proc.stdout
    record = json.loads(out.read_text())
    assert record["protocol"] == "knn" and record["num_train"] == 60 and record["num_val"] == 40
    assert 0.0 <= record["results"]["top1"] <= 100.0 and record["results"]["top5"] >= record["results"]["top1"]
    assert record["config"]["data"]["resolution"] == 16 and record["num_classes"] == 4


@needs_loaders
def test_linear_and_semisup_end_to_end(repo_root, run_dir):
    for protocol, extra in (("linear", ["eval.epochs=2"]),
                            ("semisup", ["eval.epochs=1", "eval.semisup_fraction=0.1"])):
        proc = _run(repo_root, protocol, "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), *SMALL, *extra)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((run_dir / f"eval_{protocol}.json").read_text())
        assert set(record["results"]) == {"top1", "top5"}
    assert json.loads((run_dir / "eval_semisup.json").read_text())["labelled_images"] == 8  # 4 classes x round(1.5)
    subset = run_dir / "four.txt"
    subset.write_text("0\n1\n2\n3\n3\n")
    out = run_dir / "semisup_file.json"
    proc = _run(repo_root, "semisup", "--checkpoint", str(run_dir), "--subset", str(subset), "--out", str(out),
                *SMALL, "eval.epochs=1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["labelled_images"] == 4 and record["subset"] == str(subset)
