"""One command-line front end for the config, shared by train.py, eval.py and bench.py.

`--preset NAME [--config FILE.yaml] [key=value ...]` resolves defaults → preset → YAML → overrides. Every mistake
(unknown preset or key, wrong type, impossible value, unreadable YAML) is a UserError naming the key and the valid
choices, which the entry points print as one line with exit code 2.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mixmask.errors import UserError, did_you_mean
from mixmask.run.config import FLAT_METHOD_KEYS, Config, upgrade_saved_config, validate
from mixmask.run.presets import get_preset


def add_config_arguments(parser: argparse.ArgumentParser, *, preset_required: bool = False) -> None:
    """Add `--preset`, `--config`, `--print-config` and the trailing `key=value` overrides to a parser."""
    parser.add_argument("--preset", default=None if preset_required else "demo", required=preset_required,
                        help="named preset: demo or DATASET-METHOD-BRANCH, e.g. cifar100-moco-mixmask")
    parser.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. run.epochs=10")


def _leaf_keys(section: Any, prefix: str) -> list[str]:
    """Every dotted key under a section, nested sections (method.<name>) included."""
    keys = []
    for f in fields(section):
        value = getattr(section, f.name)
        keys += _leaf_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"]
    return keys


def _flat_method_key_error(name: str) -> UserError:
    """An old flat method key (`method.momentum`): one line naming the keys that replaced it."""
    new = [f"method.{method}.{key}" for method, key in FLAT_METHOD_KEYS[name].items()]
    if len(new) == 1:
        return UserError(f"method.{name} is now {new[0]} (each method owns its settings)")
    return UserError(f"method.{name} is now set per method: {', '.join(new)} (each method owns its settings; "
                     "set the one of your method.name)")


def _unknown_key_error(key: str) -> UserError:
    """One line for a key the config does not have: the closest key, the section's keys, or the new name."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "method" and parts[1] in FLAT_METHOD_KEYS:
        return _flat_method_key_error(parts[1])
    cfg = Config()
    sections = [f.name for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))]
    node: Any = cfg
    depth = 0
    while depth < len(parts) and is_dataclass(node) and parts[depth] in {f.name for f in fields(node)}:
        node, depth = getattr(node, parts[depth]), depth + 1
    where = ".".join(parts[:depth])
    if depth == 0 or (len(parts) == 1 and not is_dataclass(node)):
        # A bare field name ("epochs=3"): point at the section that has it.
        owners = [d for d in _leaf_keys(cfg, "") if d.endswith(f".{parts[0]}")]
        hint = f" (did you mean {owners[0]!r}?)" if owners else did_you_mean(parts[0], sections)
        return UserError(f"unknown config key {key!r}{hint}; sections: {', '.join(sections)}")
    if not is_dataclass(node):
        return UserError(f"unknown config key {key!r}: {where} is a value, not a section")
    names = [f.name for f in fields(node)]
    if depth == len(parts):  # `data=3`: a whole section given a value
        return UserError(f"{where!r} is a config section, not a key: set one of its keys, e.g. "
                         f"{where}.{names[0]}=...; keys in {where}: {', '.join(names)}")
    hint = did_you_mean(parts[depth], names)
    return UserError(f"unknown config key {key!r}{hint}; valid keys in {where}: {', '.join(names)}")


def _check_key(key: str) -> None:
    """UserError unless `key` names one value of the config (not a section, not an unknown or old key)."""
    node: Any = Config()
    if "." not in key:  # a bare name or a whole section: `preset` is set by --preset, not as an override
        raise _unknown_key_error(key)
    for part in key.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            raise _unknown_key_error(key)
        node = getattr(node, part)
    if is_dataclass(node):
        raise _unknown_key_error(key)


def _merge(base: Any, other: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key)) from None
    except ValidationError as err:
        raise UserError(f"{err.full_key}: {str(err).splitlines()[0]} (from {where})") from None
    except OmegaConfBaseException as err:
        raise UserError(f"invalid config in {where}: {str(err).splitlines()[0]}") from None


def _parse_overrides(overrides: list[str]) -> Any:
    items = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. run.epochs=10)")
        _check_key(key)
        items.append(f"{key}={value}")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections (data:, method:, ...)")
    data.pop("computed", None)  # a run's saved config.yaml carries its derived values: they are not inputs
    data.pop("provenance", None)
    data.pop("bench", None)  # a section older runs saved; nothing ever read it
    return data


def resolve(preset: str | None = "demo", config_file: Path | None = None, overrides: list[str] | None = None,
            *, base: Config | None = None) -> Config:
    """Defaults → preset (or `base`, e.g. a checkpoint's config) → YAML file → overrides, validated."""
    start = base if base is not None else (get_preset(preset) if preset else Config())
    merged = OmegaConf.structured(start)
    if config_file is not None:
        merged = _merge(merged, _load_yaml(Path(config_file)), str(config_file))
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "the command line")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


def config_from_args(args: argparse.Namespace) -> Config:
    return resolve(args.preset, args.config, args.overrides)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a saved dict (checkpoint or config.yaml, older layouts upgraded); unknown keys are
    errors."""
    data = upgrade_saved_config({k: v for k, v in data.items() if k not in ("computed", "provenance")})
    merged = _merge(OmegaConf.structured(Config()), data, "the saved config")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


def to_yaml(cfg: Config, extra: dict | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if extra:
        text += yaml.safe_dump(extra, sort_keys=False)
    return text
