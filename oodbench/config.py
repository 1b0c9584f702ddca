"""Configs: `configs/<kind>.yaml` (paper defaults) + a preset + `--set a.b=value` overrides → one resolved dict.

The YAML file is the schema: every option appears there with its default, so an override of a key that is not in it
is an error (with the nearest valid key suggested), and values keep the type of the default.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Iterable, Optional

import yaml

from oodbench.errors import OODBenchError


class ConfigLoader(yaml.SafeLoader):
    """safe_load with YAML 1.2 booleans and floats: only true/false are booleans, so `off`, `no`, `on`, `yes` stay
    strings (`--set train.amp=off`), and `1e-3` is a float (YAML 1.1 wants `1.0e-3`)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))

CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # package data (pyproject.toml), found from any directory

# Option phases. A *training* option is fixed when a run is trained (changing it needs a new run: `oodbench train ...
# --run-name NAME`); every other option is a *scoring* option, which `score`/`eval` may change. These sections are
# training options for every kind; each trainer adds its own (`Detector.training_keys`, gathered by
# `oodbench.detectors.training_keys`). Entries are dotted keys; an entry names the key and everything under it.
TRAINING_SECTIONS = ("seed", "data", "model", "train")

# Keys inside a training section that only change how data is read, never what a model learns.
SCORING_EXCEPTIONS = ("data.stream", "data.decode")


def is_training_option(key: str, training_keys=()) -> bool:
    """Whether the dotted config key `key` is a training option: in TRAINING_SECTIONS or `training_keys` (the
    kind's own), and not a SCORING_EXCEPTION."""
    if key in SCORING_EXCEPTIONS:
        return False
    return any(key == t or key.startswith(t + ".") for t in (*TRAINING_SECTIONS, *training_keys))


def dataset_options(cfg: dict, keys) -> dict:
    """{dotted key: dataset spec} of the dataset-valued `keys` (SECTION.NAME) that `cfg` sets (not null); `{in}`
    stands for data.in."""
    found = {}
    for key in keys:
        section, name = key.split(".")
        value = (cfg.get(section) or {}).get(name)
        if value:
            found[key] = str(value).replace("{in}", str((cfg.get("data") or {}).get("in", "")))
    return found


def config_path(kind: str) -> Path:
    path = CONFIG_DIR / f"{kind}.yaml"
    if not path.is_file():
        raise OODBenchError(f"no config for {kind!r} at {path}; is the repository's configs/ folder present?")
    return path


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.load(f, ConfigLoader) or {}
    except yaml.YAMLError as e:
        raise OODBenchError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise OODBenchError(f"{path} must hold a mapping of options, not {type(data).__name__}")
    return data


def schema(kind: str, sections: Optional[dict] = None, path: Optional[Path] = None) -> tuple[dict, dict]:
    """(defaults, presets) of a kind: `configs/<kind>.yaml` plus `sections` ({name: {option: default}}: the
    post-hoc methods' declared options, which the YAML does not repeat)."""
    defaults = read_yaml(Path(path) if path else config_path(kind))
    presets = defaults.pop("presets", {}) or {}
    for name, options in (sections or {}).items():
        if name in defaults:
            raise OODBenchError(f"{config_path(kind)} has a section {name!r}, which method {name} declares in its "
                                f"class; remove it from the YAML file")
        defaults[name] = copy.deepcopy(options)
    return defaults, presets


def read_meta(path: Path) -> dict:
    """A run's meta.json ({} when absent); a corrupt one is a clear error that says how to rewrite it."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise OODBenchError(f"{path} is corrupt (not a JSON mapping); the `oodbench train` command that made this "
                            f"run rewrites it")
    return meta


def load_config(kind: str, preset: Optional[str] = None, overrides: Iterable[str] = (),
                path: Optional[Path] = None, sections: Optional[dict] = None) -> dict:
    """The resolved config of a training kind: defaults (+ `sections`), then the preset, then `a.b=value`
    overrides."""
    defaults, presets = schema(kind, sections, path)
    cfg = copy.deepcopy(defaults)
    if preset:
        if preset not in presets:
            raise OODBenchError(f"unknown preset {preset!r} for {kind}; available: {', '.join(presets) or 'none'}")
        merge(cfg, presets[preset], defaults, where=f"preset {preset!r}")
    for item in overrides:
        apply_override(cfg, item, defaults)
    return cfg


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise OODBenchError(f"--set {item!r}: write it as key.subkey=value, e.g. --set train.steps=500")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, ConfigLoader) if raw.strip() else None
    except yaml.constructor.ConstructorError as e:   # !!python/... tags: safe_load never constructs them
        raise OODBenchError(f"--set {item}: YAML tags (!!...) are not allowed in a value; give a plain number, "
                            f"string or list") from e
    except yaml.YAMLError as e:
        raise OODBenchError(f"--set {item}: not a valid YAML value ({str(e).splitlines()[0]}); quote strings, "
                            f"close brackets, e.g. --set model.mean=[0.5,0.5,0.5]") from e
    return key.strip().split("."), value


def apply_override(cfg: dict, item: str, schema: dict) -> None:
    keys, value = parse_override(item)
    node = {}
    for k in reversed(keys):
        node = {k: value} if not node else {k: node}
        value = node
    merge(cfg, node, schema, where=f"--set {item}")


def merge(cfg: dict, update: dict, schema: dict, where: str, prefix: str = "") -> None:
    """Deep-merge `update` into `cfg`, checking each key against `schema`."""
    for key, value in (update or {}).items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise OODBenchError(f"{where}: unknown config key {dotted!r}.{suggest(dotted, schema, prefix)}")
        default = schema[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise OODBenchError(f"{where}: {dotted!r} is a section; set one of its keys, e.g. "
                                    f"{dotted}.{next(iter(default), 'key')}=...")
            merge(cfg[key], value, default, where, dotted + ".")
        else:
            cfg[key] = check_type(dotted, value, default, where)


def check_type(key: str, value, default, where: str):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise OODBenchError(f"{where}: {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OODBenchError(f"{where}: {key!r} must be a number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, list) and not isinstance(value, list):
        return [value]
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


def deep_update(cfg: dict, update: dict) -> None:
    """Recursively copy `update` into `cfg` (no schema checks: for configs written by oodbench itself)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            deep_update(cfg[k], v)
        else:
            cfg[k] = v


def flat_keys(schema: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in schema.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += flat_keys(v, prefix + k + ".")
    return keys


def suggest(key: str, schema: dict, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, flat_keys(schema, prefix), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else " See the config file for the valid keys."


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
