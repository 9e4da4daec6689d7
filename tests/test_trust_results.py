"""Issue 14, silent wrong results: each case reproduced as it was found, on real files and real runs.

1. a held-out split with fewer / other classes than the train split (labels from the train split's class list);
2. one run per run directory (lock) and no silent config change on resume;
3. metrics.jsonl holds one history after a SIGKILL and a resume;
5. distributed evaluation does not count the padding of the last shard;
6. a 2-rank torchrun resume is bit-identical to the uninterrupted run.
(4, the report reading what training writes, is in test_report.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from mixmask.errors import UserError
from mixmask.run.build import build_method_from_config
from mixmask.run.checkpoint import save_atomic
from mixmask.run.config_cli import resolve, to_dict
from mixmask.run.rundir import check_resume_config, config_changes
from pipelines.sidecar import label_map
from tests.fixtures_data import save_image

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COLOURS = {"a_red": (220, 30, 30), "b_green": (30, 200, 40), "c_blue": (30, 40, 220), "d_yellow": (230, 220, 20)}


def _colour_image(rgb: tuple[int, int, int], seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-12, 13, size=(20, 20, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def make_colour_folder(root: Path, split: str, counts: dict[str, int], *, odd_one: str | None = None) -> None:
    """`root/split/<class>/*.png`: each class one colour (a random backbone's kNN separates them); `odd_one`
    puts a blue image first in that class, so exactly one held-out image is misclassified."""
    seed = 0 if split == "train" else 1000
    for name, n in counts.items():
        for j in range(n):
            colour = COLOURS["c_blue"] if (name == odd_one and j == 0) else COLOURS[name]
            save_image(root / split / name / f"img_{j:02d}.png", _colour_image(colour, seed))
            seed += 1


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> dict[str, Path]:
    """Train: red, green, blue (4 each). Val: red (3, the first one blue) and blue (4), no green folder: 7 images,
    6 classified right, an odd count for 2 ranks. `extra`: a val split with a class the train split lacks."""
    from pipelines.convert import convert

    tmp = tmp_path_factory.mktemp("colours")
    root = tmp / "colours"
    make_colour_folder(root, "train", {"a_red": 4, "b_green": 4, "c_blue": 4})
    make_colour_folder(root, "val", {"a_red": 3, "c_blue": 4}, odd_one="a_red")
    extra = tmp / "extra"
    make_colour_folder(extra, "val", {"a_red": 2, "b_green": 2, "c_blue": 2, "d_yellow": 2})
    out = {"root": root, "extra_root": extra, "tmp": tmp}
    for name, src, split in (("train", root, "train"), ("val", root, "val"), ("extra", extra, "val")):
        out[name] = tmp / f"{name}.beton"
        convert("imagefolder", out[name], root=src, split=split, workers=1)
    return out


@pytest.fixture(scope="module")
def checkpoint(colours) -> Path:
    """A random-init demo checkpoint in train.py's format (the kNN of colours needs no training)."""
    run = colours["tmp"] / "run"
    cfg = resolve("demo", None, ["method.moco.queue_size=128", "data.resolution=16",
                                 "method.cifar_stem=true"])
    torch.manual_seed(0)
    state = {"version": 1, "method": build_method_from_config(cfg).state_dict(), "optimizer": {}, "scaler": None,
             "epoch": 1, "step": 2, "step_in_epoch": 0, "rng": [], "config": to_dict(cfg), "computed": {},
             "provenance": {}}
    save_atomic(state, run / "checkpoints" / "last.pt")
    return run


def _data_args(colours: dict[str, Path], backend: str, val: str = "val") -> list[str]:
    if backend == "ffcv":
        return ["data.backend=ffcv", "data.workers=1", f"data.path={colours['train']}",
                f"data.val_path={colours[val]}"]
    root = colours["root"] if val == "val" else colours["extra_root"]
    return ["data.backend=torchvision", "data.workers=0", f"data.path={colours['root']}", f"data.val_path={root}"]


def eval_knn(repo_root: Path, checkpoint: Path, out: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 "29561"] if nproc > 1 else [sys.executable])
    cmd = [*launcher, "eval.py", "knn", "--checkpoint", str(checkpoint), "--out", str(out),
           "data.source=imagefolder", "data.resolution=16", "eval.knn_k=3", "eval.batch_size=4", "run.device=cpu",
           *args]
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=ENV)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- 1. labels from one class list


def test_label_map_against_names():
    assert label_map(["a", "b", "c"], ["a", "b", "c"], other="val") == (None, [])
    assert label_map(["a", "b", "c"], ["a", "c"], other="val") == ([0, 2], ["b"])
    assert label_map(["a", "b", "c"], ["c", "a"], other="val") == ([2, 0], ["b"])
    with pytest.raises(UserError, match="1 classes the train split lacks .'d'"):
        label_map(["a", "b", "c"], ["a", "d"], other="val")


@pytest.mark.parametrize("backend", ["ffcv", "torchvision"])
def test_eval_knn_on_a_val_split_lacking_a_class(repo_root, colours, checkpoint, tmp_path, backend):
    out = tmp_path / "knn.json"
    proc = eval_knn(repo_root, checkpoint, out, *_data_args(colours, backend))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lacks 1 of the train split's classes ('b_green')" in proc.stderr
    record = json.loads(out.read_text())
    # 6 of 7 right with the train split's ids (val's own numbering gave blue id 1 = green: 2 of 7).
    assert record["num_classes"] == 3 and record["num_val"] == 7
    assert record["results"]["top1"] == pytest.approx(600 / 7)


@pytest.mark.parametrize("backend", ["ffcv", "torchvision"])
def test_val_split_with_a_class_the_train_split_lacks_is_one_line(repo_root, colours, checkpoint, tmp_path,
                                                                  backend):
    proc = eval_knn(repo_root, checkpoint, tmp_path / "knn.json", *_data_args(colours, backend, val="extra"))
    one_line_error(proc, "classes the train split lacks ('d_yellow')")


def test_knn_monitor_on_a_val_split_lacking_a_class(repo_root, colours, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--preset", "demo", "data.source=imagefolder",
                           *_data_args(colours, "ffcv"), "data.resolution=16", "data.batch_size=4",
                           "method.moco.queue_size=64", "run.epochs=1", "run.knn_every=1",
                           "eval.knn_k=3", "eval.batch_size=4", "run.progress=false", "run.tensorboard=false",
                           "optim.base_lr=1e-8", f"run.out_dir={out}"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lacks 1 of the train split's classes ('b_green')" in proc.stderr
    knn = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "knn"]
    assert [r["knn_top1"] for r in knn] == [pytest.approx(600 / 7)]


# ---- 5. distributed evaluation counts every image once


def test_two_process_eval_equals_single_process(repo_root, colours, checkpoint, tmp_path):
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    args = _data_args(colours, "torchvision")
    with ThreadPoolExecutor(2) as pool:  # independent runs side by side: the single process leaves a core idle
        runs = [pool.submit(eval_knn, repo_root, checkpoint, single, *args),
                pool.submit(eval_knn, repo_root, checkpoint, double, *args, nproc=2)]
    for proc in (r.result() for r in runs):
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["world_size"] == 2
    # 7 images on 2 ranks: rank 1 gets the first (misclassified) image again as padding; counted, top-1 was 6/8.
    assert (two["num_val"], two["num_train"]) == (one["num_val"], one["num_train"]) == (7, 12)
    assert two["results"] == one["results"]


# ---- 2. one run per run directory, no silent config change on resume


def test_config_changes_lists():
    stored = to_dict(resolve("demo", None, []))
    same = check_resume_config(stored, stored, checkpoint=Path("last.pt"), allow_change=False)
    assert same == []
    new = to_dict(resolve("demo", None, ["run.epochs=80", "run.log_every=5", "eval.knn_k=7", "data.workers=0"]))
    assert config_changes(stored, new) == ([], ["data.workers", "eval.knn_k", "run.epochs", "run.log_every"])
    new = to_dict(resolve("demo", None, ["run.epochs=2", "data.batch_size=64", "method.name=byol", "run.seed=1"]))
    refused, _ = config_changes(stored, new)
    assert refused == ["data.batch_size", "method.name", "run.epochs", "run.seed"]
    with pytest.raises(UserError, match=r"data.batch_size 128 → 64.*run.allow_config_change=true"):
        check_resume_config(stored, new, checkpoint=Path("last.pt"), allow_change=False)
    notes = check_resume_config(stored, new, checkpoint=Path("last.pt"), allow_change=True)
    assert "data.batch_size" in notes[0]
    future = {**stored, "mask": {**stored["mask"], "new_key": "x"}}  # a key the stored config does not know
    assert config_changes(stored, future)[0] == ["mask.new_key"]


SMALL = [
    "data.synthetic_images=192", "data.synthetic_val_images=64", "data.resolution=16", "data.batch_size=32",
    "method.cifar_stem=false", "method.moco.queue_size=64", "mask.grid_size=4", "run.knn_every=0",
    "run.progress=false", "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0",
]


def train_cmd(repo_root: Path, out: Path, *extra: str, backend: str = "torchvision") -> list[str]:
    return [sys.executable, "train.py", "--preset", "demo", *SMALL, f"data.backend={backend}",
            "data.workers=0" if backend == "torchvision" else "data.workers=1",
            f"data.data_dir={repo_root / 'data' / 'test-cache'}", f"run.out_dir={out}", *extra]


def train(repo_root: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(repo_root, out, *extra), cwd=repo_root, capture_output=True, text=True,
                          timeout=300, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_lock_sigkill_and_resume_keep_one_run_and_one_history(repo_root, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(repo_root, out, "run.epochs=3"), cwd=repo_root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # inside the second epoch: last.pt at step 6, rows past it
            if (out / "metrics.jsonl").is_file() and len(steps(out)) >= 8:
                break
            if first.poll() is not None:
                pytest.fail(f"run ended early: {first.stderr.read()[-2000:]}")
            time.sleep(0.05)
        second = train(repo_root, out, "run.epochs=3", check=False)
        one_line_error(second, f"in use by another training run (PID {first.pid})")
        first.kill()  # SIGKILL: no chance to save or to release anything by hand
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    before = steps(out)
    killed_at = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert max(before) > killed_at  # rows past the checkpoint: logged again by the resumed run
    proc = train(repo_root, out, "run.epochs=3")  # the dead run's lock is taken over
    assert f"dropped {max(before) - killed_at} records past step {killed_at}" in proc.stderr
    assert steps(out) == list(range(1, 19))
    assert (out / "run.lock").read_text().strip() not in ("", str(first.pid))  # the new holder's PID


def test_resume_with_another_config_is_refused(repo_root, tmp_path):
    out = tmp_path / "run"
    train(repo_root, out, "run.epochs=2", "run.max_steps=6")
    config = (out / "config.yaml").read_text()
    weights = (out / "checkpoints" / "last.pt").read_bytes()
    proc = train(repo_root, out, "run.epochs=2", "data.batch_size=64", "method.moco.temperature=0.5", check=False)
    one_line_error(proc, "data.batch_size 32 → 64", "method.moco.temperature", "run.out_dir",
                   "run.allow_config_change=true")
    one_line_error(train(repo_root, out, "run.epochs=1", check=False), "run.epochs 2 → 1")
    one_line_error(train(repo_root, out, "run.epochs=2", "run.resume=none", check=False), "run.resume=auto")
    assert (out / "config.yaml").read_text() == config  # nothing overwritten by the refused runs
    assert (out / "checkpoints" / "last.pt").read_bytes() == weights
    proc = train(repo_root, out, "run.epochs=3", "run.max_steps=12", "run.log_every=2")  # allowed changes
    assert "run.epochs 2 → 3" in proc.stderr and "resumed from" in proc.stderr
    proc = train(repo_root, out, "run.epochs=3", "method.moco.temperature=0.5", "run.allow_config_change=true")
    assert "method.moco.temperature" in proc.stderr and "resumed from" in proc.stderr


# ---- 6. a 2-rank torchrun resume is bit-identical


def torchrun(repo_root: Path, out: Path, port: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *train_cmd(repo_root, out, "run.epochs=1", *extra)[1:]]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_torchrun_resume_is_bit_identical(repo_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # 63 held-out images: the final kNN (2 ranks) also runs through the padded last shard.
    knn = ["run.knn_every=1", "data.synthetic_val_images=63", "eval.knn_k=10"]
    torchrun(repo_root, straight, 29571, *knn)
    torchrun(repo_root, resumed, 29572, *knn, "run.max_steps=3")  # stopped mid-epoch, as a signal does
    torchrun(repo_root, resumed, 29573, *knn)
    assert losses(resumed) == losses(straight) and sorted(losses(straight)) == list(range(1, 7))
    final = [json.loads((d / "final_knn.json").read_text()) for d in (straight, resumed)]
    assert final[0]["knn_top1"] == final[1]["knn_top1"] and 0 < final[0]["knn_top1"] < 100
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["method"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["method"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_unshard_of_webdataset_eval_shares_equals_one_rank(tmp_path, backend):
    """Shards are read in contiguous shares padded at their ends: unsharding 2 ranks gives the 1-rank epoch."""
    from mixmask.evaluation.features import unshard
    from pipelines.convert import convert
    from pipelines.loaders import build_eval_loader

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    convert("synthetic", tmp_path / "odd", num_images=41, num_classes=3, resolution=16, out_format="wds",
            shard_samples=10, workers=1)

    def epoch(rank: int, world_size: int):
        loader = build_eval_loader(backend, source="synthetic", path=str(tmp_path / "odd"), split="train",
                                   resolution=16, batch_size_per_rank=8, train_aug=False, rank=rank,
                                   world_size=world_size, workers=1, device=torch.device("cpu"))
        images, labels = zip(*loader)
        return torch.cat(images), torch.cat(labels), loader

    x1, y1, single = epoch(0, 1)
    shares = [epoch(r, 2) for r in (0, 1)]
    x2, y2 = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
    loader = shares[0][2]
    assert (loader.num_samples, loader.rank_layout, x2.shape[0]) == (41, "contiguous", 42)
    assert torch.equal(unshard(y2, 2, 41, loader.rank_layout), y1)
    assert not torch.equal(unshard(x2, 2, 41, "strided"), x1)  # the other layout would keep a duplicate
    assert torch.equal(unshard(x2, 2, 41, loader.rank_layout), x1)
