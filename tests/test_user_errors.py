"""Mistakes a user can make get one line on stderr, no traceback, and a non-zero exit; machine limits adapt.

Every case runs the real command line (`train.py`, `bench.py`, `python -m mixmask.export`) in a subprocess.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(repo_root: Path, *args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kwargs)


def run_side_by_side(repo_root: Path, *commands: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent commands at once (each uses one core; most of their time is start-up), in the order given."""
    procs = [subprocess.Popen([sys.executable, *args], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for args in commands]
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one line on stderr holding every needle; returns that line."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- 12. worker counts adapt to the cores this process may use

def test_paper_preset_runs_on_a_machine_with_fewer_cores_than_its_workers(repo_root, tmp_path):
    """cifar100-* asks for 8 loader workers; FFCV's numba threads cannot exceed the usable cores (1 here, by
    affinity, whatever the machine). One core rather than two: the cap is the same check, and a one-thread loader
    spares the test numba's costly compilation of the parallel pipeline (covered by test_loaders_ffcv.py and the
    demo). The data directory is new, so the run converts its datasets itself, as a first run on a new machine does:
    with numba's TBB layer, that fork after importing ffcv made the finished run hang at exit on one core
    (`pipelines.numba_threads`)."""
    cores = 1
    proc = run(repo_root, "train.py", "--preset", "cifar100-moco-mixmask", "data.source=synthetic",
               "data.synthetic_images=64", "data.synthetic_val_images=32", "data.batch_size=16",
               "data.resolution=16", "run.max_steps=2", "run.device=cpu", "method.moco.queue_size=64",
               "run.knn_every=0", "run.progress=false", "run.tensorboard=false",
               f"data.data_dir={tmp_path / 'data'}", f"run.out_dir={tmp_path / 'run'}",
               preexec_fn=lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: data.workers=8 lowered to {cores}" in proc.stderr
    assert "32 images" in proc.stderr  # the kNN split was converted in this run
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# ---- 10. one line naming the file or key and the fix

TINY = ["--preset", "demo", "data.resolution=16", "data.batch_size=8", "data.workers=0", "method.cifar_stem=false",
        "method.moco.queue_size=16", "mask.grid_size=4", "run.progress=false", "run.tensorboard=false", "run.epochs=1"]


@pytest.fixture(scope="module")
def tiny_run(repo_root, tmp_path_factory) -> Path:
    """A real run directory (MoCo / ResNet-18, two steps on the synthetic default, torchvision backend)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run(repo_root, "train.py", *TINY, "data.backend=torchvision", "data.synthetic_images=16",
               "data.synthetic_val_images=16", "run.max_steps=2", "run.knn_every=0", f"run.out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def betons(repo_root, tmp_path_factory) -> Path:
    """A folder with a real train/val pair of .beton files (and sidecars) written by the converter."""
    folder = tmp_path_factory.mktemp("betons")
    procs = run_side_by_side(repo_root, *(
        ["-m", "pipelines.convert", "synthetic", "--split", split, "--num-images", "40", "--num-classes", "4",
         "--resolution", "16", "--workers", "1", "--no-progress", "--out", str(folder / f"tiny-{split}.beton")]
        for split in ("train", "val")))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return folder


@pytest.mark.parametrize("damage", ["train truncated", "train empty", "val random bytes"])
def test_unreadable_beton_is_one_line(repo_root, tmp_path, betons, damage):
    import shutil

    for name in ("tiny-train.beton", "tiny-train.beton.json", "tiny-val.beton", "tiny-val.beton.json"):
        shutil.copy(betons / name, tmp_path / name)
    target = tmp_path / ("tiny-val.beton" if damage.startswith("val") else "tiny-train.beton")
    data = target.read_bytes()
    target.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                        "random bytes": os.urandom(len(data))}[damage.split(" ", 1)[1]])
    proc = run(repo_root, "train.py", *TINY, "data.source=imagefolder", "data.backend=ffcv",
               f"data.path={tmp_path / 'tiny-train.beton'}", "run.knn_every=1", "run.max_steps=1",
               f"run.out_dir={tmp_path / 'run'}")
    assert_one_line(proc, f"{target} cannot be read as a .beton", "python -m pipelines.convert")


def test_resume_from_a_checkpoint_of_another_method_is_one_line(repo_root, tmp_path, tiny_run):
    args = [*TINY, "data.backend=torchvision", "data.synthetic_images=16", "data.synthetic_val_images=16",
            "method.name=byol", "run.knn_every=0", f"run.resume={tiny_run / 'checkpoints' / 'last.pt'}"]
    checked, overridden = run_side_by_side(
        repo_root, ["train.py", *args, f"run.out_dir={tmp_path / 'run'}"],
        ["train.py", *args, "run.allow_config_change=true", f"run.out_dir={tmp_path / 'run2'}"])
    # The config check on resume (mixmask.run.rundir) names the changed keys first ...
    assert_one_line(checked, "was trained with another config", "method.name 'moco' → 'byol'")
    # ... and a deliberate override still meets the weights check, one line too.
    assert_one_line(overridden, "holds a moco/mixmask resnet18, not this run's byol/mixmask resnet18",
                    "run.resume=none")


def test_eval_of_a_checkpoint_with_another_architecture_is_one_line(repo_root, tiny_run):
    proc = run(repo_root, "eval.py", "knn", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"),
               "method.arch=resnet50")
    assert_one_line(proc, "resnet18", "method.arch=resnet50")


def test_export_of_a_corrupt_file_is_one_line(repo_root, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x13" + random.Random(0).randbytes(3999))  # neither a zip nor a pickle: never unpickled
    proc = run(repo_root, "-m", "mixmask.export", str(bad), "--detectron2", str(tmp_path / "out.pkl"))
    assert_one_line(proc, str(bad), "corrupt", "backbone.pt")


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_out_dir_that_cannot_be_written_is_one_line_before_any_work(repo_root, tmp_path, tiny_run, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folder = blocker / "run" if where == "under a file" else Path("/sys/mixmask-run")  # sysfs refuses even root
    ckpt = str(tiny_run / "checkpoints" / "last.pt")
    trained, evaluated, exported = run_side_by_side(
        repo_root, ["train.py", *TINY, "data.backend=torchvision", f"run.out_dir={folder}"],
        ["eval.py", "knn", "--checkpoint", ckpt, "--out", str(folder / "knn.json")],
        ["-m", "mixmask.export", ckpt, "--detectron2", str(folder / "d2.pkl")])
    assert_one_line(trained, f"run.out_dir={folder}", "choose")
    assert_one_line(evaluated, f"--out={folder}", "choose")
    assert_one_line(exported, f"--detectron2={folder}", "choose")


def test_yaml_syntax_error_names_line_and_column(repo_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  epochs: 3\n data: {batch_size: 8\n")
    proc = run(repo_root, "train.py", "--config", str(bad), "--print-config")
    assert_one_line(proc, str(bad), "is not valid YAML at line 3, column 2")


def test_a_section_given_a_value_is_one_line_naming_its_keys(repo_root):
    proc = run(repo_root, "train.py", "data=3", "--print-config")
    line = assert_one_line(proc, "'data' is a config section, not a key", "data.source=...", "batch_size")
    assert "did you mean 'data'" not in line


@pytest.mark.parametrize(("args", "needles"), [
    (["step", "--branches", "mixmsk"], ["unknown branch (--branches) 'mixmsk'", "did you mean 'mixmask'?"]),
    (["masks", "--grids", "0"], ["--grids 0 is not valid", "at least 1"]),
])
def test_bench_arguments_are_checked_before_any_work(repo_root, args, needles):
    proc = run(repo_root, "bench.py", *args, "--repeats", "1", "--device", "cpu")
    assert_one_line(proc, *needles)


def test_out_dir_under_a_file_stops_every_torchrun_rank_in_one_line(repo_root, tmp_path):
    """Rank 0 checks the folder; the others must stop with it, not wait for it in the first collective."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run(repo_root, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "train.py", *TINY, "data.backend=torchvision", f"run.out_dir={blocker / 'run'}", timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"run.out_dir={blocker / 'run'} lies under") == 2, proc.stderr[-3000:]
