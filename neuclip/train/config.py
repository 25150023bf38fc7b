"""Training config: YAML file + dotted `key=value` overrides -> validated, resolved dict.

Every key, its type, range and default is declared once, in neuclip/train/schema.yaml (JSON Schema, like the
experiment schema and the estimators' options), so a config file only states what differs. Unknown keys are an
error that names the key and lists the allowed ones at that level; `method.options` and `method.common_options`
are checked by the estimator's own declaration (neuclip/estimators/options.py). The resolved
config (absolute paths, sample counts filled in) is what the run folder records and what a resumed run is
compared against. The `launcher` section is free-form here: its table is neuclip/grid/launcher.yaml, and
`neuclip train` or the jobs launcher completes it before the run starts; the trainer never reads it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from neuclip.data.keys import data_size_of
from neuclip.yamlio import yaml_load  # noqa: F401 - the project's one YAML reader, used from here too

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")


def _schema() -> dict:
    return yaml_load(SCHEMA_PATH.read_text())


def _defaults(node: dict) -> Any:
    """The defaults tree of a schema node: objects recurse into their properties (free-form ones keep {})."""
    if node.get("type") == "object" and "properties" in node and not node.get("x-free-form"):
        return {key: _defaults(sub) for key, sub in node["properties"].items()}
    return copy.deepcopy(node.get("default"))


def _free_form(node: dict, path: tuple = ()) -> set[tuple]:
    out = {path} if node.get("x-free-form") else set()
    for key, sub in (node.get("properties") or {}).items():
        out |= _free_form(sub, (*path, key))
    return out


SCHEMA = _schema()
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)  # every key's default, from neuclip/train/schema.yaml
FREE_FORM = _free_form(SCHEMA)  # mappings whose keys the estimator (or the launcher) checks


def _identity_keys(node: dict, path: str = "") -> list[str]:
    """Dotted keys that define a run: every key not marked `x-setting` (a section's mark covers its keys)."""
    out = []
    for key, sub in (node.get("properties") or {}).items():
        if sub.get("x-setting"):
            continue
        if sub.get("type") == "object" and "properties" in sub and not sub.get("x-free-form"):
            out += _identity_keys(sub, f"{path}{key}.")
        else:
            out.append(f"{path}{key}")
    return out


# Keys whose change makes it another run: a resume that changes them is refused, and the workflow's rerun
# triggers are exactly these (neuclip.grid.workflow.identity). Derived from neuclip/train/schema.yaml's x-setting marks.
IDENTITY_KEYS = _identity_keys(SCHEMA)
SETTING_SECTIONS = ("data", "train", "error", "launcher")  # where the run settings live (besides run_dir, meta)


def run_settings(cfg: dict) -> dict:
    """The run settings of a config (every key not in IDENTITY_KEYS, but run_dir and meta), by section."""
    out: dict = {}
    for section in SETTING_SECTIONS:
        keep = {k: copy.deepcopy(v) for k, v in cfg[section].items() if f"{section}.{k}" not in IDENTITY_KEYS}
        if keep:
            out[section] = keep
    return out


class ConfigError(ValueError):
    """A config problem, with the key at fault in the message."""


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            allowed = ", ".join(base) or "(none)"
            raise ConfigError(
                f"unknown config key {where!r}; allowed keys{' under ' + path[:-1] if path else ''}: "
                f"{allowed}"
            )
        sub = tuple(where.split("."))
        if isinstance(base[key], dict) and sub not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        elif sub in FREE_FORM:  # key by key, so `launcher.nodes=2` keeps the file's other launcher keys
            if value is None:  # an explicit null empties the mapping
                out[key] = {}
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
            out[key] = {**(base[key] or {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """["train.lr=1e-3", "method.options={rho: 6.5}"] -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"override key {key!r} is not a dotted name")
        value = yaml_load(raw) if raw.strip() else None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file <- overrides, validated (not yet resolved: see `resolve`)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        cfg = _merge(cfg, loaded)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def _subschema(path, schema: dict) -> dict:
    """The schema node of a config key path (for the message), $refs resolved."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if part.isdigit() and isinstance(node.get("items"), dict):  # an item of a list (betas, report_to)
            node = node["items"]
            continue
        node = props[part] if part in props else node.get("additionalProperties") or {}
        if isinstance(node, dict) and "$ref" in node:
            ref = (schema.get("definitions") or SCHEMA["definitions"])[node["$ref"].rsplit("/", 1)[1]]
            node = {**ref, **{k: v for k, v in node.items() if k != "$ref"}}
    return node if isinstance(node, dict) else {}


def validate(cfg: dict, schema: dict | None = None, where: str = "") -> None:
    """Check `cfg` against neuclip/train/schema.yaml (or `schema`); raise ConfigError naming the first bad key."""
    import jsonschema

    from neuclip.estimators.options import describe

    schema = schema or SCHEMA
    bad = _non_finite(cfg)
    if bad:
        raise ConfigError(f"config key {where + bad[0]!r} must be a finite number, got {bad[1]!r}")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(_plain(cfg)),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    err = errors[0]
    path = [str(p) for p in err.absolute_path]
    key = where + (".".join(path) or "(top level)")
    if err.validator == "additionalProperties":
        allowed = ", ".join(_subschema(path, schema).get("properties", {}))
        raise ConfigError(f"unknown key under {key!r}: {err.message}; allowed: {allowed}")
    if err.validator == "propertyNames":
        raise ConfigError(f"config key {key!r}: bad option name {err.instance!r} (letters, digits, _ and - only)")
    node = _subschema(path, schema)
    if isinstance(err.instance, str) and any(ord(c) < 32 or ord(c) == 127 for c in err.instance):
        raise ConfigError(f"config key {key!r} contains a control character (newline?): {err.instance!r}")
    raise ConfigError(f"config key {key!r} must be {describe(node)}, got {err.instance!r}")


def _non_finite(node, path: str = ""):
    """(dotted key, value) of the first NaN/inf in a config (JSON Schema's number admits them)."""
    if isinstance(node, dict):
        for key, value in node.items():
            found = _non_finite(value, f"{path}{key}.")
            if found:
                return found
    elif isinstance(node, float) and not math.isfinite(node):
        return path.rstrip("."), node
    return None


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _sizes_total(pattern: str, shards: list[str]) -> int | None:
    """Sum of the img2dataset `sizes.json` counts (shard name -> count) of the shards, if all are known."""
    total, cache = 0, {}
    for shard in shards:
        p = Path(shard)
        sizes_path = p.parent / "sizes.json"
        if sizes_path not in cache:
            cache[sizes_path] = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
        sizes = cache[sizes_path]
        count = sizes.get(p.name, sizes.get(p.stem))
        if count is None:
            return None
        total += int(count)
    return total


def resolve(cfg: dict, base_dir: str | Path | None = None) -> dict:
    """Absolute paths and sample counts filled in. The launcher section is not the trainer's: whoever launches
    the run completes it (neuclip.grid.launcher.resolve_launcher)."""
    from neuclip.train.data import expand_shards

    cfg = copy.deepcopy(cfg)
    base = Path(base_dir or Path.cwd())
    if not cfg["run_dir"]:
        raise ConfigError("config key 'run_dir' is required (where the run folder goes)")
    cfg["run_dir"] = str((base / cfg["run_dir"]).resolve())
    d = cfg["data"]
    if not d["train_shards"]:
        raise ConfigError("config key 'data.train_shards' is required (e.g. data/train/{00000..00003}.tar)")
    pattern = d["train_shards"]
    if not Path(pattern).is_absolute():
        pattern = str(base.resolve() / pattern)
    d["train_shards"] = pattern
    shards = expand_shards(pattern)
    if d["train_num_samples"] is None:
        total = _sizes_total(pattern, shards)
        if total is None:
            raise ConfigError(
                "config key 'data.train_num_samples' is not set and no sizes.json beside the "
                f"shards of {pattern!r} gives their sample counts: set it"
            )
        d["train_num_samples"] = total
    if d["data_size"] is None:  # ids have gaps (img2dataset's keys, failed downloads): never the sample count

        try:
            d["data_size"], _ = data_size_of(shards)
        except ValueError as err:  # a malformed dataset.yaml, named
            raise ConfigError(f"{err}: fix it, or set data.data_size") from None
        if d["data_size"] < 1:
            raise ConfigError(
                f"config key 'data.data_size' is not set, no dataset.yaml beside the shards of {pattern!r} gives it, "
                "and no readable shard holds a sample id: set it (max sample id + 1)"
            )
    if d["train_num_samples"] < cfg["train"]["global_batch_size"]:
        raise ConfigError(
            f"data.train_num_samples ({d['train_num_samples']}) is smaller than "
            f"train.global_batch_size ({cfg['train']['global_batch_size']})"
        )
    validate(cfg)
    return cfg


def identity_diff(a: dict, b: dict) -> list[str]:
    """The identity keys on which two resolved configs differ."""
    out = []
    for key in IDENTITY_KEYS:
        va, vb = get(a, key), get(b, key)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
