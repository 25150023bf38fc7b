"""The launcher section: where and with what a job runs, as every layer that sets it speaks it.

One table of knobs, neuclip/grid/launcher.yaml, serves slurm/site.yaml, an experiment's `resources:`,
`per_dataset.<set>.resources` and `stages.<stage>`, a train config's `launcher:` section and `neuclip
eval|error --launcher`. Precedence, lowest first:

    the key's default < slurm/site.yaml < the section given

and `launcher_section` applies it. For a grid cell, neuclip.grid.workflow.stage_launcher stacks the
experiment's layers (resources < per_dataset < the stage's shape < stages) and hands them to it. It lives here, with
the grid, because the grid checks every cell's resources before anything is queued; the jobs launcher
(neuclip/jobs/launch.py) reads it from here. The trainer never parses it: `neuclip train` and the launcher
hand it a complete section, and the run folder's config.yaml records it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from neuclip.train.config import SCHEMA as TRAIN_SCHEMA
from neuclip.train.config import ConfigError, validate
from neuclip.yamlio import yaml_load

SCHEMA_PATH = Path(__file__).with_name("launcher.yaml")
LAUNCHER: dict = yaml_load(SCHEMA_PATH.read_text())["properties"]  # key -> its JSON Schema node
DEFINITIONS = TRAIN_SCHEMA["definitions"]  # what the table's $refs name: safe strings, positive counts
DEFAULTS = {key: copy.deepcopy(node.get("default")) for key, node in LAUNCHER.items()}
# The schema of a config holding a launcher section, so a message names the key as `launcher.nodes`.
SCHEMA = {
    "type": "object",
    "definitions": DEFINITIONS,
    "properties": {"launcher": {"type": "object", "additionalProperties": False, "properties": LAUNCHER}},
}

# A site file (slurm/site.yaml) gives defaults for the launcher keys that are not the job's shape.
SITE_KEYS = {k for k, node in LAUNCHER.items() if node.get("x-site", True)}
SITE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "definitions": DEFINITIONS,
    "properties": {k: LAUNCHER[k] for k in SITE_KEYS},
}
# An experiment's `resources:` (and per_dataset / stages) and `neuclip eval|error --launcher`: the launcher keys
# but `executor` and `site`, which the workflow sets from its `launcher` and `slurm_site` keys.
RESOURCE_KEYS = [k for k in LAUNCHER if k not in ("executor", "site")]
# The spellings site.yaml used before it shared the launcher's names: refused with the new name.
RENAMED = {"time_min": "timeout_min", "additional_parameters": "slurm_additional_parameters", "time": "timeout_min"}


def check_keys(section: dict, allowed, where: str, what: str = "key") -> None:
    """Unknown keys of a launcher/resources mapping are an error; an old spelling gets its new name."""
    for key in section:
        if key in RENAMED and key not in allowed:
            raise ConfigError(
                f"{where}: {what} {key!r} is now {RENAMED[key]!r} (one name per knob, the same in slurm/site.yaml, "
                f"an experiment's resources and the train config's launcher section): rename it"
            )
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown {what}(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


_SITES: dict[tuple, dict] = {}  # (path, mtime, size) -> the checked site: the grid resolves a section per stage


def load_site(path: str | Path) -> dict:
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"launcher.site: no such file {path}") from None
    stamp = (str(path), stat.st_mtime_ns, stat.st_size)
    if stamp not in _SITES:
        site = yaml_load(path.read_text()) or {}
        if not isinstance(site, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        check_keys(site, SITE_KEYS, str(path), "site key")
        validate(site, SITE_SCHEMA, where=f"{path}: ")
        _SITES[stamp] = site
    return copy.deepcopy(_SITES[stamp])


def _apply_site(la: dict, base: Path) -> None:
    """Merge launcher.site's defaults into a complete launcher section (in place): the section's own values win.
    Applying it twice changes nothing, so a section resolved once may be resolved again."""
    if not la["site"]:
        return
    site_path = Path(la["site"])
    if not site_path.is_absolute():
        site_path = base.resolve() / site_path
    la["site"] = str(site_path)
    site = load_site(site_path)
    for key in sorted(SITE_KEYS - {"slurm_additional_parameters"}):
        if la[key] is None and site.get(key) is not None:
            la[key] = site[key]
    la["slurm_additional_parameters"] = {
        **(site.get("slurm_additional_parameters") or {}),
        **la["slurm_additional_parameters"],
    }


def launcher_section(given: dict | None, base: Path | None = None, where: str = "launcher") -> dict:
    """A complete, validated launcher section from a partial one: defaults < launcher.site < `given`. A relative
    site path is taken from `base` (the current directory by default)."""
    given = dict(given or {})
    check_keys(given, LAUNCHER, where)
    la = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(given)}
    if la["slurm_additional_parameters"] is None:
        la["slurm_additional_parameters"] = {}
    validate({"launcher": la}, SCHEMA)
    _apply_site(la, Path(base or Path.cwd()))
    validate({"launcher": la}, SCHEMA)
    return la


def resolve_launcher(cfg: dict) -> dict:
    """A copy of a run's config (train or stage job) with its launcher section complete, a relative site path
    taken from the current directory (as the config's other relative paths are)."""
    return {**cfg, "launcher": launcher_section(cfg.get("launcher"))}


def tasks_per_node(la: dict) -> int:
    """Processes a launcher section starts on each node: tasks_per_node, by default one per GPU (at least one)."""
    return int(la["tasks_per_node"] or max(1, la["gpus_per_node"] or 0))


def world_size(la: dict) -> int:
    """Training processes of a complete launcher section: inprocess is one process; otherwise nodes x tasks per
    node."""
    if la["executor"] == "inprocess":
        return 1
    return int(la["nodes"]) * tasks_per_node(la)
