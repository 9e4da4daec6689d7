"""The GPU check stays runnable: `GPU_CHECK_DEVICE=cpu make gpu-check` runs every part at tiny sizes on the CPU."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

# Every row the check promises (README "GPU acceptance"), in order: the summaries must hold each, whatever happens.
ROWS = [
    ("env", "environment"),
    ("peak", "matmul peak"),
    ("kernel", "mask kernel: CUDA = CPU"),
    ("kernel", "mask kernel: 256 masks"),
    ("sync", "sync-free: operator"),
    ("sync", "sync-free: photometric ops"),
    ("sync", "sync-free: train step"),
    ("step", "step moco/vanilla"),
    ("step", "step moco/mixmask"),
    ("step", "step moco/mixmask-unmix"),
    ("masks", "masks + mix share of the step"),
    ("ddp", "process group, 1 rank"),
    ("ddp", "DDP step, 1 rank"),
    ("pytest", "pytest -m gpu"),
    ("ffcv", "ffcv loader to the device"),
    ("ffcv", "e2e ffcv"),
    ("dali", "dali loader to the device"),
    ("dali", "e2e dali"),
    ("compile", "step moco/mixmask compiled"),
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_rehearsal_writes_both_summaries_with_every_row(tmp_path, repo_root):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path)}
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=390)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert [(r["part"], r["name"]) for r in summary["rows"]] == ROWS
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["device"] == "cpu" and summary["total_s"] < summary["budget_s"]
    for part, name in ROWS:
        assert f"| {part} | {name} | {rows[name]['status']} |" in markdown

    # Without CUDA the sync-debug rows say why; everything else ran and passed on the CPU.
    for name in ("sync-free: operator", "sync-free: photometric ops", "sync-free: train step"):
        assert rows[name]["status"] == "skipped" and rows[name]["detail"].startswith("needs CUDA")
    assert all(r["status"] == "pass" for r in summary["rows"] if not r["name"].startswith("sync-free"))

    assert rows["mask kernel: CUDA = CPU"]["figures"] == {"masks": 48, "differing": 0}
    for name in ("step moco/vanilla", "step moco/mixmask", "step moco/mixmask-unmix", "step moco/mixmask compiled"):
        f = rows[name]["figures"]
        assert f["images_per_s"] > 0 and f["tflops"] > 0 and f["ratio_to_limit"] > 0
    assert [rows[f"step moco/{b}"]["figures"]["forward_equivalents"] for b in ("vanilla", "mixmask",
                                                                              "mixmask-unmix")] == [4, 7, 10]
    assert rows["step moco/mixmask compiled"]["figures"]["compile_s"] > 0
    assert 0 < rows["masks + mix share of the step"]["figures"]["share_of_mixmask_step"] < 1
    assert rows["process group, 1 rank"]["figures"]["backend"] == "gloo"
    assert rows["DDP step, 1 rank"]["figures"]["params_changed"] > 0
    assert rows["pytest -m gpu"]["figures"]["skipped"] >= 4  # the gpu marker's tests, skipped without CUDA
    for backend in ("ffcv", "dali"):
        assert 0 <= rows[f"e2e {backend}"]["figures"]["data_wait_share"] < 1


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    from scripts.gpu_check import Check

    check = Check("cpu", {"size": "tiny"}, tmp_path, dict(os.environ), time.monotonic() + 60, tmp_path / "log")
    check.limit_s = 1.0
    t0 = time.monotonic()
    # The child shell starts a grandchild that would outlive a plain kill of the shell.
    result = check.run("sleeper", ["bash", "-c", "sleep 30 & echo $! > pid; wait"])
    assert result.timed_out and result.rc is None and time.monotonic() - t0 < 10
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert "sleeper" in (tmp_path / "log").read_text()


def test_a_failed_or_late_part_still_gives_every_row(tmp_path):
    from scripts.gpu_check import Check, PartFailed, Result, run_part

    check = Check("cpu", {"size": "tiny"}, tmp_path, dict(os.environ), time.monotonic() + 60, tmp_path / "log")

    def broken(c):
        raise PartFailed(Result(1, "", "Traceback ...\nValueError: bad size\n", 0.1), "bench.py step")

    rows, timing = run_part(check, "step", ["a", "b"], 30, broken)
    line = "bench.py step exited 1: ValueError: bad size"
    assert [(r["part"], r["name"], r["status"], r["detail"]) for r in rows] == [
        ("step", "a", "fail", line), ("step", "b", "fail", line)]
    assert timing["status"] == "failed" and timing["limit_s"] == 30

    check.deadline = time.monotonic() + 2  # less than a part needs to start: skipped, not started
    rows, timing = run_part(check, "compile", ["c"], 300, lambda c: pytest.fail("a late part must not start"))
    assert [(r["name"], r["status"], r["detail"]) for r in rows] == [("c", "skipped", "out of the time budget")]


def _wheel(folder, dist: str, version: str) -> None:
    """A minimal pure-Python wheel holding one module `dist` whose VERSION is `version`."""
    info = f"{dist}-{version}.dist-info"
    files = {f"{dist}.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_carried_wheels_install_when_missing_or_another_version(tmp_path):
    from scripts.gpu_check import _wheel_path

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe", "1.0")  # missing here: installed
    _wheel(wheels, "iniconfig", "0.0.1")  # present in another version (as antlr4 4.13 beside omegaconf): installed
    _wheel(wheels, "pytest", importlib.metadata.version("pytest"))  # present in this version: left alone
    env = {**os.environ, "PYTHONPATH": ""}
    note = _wheel_path(env, tmp_path, wheels)
    assert note == ("installed gpucheck_probe-1.0-py3-none-any.whl, iniconfig-0.0.1-py3-none-any.whl into a "
                    "temporary target")
    probe = subprocess.run([sys.executable, "-c", "import gpucheck_probe, iniconfig; print(gpucheck_probe.VERSION, "
                            "iniconfig.VERSION)"], env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["1.0", "0.0.1"], probe.stderr[-1000:]


def test_failure_line_is_the_last_error_and_names_an_older_torch():
    from scripts.gpu_check import Result
    from scripts.gpu_check_report import failure_line

    err = "Traceback (most recent call last):\n  File x\nAttributeError: module 'torch' has no attribute 'foo'\n"
    env = {"torch": "2.11.0+cu130", "torch_pinned": "2.14.1"}
    line = failure_line(Result(1, "", err, 2.0), "bench.py step", env)
    assert line == ("bench.py step exited 1: AttributeError: module 'torch' has no attribute 'foo' "
                    "(torch 2.11.0+cu130 here, 2.14.1 pinned: this may need the newer torch)")
    same = {"torch": "2.14.1", "torch_pinned": "2.14.1"}
    assert failure_line(Result(1, "", err, 2.0), "x", same).endswith("has no attribute 'foo'")
    assert failure_line(Result(None, "", "", 91.0, timed_out=True), "x", env) == \
        "x: stopped at its time limit after 91s"
    assert failure_line(Result(2, "", "error: data.path is required\n", 1.0), "e2e", env) == \
        "e2e exited 2: error: data.path is required"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie waits only for its parent to read its exit code
    except FileNotFoundError:
        return False
