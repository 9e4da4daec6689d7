"""The conda environment for clusters and the pip requirements name the same packages at the same versions."""

from __future__ import annotations

import re

import yaml


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[A-Za-z0-9_,\-]+\])?)==([^\s;]+)", line)  # name[extras]==version
        assert m, f"requirement {line!r} is not pinned with =="
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_environment_yml_matches_requirements(repo_root):
    required = _pins((repo_root / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    conda_pins = _pins(pip_sections[0])
    assert conda_pins == required
    conda_names = [d.split("=")[0] for d in env["dependencies"] if isinstance(d, str)]
    for system_lib in ("pkg-config", "opencv", "libjpeg-turbo"):
        assert system_lib in conda_names, f"environment.yml misses {system_lib} (ffcv builds against it)"


def test_required_packages_are_pinned(repo_root):
    required = _pins((repo_root / "requirements.txt").read_text().splitlines())
    # numba-cuda[cu13]: the mask kernel's CUDA toolchain from pip wheels (numba alone needs conda or a system CUDA).
    for name in ("torch", "torchvision", "nvidia-dali-cuda130", "ffcv", "numpy", "rich", "numba-cuda[cu13]"):
        assert name in required
    assert required["torch"] == "2.14.1" and required["torchvision"] == "0.29.1" and required["ffcv"] == "1.0.2"
