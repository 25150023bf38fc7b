"""Training config: YAML file + dotted `key=value` overrides -> validated, resolved dict.

Every key has a default below, so a config file only states what differs. Unknown keys are an error that
names the key and lists the allowed ones at that level; `method.options` and
`launcher.slurm_additional_parameters` are free-form (the estimator and sbatch check those). The resolved
config (absolute paths, site defaults merged, sample counts filled in) is what the run folder records and
what a resumed run is compared against.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

EXECUTORS = ("inprocess", "local", "debug", "slurm")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

DEFAULTS: dict[str, Any] = {
    "run_dir": None,  # required: where config.yaml, metrics, checkpoints, model/ and done.json go
    "seed": 0,
    "model": "tiny-vit",  # an open_clip model name (RN50, ViT-B-32, ViT-B-16) or one in neuclip/model_configs
    "data": {
        "train_shards": None,  # brace pattern of img2dataset shards, e.g. data/train/{00000..00003}.tar
        "train_num_samples": None,  # samples per epoch; null = the sum of sizes.json beside the shards
        "data_size": None,  # max sample id + 1 (per-sample state size); null = train_num_samples
        "workers": 0,  # DataLoader worker processes per rank (0 = read in the training process)
        "skip_bad": False,  # corrupt shard/sample: False = stop with an error, True = skip and count
        "shuffle_buffer": 2000,  # samples; records are offsets, not bytes, so a big buffer is cheap
    },
    "method": {
        "name": "openclip",
        "options": {},  # estimator options; an option the method does not have is an error
        "common_options": {},  # shared knobs (rho, lr_tau, gamma_min, ...) applied where the method has them
    },
    "train": {
        "global_batch_size": 64,
        "epochs": 1,
        "max_steps": None,  # if set, the run length in steps (overrides epochs)
        "lr": 5e-4,
        "weight_decay": 0.1,
        "warmup_steps": 0,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "grad_clip": None,  # max global grad norm; null or 0 = no clipping
        "precision": "auto",  # auto = bf16 autocast on cuda, fp32 on cpu
        "device": "auto",  # auto = cuda if available
        "checkpoint_every": 1000,  # steps
        "keep_last": 2,  # checkpoints kept
        "log_every": 10,  # steps between metrics.jsonl lines (the last step is always logged)
        "threads": None,  # torch.set_num_threads; null = torch's default
    },
    # Normaliser error during training (neuclip/error_study/tracking.py): does not change the run.
    "error": {
        "every": 0,  # steps between measurements (and the last step); 0 = off
        "anchors": 1024,  # fixed random anchor subset whose exact alpha* is computed
        "shards": None,  # embed only the first N training shards (null = all; fewer biases alpha* low)
        "batch_size": 256,  # embedding batch size
    },
    "launcher": {
        "executor": "inprocess",
        "nodes": 1,
        "gpus_per_node": None,  # null = 0 on local/debug, the site default on slurm
        "gpu_type": None,  # slurm: --gpus-per-node=TYPE:N
        "tasks_per_node": None,  # null = gpus_per_node (one process per GPU), at least 1
        "cpus_per_task": None,
        "mem_gb": None,
        "timeout_min": None,  # job time limit (slurm: rounded up to whole minutes)
        "signal_delay_s": None,  # USR2 this long before the limit (submitit default: 90 slurm, 30 local)
        "partition": None,
        "account": None,
        "qos": None,
        "slurm_additional_parameters": {},  # extra sbatch options, e.g. {constraint: h100}
        "max_num_timeout": None,  # requeues allowed after timeouts/preemptions
        "site": None,  # YAML of site defaults (e.g. slurm/site.yaml)
    },
    # Free-form labels the report groups runs by (experiment, dataset, method, variant, seed, scale); the
    # Snakemake workflow fills them. They do not change training.
    "meta": {},
}

FREE_FORM = {("method", "options"), ("method", "common_options"), ("launcher", "slurm_additional_parameters"),
             ("meta",)}
SITE_KEYS = {
    "partition",
    "account",
    "qos",
    "gpu_type",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "time_min",
    "max_num_timeout",
    "additional_parameters",
}
# Keys whose change makes an existing run's checkpoints meaningless; a rerun that changes them is refused.
IDENTITY_KEYS = [
    "seed",
    "model",
    "data.train_shards",
    "data.train_num_samples",
    "data.data_size",
    "data.shuffle_buffer",
    "method.name",
    "method.options",
    "method.common_options",
    "train.global_batch_size",
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.weight_decay",
    "train.warmup_steps",
    "train.betas",
    "train.eps",
    "train.grad_clip",
]


class ConfigError(ValueError):
    """A config problem, with the key at fault in the message."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-8` as a float (PyYAML follows YAML 1.1, which needs `1.0e-8`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
        elif sub in FREE_FORM:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
            out[key] = copy.deepcopy(value)
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _sbatch_safe(where: str, value) -> None:
    """Values that end up in the sbatch script: no control characters (a newline would start a shell line)."""
    if isinstance(value, bool) or value is None or _is_num(value):
        return
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string or number, got {value!r}")
    if _CONTROL.search(value):
        raise ConfigError(f"{where} contains a control character (newline?): {value!r}")


def validate(cfg: dict) -> None:
    """Type and range checks; raises ConfigError naming the key."""

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key {key!r} {what}, got {get(cfg, key)!r}")

    need(cfg["run_dir"] is None or isinstance(cfg["run_dir"], str), "run_dir", "must be a path")
    need(_is_int(cfg["seed"]) and cfg["seed"] >= 0, "seed", "must be an integer >= 0")
    need(isinstance(cfg["model"], str) and cfg["model"] != "", "model", "must be an open_clip model name")
    d = cfg["data"]
    need(
        d["train_shards"] is None or isinstance(d["train_shards"], str),
        "data.train_shards",
        "must be a string",
    )
    for key in ("train_num_samples", "data_size"):
        need(d[key] is None or (_is_int(d[key]) and d[key] > 0), f"data.{key}", "must be a positive integer")
    need(_is_int(d["workers"]) and d["workers"] >= 0, "data.workers", "must be an integer >= 0")
    need(isinstance(d["skip_bad"], bool), "data.skip_bad", "must be true or false")
    need(
        _is_int(d["shuffle_buffer"]) and d["shuffle_buffer"] >= 0,
        "data.shuffle_buffer",
        "must be an integer >= 0",
    )
    need(
        isinstance(cfg["method"]["name"], str), "method.name", "must be a method name (see `neuclip methods`)"
    )
    t = cfg["train"]
    need(
        _is_int(t["global_batch_size"]) and t["global_batch_size"] >= 2,
        "train.global_batch_size",
        "must be an integer >= 2",
    )
    need(_is_num(t["epochs"]) and t["epochs"] > 0, "train.epochs", "must be a number > 0")
    need(
        t["max_steps"] is None or (_is_int(t["max_steps"]) and t["max_steps"] > 0),
        "train.max_steps",
        "must be a positive integer or null",
    )
    need(_is_num(t["lr"]) and t["lr"] >= 0, "train.lr", "must be a number >= 0")
    need(_is_num(t["weight_decay"]) and t["weight_decay"] >= 0, "train.weight_decay", "must be a number >= 0")
    need(
        _is_int(t["warmup_steps"]) and t["warmup_steps"] >= 0, "train.warmup_steps", "must be an integer >= 0"
    )
    need(
        isinstance(t["betas"], (list, tuple))
        and len(t["betas"]) == 2
        and all(_is_num(b) and 0 <= b < 1 for b in t["betas"]),
        "train.betas",
        "must be two numbers in [0, 1)",
    )
    need(_is_num(t["eps"]) and t["eps"] > 0, "train.eps", "must be a number > 0")
    need(
        t["grad_clip"] is None or (_is_num(t["grad_clip"]) and t["grad_clip"] >= 0),
        "train.grad_clip",
        "must be a number >= 0 or null",
    )
    need(t["precision"] in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}")
    need(t["device"] in DEVICES, "train.device", f"must be one of {', '.join(DEVICES)}")
    for key in ("checkpoint_every", "keep_last", "log_every"):
        need(_is_int(t[key]) and t[key] >= 1, f"train.{key}", "must be an integer >= 1")
    need(
        t["threads"] is None or (_is_int(t["threads"]) and t["threads"] >= 1),
        "train.threads",
        "must be an integer >= 1 or null",
    )
    e = cfg["error"]
    need(_is_int(e["every"]) and e["every"] >= 0, "error.every", "must be an integer >= 0 (0 = off)")
    need(_is_int(e["anchors"]) and e["anchors"] >= 1, "error.anchors", "must be an integer >= 1")
    need(e["shards"] is None or (_is_int(e["shards"]) and e["shards"] >= 1), "error.shards",
         "must be an integer >= 1 or null")
    need(_is_int(e["batch_size"]) and e["batch_size"] >= 1, "error.batch_size", "must be an integer >= 1")
    la = cfg["launcher"]
    need(la["executor"] in EXECUTORS, "launcher.executor", f"must be one of {', '.join(EXECUTORS)}")
    for key in (
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "max_num_timeout",
        "signal_delay_s",
    ):
        lo = 0 if key in ("gpus_per_node", "max_num_timeout", "signal_delay_s") else 1
        need(
            la[key] is None or (_is_int(la[key]) and la[key] >= lo),
            f"launcher.{key}",
            f"must be an integer >= {lo} or null",
        )
    for key in ("mem_gb", "timeout_min"):
        need(la[key] is None or (_is_num(la[key]) and la[key] > 0), f"launcher.{key}", "must be a number > 0")
    for key in ("partition", "account", "qos", "gpu_type", "site"):
        need(la[key] is None or isinstance(la[key], str), f"launcher.{key}", "must be a string or null")
        _sbatch_safe(f"launcher.{key}", la[key])
    for key, value in la["slurm_additional_parameters"].items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(key)):
            raise ConfigError(f"launcher.slurm_additional_parameters: bad sbatch option name {key!r}")
        _sbatch_safe(f"launcher.slurm_additional_parameters.{key}", value)


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def load_site(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"launcher.site: no such file {path}")
    site = yaml_load(path.read_text()) or {}
    if not isinstance(site, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(site) - SITE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown site key(s) {unknown}; allowed: {', '.join(sorted(SITE_KEYS))}")
    for key in ("partition", "account", "qos", "gpu_type"):
        _sbatch_safe(f"{path}: {key}", site.get(key))
    for key, value in (site.get("additional_parameters") or {}).items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(key)):
            raise ConfigError(f"{path}: additional_parameters: bad sbatch option name {key!r}")
        _sbatch_safe(f"{path}: additional_parameters.{key}", value)
    return site


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
    """Absolute paths, site defaults merged into `launcher`, sample counts filled in."""
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
    if d["data_size"] is None:
        d["data_size"] = d["train_num_samples"]
    if d["train_num_samples"] < cfg["train"]["global_batch_size"]:
        raise ConfigError(
            f"data.train_num_samples ({d['train_num_samples']}) is smaller than "
            f"train.global_batch_size ({cfg['train']['global_batch_size']})"
        )
    apply_site(cfg["launcher"], base)
    validate(cfg)
    return cfg


def apply_site(la: dict, base: Path) -> None:
    """Merge launcher.site's defaults into the launcher section (in place): the config's own values win."""
    if not la["site"]:
        return
    site_path = Path(la["site"])
    if not site_path.is_absolute():
        site_path = base.resolve() / site_path
    la["site"] = str(site_path)
    site = load_site(site_path)
    for key in sorted(SITE_KEYS - {"time_min", "additional_parameters"}):  # same names in both files
        if la[key] is None and site.get(key) is not None:
            la[key] = site[key]
    if la["timeout_min"] is None and site.get("time_min") is not None:
        la["timeout_min"] = site["time_min"]
    la["slurm_additional_parameters"] = {
        **(site.get("additional_parameters") or {}),
        **la["slurm_additional_parameters"],
    }


def world_size(la: dict) -> int:
    """Training processes of a (site-merged) launcher section: inprocess is one process; otherwise nodes x
    tasks per node, where tasks default to one per GPU (the launcher's rule)."""
    if la["executor"] == "inprocess":
        return 1
    tasks = la["tasks_per_node"] or max(1, la["gpus_per_node"] or 0)
    return int(la["nodes"]) * int(tasks)


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
