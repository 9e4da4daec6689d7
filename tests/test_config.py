"""Config resolution (defaults → preset → YAML → overrides), presets from the paper, and every error path."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from mixmask.core.methods import METHODS
from mixmask.errors import UserError
from mixmask.run.config import BRANCHES, METHOD_NAMES, Config, derived
from mixmask.run.config_cli import from_dict, resolve, to_dict, to_yaml
from mixmask.run.presets import DATASETS, PRESETS, get_preset
from mixmask.run.rundir import check_resume_config

OLD_CONFIG = Path(__file__).parent / "data" / "config_flat_method_keys.yaml"


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
        (["method.moco.queu_size=3"], "unknown config key 'method.moco.queu_size' (did you mean 'queue_size'?); "
                                      "valid keys in method.moco: mlp_head, dim, queue_size"),
        (["method.moco=3"], "'method.moco' is a config section, not a key: set one of its keys"),
        (["method.simclr.bn_splits=4"], "unknown config key 'method.simclr.bn_splits'"),  # split BN is MoCo's
        (["method.byol.base_tau=1.5"], "method.byol.base_tau=1.5 is out of range: must be <= 1.0"),
        (["method.simsiam.proj_layers=0"], "method.simsiam.proj_layers=0 is out of range: must be >= 1"),
        (["method.simclr.temperature=0"], "method.simclr.temperature=0.0 is out of range: must be > 0.0"),
        # A method's cross-field rule, at config time: every step enqueues the whole (demo: 128) batch.
        (["method.moco.queue_size=1000"], "method.moco.queue_size=1000 must be a multiple of the global batch 128 "
                                          "(each step enqueues the whole batch's keys); pick e.g. 896"),
        (["method.moco.queue_size=64"], "pick e.g. 128"),
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


def test_every_method_owns_a_typed_documented_section():
    cfg = Config()
    for name, cls in METHODS.items():
        section = getattr(cfg.method, name)
        assert type(section) is cls.Params
        for f in fields(section):
            assert f.metadata["doc"] and "\n" not in f.metadata["doc"], f"method.{name}.{f.name} has no one-line doc"
    assert resolve("demo", None, ["method.name=simsiam"]).method.params is not None
    cfg = resolve("demo", None, ["method.name=byol"])
    assert cfg.method.params is cfg.method.byol


def test_nested_method_keys_through_yaml_overrides_and_print_config(repo_root, tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("method:\n  byol:\n    base_tau: 0.98\n    proj_dim: 48\n")
    cfg = resolve("cifar100-byol-mixmask", yaml_file, ["method.byol.proj_dim=32", "method.moco.queue_size=1024"])
    assert (cfg.method.byol.base_tau, cfg.method.byol.proj_dim, cfg.method.moco.queue_size) == (0.98, 32, 1024)
    assert cfg.method.byol.proj_hidden_dim == 1024  # the preset's, untouched
    proc = subprocess.run([sys.executable, "train.py", "--preset", "cifar100-byol-mixmask", "--print-config",
                           "method.byol.base_tau=0.97", "method.byol.pred_hidden_dim=null"],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["method"]["byol"] == {"proj_hidden_dim": 1024, "proj_dim": 64, "pred_hidden_dim": None,
                                         "base_tau": 0.97}
    assert printed["method"]["name"] == "byol" and set(METHODS) <= set(printed["method"])
    saved = tmp_path / "printed.yaml"
    saved.write_text(proc.stdout)
    assert to_dict(resolve(None, saved)) == printed  # what --print-config shows is a valid --config


@pytest.mark.parametrize("override, new_keys", [
    ("method.momentum=0.9", "method.momentum is now set per method: method.moco.momentum, method.byol.base_tau"),
    ("method.queue_size=64", "method.queue_size is now method.moco.queue_size"),
    ("method.dim=64", "method.moco.dim, method.simclr.proj_dim, method.byol.proj_dim, method.simsiam.proj_dim"),
    ("method.hidden_dim=64", "method.simclr.proj_hidden_dim, method.byol.proj_hidden_dim"),
    ("method.pred_dim=64", "method.byol.pred_hidden_dim, method.simsiam.pred_hidden_dim"),
    ("method.temperature=0.2", "method.moco.temperature, method.simclr.temperature"),
    ("method.bn_splits=8", "method.bn_splits is now method.moco.bn_splits"),
    ("method.mlp_head=false", "method.mlp_head is now method.moco.mlp_head"),
])
def test_old_flat_method_keys_name_their_new_keys(tmp_path, override, new_keys):
    with pytest.raises(UserError) as err:
        resolve("demo", None, [override])
    assert new_keys in str(err.value) and "\n" not in str(err.value)
    key, _, value = override.partition("=")
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text(f"method:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(UserError, match=new_keys.split(":")[0]):
        resolve("demo", yaml_file)


def test_a_config_saved_before_methods_owned_their_keys_loads_and_resumes():
    """A checkpoint's or run directory's config written by the flat-key code (tests/data, made by that code)."""
    old = yaml.safe_load(OLD_CONFIG.read_text())
    cfg = from_dict(old)
    now = get_preset("cifar100-byol-mixmask")
    assert cfg.method.byol == now.method.byol and cfg.method.name == "byol"
    assert (cfg.data, cfg.aug, cfg.mask, cfg.optim, cfg.run, cfg.eval) == (
        now.data, now.aug, now.mask, now.optim, now.run, now.eval)
    # Resuming that run with today's preset changes nothing the run reads (other methods' sections don't count) ...
    assert check_resume_config(old, to_dict(now), checkpoint=Path("last.pt"), allow_change=False) == []
    # ... while a change of its own method's settings is refused, named with the new key.
    changed = to_dict(resolve("cifar100-byol-mixmask", None, ["method.byol.base_tau=0.9"]))
    with pytest.raises(UserError, match=r"method.byol.base_tau 0.99 → 0.9"):
        check_resume_config(old, changed, checkpoint=Path("last.pt"), allow_change=False)
    with pytest.raises(UserError, match="method.mlp_head is now method.moco.mlp_head"):
        resolve(None, OLD_CONFIG)  # as a --config input it is the user's file: one line naming the new key


TINY_RUN = ["--preset", "demo", "data.resolution=16", "data.batch_size=8", "data.workers=0", "data.backend=torchvision",
            "data.synthetic_images=16", "data.synthetic_val_images=16", "method.cifar_stem=false",
            "method.moco.queue_size=16", "run.max_steps=1", "run.knn_every=0", "run.progress=false",
            "run.tensorboard=false", "run.device=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["method.queue_size=64"], "error: method.queue_size is now method.moco.queue_size"),
    (["method.moco.queue_size=20"], "error: method.moco.queue_size=20 must be a multiple of the global batch 8"),
    # Known once the processes are: split BatchNorm in one process (8 per process, 3 splits; or with SyncBN).
    (["method.moco.bn_splits=3"], "error: method.moco.bn_splits=3 must divide the batch per process 8"),
    (["method.moco.bn_splits=2", "method.sync_bn=true"], "method.sync_bn=true and method.moco.bn_splits=2 exclude"),
])
def test_method_settings_a_user_gets_wrong_are_one_line_through_train_py(repo_root, tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "train.py", *TINY_RUN, *args, f"run.out_dir={tmp_path / 'run'}",
                           f"data.data_dir={tmp_path / 'data'}"], cwd=repo_root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # stopped before any step
