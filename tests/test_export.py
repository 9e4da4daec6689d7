"""Backbone export: torchvision key names, and detectron2's naming for the transfer experiments."""

from __future__ import annotations

import pickle
import subprocess
import sys

import torch
import torchvision

from mixmask.core.backbones import build_backbone
from mixmask.evaluation.features import backbone_state
from mixmask.export import to_detectron2
from mixmask.run.build import build_method_from_config
from mixmask.run.checkpoint import save_atomic
from mixmask.run.config_cli import resolve, to_dict


def test_method_backbone_exports_torchvision_names():
    cfg = resolve("imagenet-moco-mixmask", None, ["method.arch=resnet18", "method.moco.queue_size=256"])
    method = build_method_from_config(cfg)
    state = backbone_state(method.state_dict())
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_detectron2_names_cover_every_tensor():
    backbone, _ = build_backbone("resnet50", cifar_stem=False)
    state = backbone.state_dict()
    converted = to_detectron2(state)["model"]
    expected = len([k for k in state if "num_batches_tracked" not in k])
    assert len(converted) == expected
    assert "stem.conv1.weight" in converted and "stem.conv1.norm.running_mean" in converted
    assert "res2.0.conv1.weight" in converted and "res2.0.conv1.norm.weight" in converted
    assert "res5.2.conv3.norm.bias" in converted
    assert "res3.0.shortcut.weight" in converted and "res3.0.shortcut.norm.running_var" in converted
    assert not any(k.startswith("layer") or ".bn" in k or "downsample" in k for k in converted)
    torch.testing.assert_close(torch.from_numpy(converted["res4.1.conv2.weight"]), state["layer3.1.conv2.weight"])


def test_export_cli_writes_a_pickle_from_a_checkpoint(tmp_path, repo_root):
    cfg = resolve("demo")
    method = build_method_from_config(cfg)
    ckpt = tmp_path / "last.pt"
    save_atomic({"method": method.state_dict(), "config": to_dict(cfg)}, ckpt)
    out = tmp_path / "d2.pkl"
    proc = subprocess.run([sys.executable, "-m", "mixmask.export", str(ckpt), "--detectron2", str(out)],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] and "res5.1.conv2.weight" in data["model"]
    bad = subprocess.run([sys.executable, "-m", "mixmask.export", str(tmp_path / "none.pt"), "--detectron2",
                          str(out)], cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
