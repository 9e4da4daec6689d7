"""Config resolution (defaults → preset → YAML → overrides), presets from the paper, and every error path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixmask.errors import UserError
from mixmask.run.config import BRANCHES, METHOD_NAMES, Config, derived
from mixmask.run.config_cli import from_dict, resolve, to_dict, to_yaml
from mixmask.run.presets import DATASETS, PRESETS, get_preset


def test_every_preset_resolves_and_is_named_by_its_parts():
    assert len(PRESETS) == len(DATASETS) * len(METHOD_NAMES) * len(BRANCHES) + 1
    for name in PRESETS:
        cfg = resolve(name)
        assert cfg.preset == name
        if name != "demo":
            dataset, method, branch = name.split("-", 2)
            assert (cfg.method.name, cfg.method.branch) == (method, branch)


def test_resolution_order_defaults_preset_yaml_overrides(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("run:\n  epochs: 7\n  seed: 3\nmask:\n  grid_size: 8\n")
    cfg = resolve("cifar100-moco-mixmask", yaml_file, ["run.epochs=9", "mask.ratio_max=0.7"])
    assert cfg.run.epochs == 9  # override beats YAML
    assert cfg.run.seed == 3 and cfg.mask.grid_size == 8  # YAML beats preset
    assert cfg.optim.base_lr == 0.06  # preset beats defaults
    assert cfg.mask.ratio_max == 0.7
    assert Config().run.epochs == 1000  # defaults untouched


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = resolve("imagenet-byol-erase", None, ["run.seed=5"])
    assert from_dict(to_dict(cfg)) == cfg
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg, {"computed": {"lr": 1.0}, "provenance": {"commit": "x"}}))
    assert resolve(None, saved) == cfg  # a run's saved config.yaml is a valid --config input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.bach_size=3"], "unknown config key 'data.bach_size' (did you mean 'batch_size'?)"),
        (["epochs=3"], "did you mean 'run.epochs'?"),
        (["dat.batch_size=3"], "did you mean 'data'?"),
        (["data.batch_size=abc"], "data.batch_size"),
        (["method.name=mocco"], "method.name='mocco' is not valid (did you mean 'moco'?); valid: moco, simclr"),
        (["mask.ratio=1.5"], "mask.ratio=1.5 is out of range: must be <= 1.0"),
        (["data.batch_size=1"], "data.batch_size=1 is out of range"),
        (["mask.ratio=0.6", "mask.ratio_max=0.5"], "mask.ratio_max=0.5 must be >= mask.ratio=0.6"),
        (["run.epochs"], "is not of the form key=value"),
        (["run.compile=maybe"], "run.compile"),
        (["optim.milestones=[0.5,1.5]"], "optim.milestones"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        resolve("demo", None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'cifar100-moco-mixmask'"):
        get_preset("cifar100-moco-mixmsk")


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve("demo", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve("demo", bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        resolve("demo", bad)
    bad.write_text("run:\n  epoch: 3\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        resolve("demo", bad)


def capped_epochs():
    return resolve("demo").run.epochs


def test_derived_values_are_not_written_back():
    cfg = resolve("cifar100-moco-mixmask", None, ["data.batch_size=256"])
    comp = derived(cfg, world_size=4, steps_per_epoch=100)
    assert comp["batch_size_per_rank"] == 64 and comp["lr"] == pytest.approx(0.03)
    assert comp["total_steps"] == 100 * 1000 and comp["stop_step"] == 100 * 1000
    capped = derived(resolve("demo", None, ["run.max_steps=5"]), world_size=1, steps_per_epoch=100)
    assert capped["stop_step"] == 5 and capped["total_steps"] == 100 * capped_epochs()
    assert cfg.optim.base_lr == 0.06 and cfg.data.batch_size == 256
    with pytest.raises(UserError, match="not divisible"):
        derived(cfg, world_size=3)


@pytest.mark.parametrize("script", ["train.py"])
def test_cli_errors_are_one_line_without_traceback(repo_root, script):
    for args in (["--preset", "nope"], ["data.bach_size=3"], ["mask.ratio=2"]):
        proc = subprocess.run([sys.executable, script, *args], cwd=repo_root, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_print_config_shows_the_resolved_config(repo_root):
    proc = subprocess.run([sys.executable, "train.py", "--preset", "cifar100-byol-mixmask", "--print-config",
                           "run.epochs=3"], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 3" in proc.stdout and "name: byol" in proc.stdout and "preset: cifar100-byol-mixmask" in proc.stdout
