"""Paper presets: pinned to the README's table of values and sources, the issue's paper facts checked on their own,
split BatchNorm's start-up rules, and the method the presets build."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from mixmask.core.backbones import SplitBatchNorm2d, cifar_stem_
from mixmask.core.methods import METHODS
from mixmask.errors import UserError
from mixmask.run.build import build_method_from_config
from mixmask.run.config import derived
from mixmask.run.config_cli import resolve
from mixmask.run.preset_table import FAMILIES, render_markdown, rows_for
from mixmask.run.presets import DATASETS, PRESETS, get_preset

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> str:
    text = README.read_text()
    match = re.search(r"<!-- preset-table:start -->\n(.*?)<!-- preset-table:end -->", text, re.S)
    assert match, "README lost its preset-table markers"
    return match.group(1)


def parse_readme_rows() -> list[tuple[str, str, str, str]]:
    """(family label, key, value text, source) of every row of the README's preset table."""
    rows = []
    for line in readme_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2], cells[3]))
    return rows


def config_value(cfg, key: str):
    value = cfg
    for part in key.split("."):  # method.moco.queue_size: a method's own section
        value = getattr(value, part)
    return value


def as_text(value) -> str:
    """How a README cell writes a config value (independent of the table module's formatter)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value))
    return str(value)


def family_presets(label: str) -> list[str]:
    """Preset names a README family label covers: `cifar100-*`, `{cifar100,tinyimagenet}-moco-*`, ..."""
    datasets_part, _, rest = label.partition("-")
    datasets = datasets_part.strip("{}").split(",")
    methods = None if rest == "*" else rest.removesuffix("-*").split("|")
    names = [n for n in PRESETS if n != "demo" and n.split("-")[0] in datasets
             and (methods is None or n.split("-")[1] in methods)]
    assert names, label
    return names


def test_readme_table_is_the_table_the_presets_are_built_from():
    assert readme_table() == render_markdown(), (
        "README preset table is stale: paste `python -m mixmask.run.preset_table`")


def test_every_readme_row_matches_every_preset_it_covers():
    rows = parse_readme_rows()
    assert len(rows) == sum(len(f.rows) for f in FAMILIES) > 100
    for label, key, text, source in rows:
        assert source, f"{label} {key} has no source"
        for name in family_presets(label):
            actual = as_text(config_value(get_preset(name), key))
            if " · " in text:  # per-dataset values: "cifar100: 64 · tinyimagenet: 128"
                expected = dict(part.split(": ") for part in text.split(" · "))[name.split("-")[0]]
            else:
                expected = text
            assert float(actual) == float(expected) if re.fullmatch(r"[\d.e+-]+", expected) else actual == expected, (
                f"{name}: {key} = {actual}, README says {text}")


def test_every_preset_value_has_exactly_one_source_and_names_a_real_key():
    for dataset in DATASETS:
        for method in ("moco", "simclr", "byol", "simsiam"):
            rows = rows_for(dataset, method)  # raises when a key is set twice
            keys = [k for k, _, _ in rows]
            assert len(keys) == len(set(keys))
            cfg = get_preset(f"{dataset}-{method}-mixmask")
            for key in keys:
                config_value(cfg, key)  # AttributeError for a key the config does not have


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_small_dataset_presets_are_the_papers_setup(dataset):
    """The issue's list, written out here rather than read from the table."""
    moco = get_preset(f"{dataset}-moco-mixmask")
    assert not moco.method.moco.mlp_head  # Table 1 caption: MoCo V1
    assert (moco.optim.name, moco.optim.base_lr, moco.optim.weight_decay) == ("sgd", 0.06, 5e-4)
    m = moco.method.moco
    assert (m.momentum, m.queue_size, m.temperature, m.dim) == (0.99, 4096, 0.1, 128)
    assert m.bn_splits == 8 and moco.data.batch_size == 512 and moco.run.epochs == 1000
    assert derived(moco, 1)["lr"] == pytest.approx(0.06)
    dim = {"cifar100": 64, "tinyimagenet": 128}[dataset]
    lr = {"cifar100": 0.003, "tinyimagenet": 0.002}[dataset]
    for method in ("simclr", "byol"):
        cfg = get_preset(f"{dataset}-{method}-mixmask")
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay) == ("adam", lr, 1e-6)
        assert (cfg.method.params.proj_dim, cfg.method.params.proj_hidden_dim) == (dim, 1024)
    assert get_preset(f"{dataset}-byol-vanilla").method.byol.base_tau == 0.99
    simsiam = get_preset(f"{dataset}-simsiam-unmix")
    assert simsiam.method.simsiam.proj_dim == 128 and (simsiam.optim.base_lr, simsiam.optim.warmup_epochs) == (0.03, 10)
    for method in ("moco", "simclr", "byol", "simsiam"):
        cfg = get_preset(f"{dataset}-{method}-mixmask-unmix")
        assert cfg.optim.decay_norm_and_bias, "the official code decays every parameter"
        assert cfg.method.unmix_prob == 0.5 and cfg.mask.ratio == 0.5
        assert config_value(cfg, "mask.share") == "batch"
        if method != "moco":
            assert not hasattr(cfg.method.params, "bn_splits") and "bn_splits" not in derived(cfg, 1)
    grid_kind = (2, "discrete") if dataset == "cifar100" else (4, "block")
    assert (moco.mask.grid_size, moco.mask.kind) == grid_kind


def test_imagenet_and_demo_presets():
    moco = get_preset("imagenet-moco-mixmask")
    assert (moco.method.arch, moco.data.resolution, moco.data.batch_size, moco.run.epochs) == (
        "resnet50", 224, 256, 200)
    m = moco.method.moco
    assert (moco.mask.grid_size, moco.mask.kind, m.mlp_head, m.bn_splits) == (8, "block", True, 1)
    assert (moco.optim.base_lr, moco.optim.weight_decay, m.temperature, m.queue_size, m.momentum) == (
        0.03, 1e-4, 0.2, 65536, 0.999)
    assert moco.optim.decay_norm_and_bias and moco.aug.recipe == "mocov2"
    assert get_preset("imagenet-moco-unmix").method.unmix_prob == 0.5
    demo = get_preset("demo")
    assert not demo.optim.decay_norm_and_bias and demo.method.moco.bn_splits == 1  # ours: the demo keeps excluding them


def test_print_config_shows_discrete_grid_2_linear_head_and_table_8(repo_root):
    proc = subprocess.run([sys.executable, "train.py", "--preset", "cifar100-moco-mixmask", "--print-config"],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("kind: discrete", "grid_size: 2", "mlp_head: false", "bn_splits: 8", "base_lr: 0.06",
                 "weight_decay: 0.0005", "queue_size: 4096", "momentum: 0.99", "temperature: 0.1",
                 "decay_norm_and_bias: true"):
        assert f"  {line}\n" in out, line


def test_bn_splits_applies_to_one_process_and_is_checked_at_start_up():
    cfg = get_preset("cifar100-moco-mixmask")
    assert derived(cfg, 1)["bn_splits"] == 8
    assert derived(cfg, 4)["bn_splits"] == 1  # several processes: shuffle-BN across ranks
    with pytest.raises(UserError, match=r"method.moco.bn_splits=8 must divide the batch per process 100"):
        derived(resolve("cifar100-moco-mixmask", None, ["data.batch_size=100", "method.moco.queue_size=4000"]), 1)
    with pytest.raises(UserError, match="exclude each other"):
        derived(resolve("cifar100-moco-mixmask", None, ["method.sync_bn=true"]), 1)
    derived(resolve("cifar100-moco-mixmask", None, ["method.sync_bn=true"]), 2)  # split BN is off there
    with pytest.raises(UserError, match="unknown config key 'method.simclr.bn_splits'"):  # split BN is MoCo's
        resolve("cifar100-simclr-mixmask", None, ["method.simclr.bn_splits=4"])


def test_small_moco_preset_builds_split_bn_and_a_linear_head_with_torchvision_keys():
    cfg = resolve("cifar100-moco-mixmask", None, ["method.moco.queue_size=512"])
    method = build_method_from_config(cfg)
    assert isinstance(method.head, torch.nn.Linear) and method.head.out_features == 128
    split = [m for m in method.backbone.modules() if isinstance(m, SplitBatchNorm2d)]
    assert len(split) == 20 and {m.num_splits for m in split} == {8}
    assert any(isinstance(m, SplitBatchNorm2d) for m in method.backbone_k.modules())
    reference = cifar_stem_(torchvision.models.resnet18(weights=None))
    result = reference.load_state_dict(method.backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    several = build_method_from_config(cfg, world_size=2)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in several.modules())


# The keyword arguments each method's constructor received from every preset before the methods owned their config
# (read off the flat-config code at commit cedc3cc, one process; with two, split BN is off: bn_splits=1).
CONSTRUCTOR_ARGS_BEFORE = {
    "cifar100-byol": dict(base_tau=0.99, feature_dim=512, pred_hidden_dim=1024, proj_dim=64, proj_hidden_dim=1024),
    "cifar100-moco": dict(bn_splits=8, dim=128, feature_dim=512, mlp_hidden_dim=None, momentum=0.99, queue_size=4096,
                          shuffle_bn=True, sync_bn=False, temperature=0.1, version=1),
    "cifar100-simclr": dict(feature_dim=512, proj_dim=64, proj_hidden_dim=1024, temperature=0.5),
    "cifar100-simsiam": dict(feature_dim=512, pred_hidden_dim=512, proj_dim=128, proj_hidden_dim=2048, proj_layers=2),
    "demo": dict(bn_splits=1, dim=128, feature_dim=512, mlp_hidden_dim=None, momentum=0.99, queue_size=1024,
                 shuffle_bn=True, sync_bn=False, temperature=0.2, version=2),
    "imagenet-byol": dict(base_tau=0.996, feature_dim=2048, pred_hidden_dim=4096, proj_dim=256, proj_hidden_dim=4096),
    "imagenet-moco": dict(bn_splits=1, dim=128, feature_dim=2048, mlp_hidden_dim=None, momentum=0.999,
                          queue_size=65536, shuffle_bn=True, sync_bn=False, temperature=0.2, version=2),
    "imagenet-simclr": dict(feature_dim=2048, proj_dim=128, proj_hidden_dim=2048, temperature=0.1),
    "imagenet-simsiam": dict(feature_dim=2048, pred_hidden_dim=512, proj_dim=2048, proj_hidden_dim=2048,
                             proj_layers=3),
    "tinyimagenet-byol": dict(base_tau=0.99, feature_dim=512, pred_hidden_dim=1024, proj_dim=128,
                              proj_hidden_dim=1024),
    "tinyimagenet-moco": dict(bn_splits=8, dim=128, feature_dim=512, mlp_hidden_dim=None, momentum=0.99,
                              queue_size=4096, shuffle_bn=True, sync_bn=False, temperature=0.1, version=1),
    "tinyimagenet-simclr": dict(feature_dim=512, proj_dim=128, proj_hidden_dim=1024, temperature=0.5),
    "tinyimagenet-simsiam": dict(feature_dim=512, pred_hidden_dim=512, proj_dim=128, proj_hidden_dim=2048,
                                 proj_layers=2),
}


def test_every_preset_builds_its_method_with_the_same_hyper_parameters_as_before(monkeypatch):
    """Moving the method keys into per-method sections changed no preset's method (registry build, real classes)."""
    received = []
    for cls in METHODS.values():
        def spy(self, *, backbone, _init=cls.__init__, **kwargs):
            received.append(kwargs)
            _init(self, backbone=backbone, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    families: dict[str, object] = {}
    for name in PRESETS:
        family = name if name == "demo" else "-".join(name.split("-")[:2])
        cfg = get_preset(name)
        section = (cfg.method.name, cfg.method.params, cfg.method.arch, cfg.method.cifar_stem, cfg.method.sync_bn)
        assert families.setdefault(family, section) == section, f"{name} builds another method than {family}-*"
    assert sorted(families) == sorted(CONSTRUCTOR_ARGS_BEFORE)
    with torch.device("meta"):  # shapes only: the test compares arguments, not weights
        for family in families:
            name = family if family == "demo" else f"{family}-mixmask"
            for world_size in (1, 2):
                received.clear()
                build_method_from_config(get_preset(name), world_size=world_size)
                expected = dict(CONSTRUCTOR_ARGS_BEFORE[family])
                if world_size > 1 and "bn_splits" in expected:
                    expected["bn_splits"] = 1
                assert received == [expected], f"{name} on {world_size} process(es)"
