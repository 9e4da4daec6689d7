"""Shared pytest set-up: the `gpu` marker skips without CUDA; tests run from the repository root; the demo run
starts in the background with the session and its test runs last."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=_is_demo)  # stable: the demo test last, everything else in its order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # Two cores here: keep torch from oversubscribing when several processes run (torchrun tests).
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


# ---- the demo run (tests/test_demo.py): started in the background when the session starts, checked last

DEMO_TEST = "test_demo.py::test_demo_trains_a_backbone_that_beats_random_init"
_demo: dict = {}


def _is_demo(item) -> bool:
    return item.nodeid.endswith(DEMO_TEST)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Start the demo now when it is selected (it runs minutes, mostly while other tests leave a core idle)."""
    if session.config.option.collectonly or not any(_is_demo(item) for item in session.items):
        return
    from tests.test_demo import start_demo

    _demo["dir"] = Path(tempfile.mkdtemp(prefix="pytest-demo-"))
    _demo["out"] = _demo["dir"] / "demo"
    _demo["proc"] = start_demo(ROOT, _demo["out"])


def pytest_sessionfinish(session, exitstatus):
    proc = _demo.pop("proc", None)
    if proc is not None and proc.poll() is None:  # the session stopped before the demo test (-x, Ctrl-C)
        proc.kill()
        proc.wait()
    if "dir" in _demo:
        shutil.rmtree(_demo.pop("dir"), ignore_errors=True)


@pytest.fixture
def demo_run(tmp_path):
    """(process, run directory) of the demo command: the one the session started, else started now."""
    if "proc" not in _demo:
        from tests.test_demo import start_demo

        _demo["out"] = tmp_path / "demo"
        _demo["proc"] = start_demo(ROOT, _demo["out"])
    return _demo["proc"], _demo["out"]
