"""The experiment grid behind the Snakefile: which runs exist and the exact `neuclip train` config of each.

Kept in the package (not in the .smk files) so it is linted, unit-tested and usable from Python. A run is
(dataset, method, variant, seed); `variant` is "default" or an ablation label. Paths:

    <runs_dir>/<experiment>/<dataset>/<method>/<variant>/seed<seed>/          the training run folder
        done.json, model/, eval/<suite>/summary.json, ...
    <runs_dir>/<experiment>/configs/<dataset>/<method>/<variant>/seed<seed>.yaml   its train config
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from neuclip.data.keys import contiguous_rows, key_space
from neuclip.grid.launcher import DEFINITIONS, LAUNCHER, RESOURCE_KEYS, check_keys, launcher_section
from neuclip.train.config import DEFAULTS, IDENTITY_KEYS, _merge, get, run_settings
from neuclip.yamlio import yaml_load

REPO = Path(__file__).resolve().parents[2]
REGISTRY = REPO / "workflows" / "datasets.yaml"


@dataclass(frozen=True)
class Run:
    dataset: str
    method: str
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/{self.variant}/seed{self.seed}"


def deep_merge(base: dict, update: dict | None) -> dict:
    out = copy.deepcopy(base or {})
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def _registry_file() -> dict:
    return yaml_load(REGISTRY.read_text())


def registry(config: dict) -> dict:
    """The data-set registry with this config's site overrides applied."""
    reg = copy.deepcopy(_registry_file())
    for name, override in (config.get("dataset_overrides") or {}).items():
        if name not in reg:
            raise KeyError(f"dataset_overrides: unknown data set {name!r}; known: {', '.join(reg)}")
        reg[name] = deep_merge(reg[name], override)
    return reg


def experiment_dir(config: dict, kind: str = "runs") -> Path:
    return Path(config.get(f"{kind}_dir", kind)) / config["experiment"]


def synthetic_dir(config: dict, dataset: str) -> Path:
    """Where `neuclip data synth` writes a generated data set (shards, eval sets, manifest)."""
    return Path(config.get("data_root", "data")) / "synthetic" / config["experiment"] / dataset


def per_dataset(config: dict, dataset: str) -> dict:
    return (config.get("per_dataset") or {}).get(dataset) or {}


def seeds_for(config: dict, dataset: str) -> list[int]:
    return per_dataset(config, dataset).get("seeds", config.get("seeds", [0]))


def runs(config: dict, ablations: bool = True) -> list[Run]:
    cells = config.get("cells")  # optional: only these "dataset/method" pairs of the grid
    out = [
        Run(d, m, "default", s)
        for d in config.get("datasets", [])
        for m in config.get("methods", [])
        for s in seeds_for(config, d)
        if cells is None or f"{d}/{m}" in cells
    ]
    abl = config.get("ablations") or {}
    if ablations and abl:
        for d in abl.get("datasets", []):
            for label in abl.get("variants", {}):
                for s in abl.get("seeds", seeds_for(config, d)):
                    out.append(Run(d, abl.get("method", "neuclip"), label, s))
    return out


def ablation_runs(config: dict) -> list[Run]:
    return [r for r in runs(config) if r.variant != "default"]


def run_dir(config: dict, run: Run) -> Path:
    return experiment_dir(config) / run.dataset / run.method / run.variant / f"seed{run.seed}"


def eval_suites(config: dict, dataset: str) -> list[str]:
    suites = (config.get("eval") or {}).get("suites")
    return suites if suites else registry(config)[dataset].get("eval_suites", [])


def eval_data_root(config: dict, dataset: str) -> str:
    if registry(config)[dataset].get("generated"):
        return str(synthetic_dir(config, dataset))  # the tiny suite finds eval/wds_synth_* below it
    return str(config.get("eval_data_root", "data/eval"))


def data_marker(config: dict, dataset: str) -> Path:
    """The small file that says a data set is ready (generated, or checked when `check_data` is on)."""
    if registry(config)[dataset].get("generated"):
        return synthetic_dir(config, dataset) / "manifest.json"
    return experiment_dir(config) / "data" / f"{dataset}.ready"


def synthetic_data_size(config: dict) -> int:
    """The data_size `neuclip data synth` writes to its dataset.yaml for the config's `synthetic:` sizes (max
    img2dataset key + 1, neuclip/data/keys.py): known before the data is generated, for the preflight."""
    size = int(config["synthetic"]["shard_size"])  # required, as the data_synth rule passes it
    return key_space(contiguous_rows(int(config["synthetic"]["num_train"]), size), size)


def shards(config: dict, dataset: str) -> str:
    entry = registry(config)[dataset]
    if entry.get("generated"):
        n = int(config["synthetic"]["num_train"])
        size = int(config["synthetic"]["shard_size"])  # required, as the data_synth rule passes it
        last = (n + size - 1) // size - 1
        return str(synthetic_dir(config, dataset) / "train" / f"{{00000..{last:05d}}}.tar")
    pattern = entry["shards"]
    return pattern if Path(pattern).is_absolute() else str(Path(config.get("data_root", "data")) / pattern)


def method_options(config: dict, run: Run) -> tuple[dict, dict]:
    """(options, common): explicit per-method options (an unknown key is an error) and the shared knobs
    (rho, lr_tau, ...) that the trainer applies where the method has them. Kept apart so that building the
    grid never imports torch: a dry run of the paper grid stays fast."""
    ds = per_dataset(config, run.dataset)
    common = deep_merge(config.get("common_options") or {}, ds.get("common_options"))
    opts = deep_merge(
        (config.get("method_options") or {}).get(run.method), (ds.get("method_options") or {}).get(run.method)
    )
    if run.variant != "default":
        opts = deep_merge(opts, config["ablations"]["variants"][run.variant])
    common.setdefault("seed", run.seed)
    return opts, common


def train_config(config: dict, run: Run) -> dict:
    """The complete `neuclip train` config for one run."""
    ds = per_dataset(config, run.dataset)
    entry = registry(config)[run.dataset]
    if entry.get("generated"):
        num_samples, data_size = int(config["synthetic"]["num_train"]), synthetic_data_size(config)
        # a rehearsal asks for at least the real set's data_size / num_samples ratio
        data_size = max(data_size, int(entry.get("data_size") or 0))
    else:
        num_samples, data_size = entry.get("num_samples"), entry.get("data_size")
    return {
        "run_dir": str(run_dir(config, run)),
        "seed": run.seed,
        "model": ds.get("model", config.get("model", "tiny-vit")),
        "data": deep_merge(
            {"train_shards": shards(config, run.dataset), "train_num_samples": num_samples, "data_size": data_size},
            deep_merge(config.get("data_loader") or {}, ds.get("data_loader")),
        ),
        "method": dict(zip(("name", "options", "common_options"), (run.method, *method_options(config, run)))),
        "train": deep_merge(config.get("train") or {}, ds.get("train")),
        "error": deep_merge(config.get("error_tracking") or {}, ds.get("error_tracking")),
        "launcher": stage_launcher(config, "train", run.dataset),
        "meta": {
            "experiment": config["experiment"],
            "dataset": run.dataset,
            "method": run.method,
            "variant": run.variant,
            "seed": run.seed,
            "scale": config.get("scale", "paper"),
        },
    }


# -- per-stage launchers ------------------------------------------------------------------------------------
# Every stage that computes is a job of the one launcher (neuclip/jobs/launch.py). Its launcher section, lowest
# first: the key's default < slurm/site.yaml < `resources` < `per_dataset.<set>.resources` < the stage's
# shape below < `stages.<stage>`, all applied by stage_launcher (the first two through
# neuclip.grid.launcher.launcher_section). Keys: neuclip/grid/launcher.yaml.
STAGES = ("train", "eval", "error_run", "error_sweep")
STAGE_SHAPE = {
    "train": {},
    "eval": {"nodes": 1, "gpus_per_node": 1, "tasks_per_node": 1},  # one process on one GPU
    # the training cell's allocation (sized to its data set in per_dataset): the error pass embeds the same
    # data with the same model; neuclip/jobs/launch.py run_error says which ranks work
    "error_run": {},
    "error_sweep": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1},  # CPU only; cpus_per_task = its jobs
}


def _site_path(config: dict) -> str | None:
    if not config.get("slurm_site"):
        return None
    site = Path(config["slurm_site"])
    if not site.is_absolute() and not site.exists() and (REPO / site).exists():
        site = REPO / site  # the profile names it relative to the repo; snakemake may run elsewhere
    return str(site)


def sweep_config(config: dict) -> dict:
    """The error sweep's config file content: the config's error_study section but its `jobs` (a setting)."""
    return {k: v for k, v in (config.get("error_study") or {}).items() if k != "jobs"}


def sweep_jobs(config: dict) -> int:
    return int((config.get("error_study") or {}).get("jobs") or 2)


def stage_launcher(config: dict, stage: str, dataset: str | None = None) -> dict:
    """The complete launcher section of `stage`'s job for a cell of `dataset` (None: a stage of the whole
    experiment): the one place every layer of the precedence above is applied. The job receives exactly this
    (`launcher={...}` or `--launcher`), the preflight and the rehearsal size the same section."""
    ds = per_dataset(config, dataset) if dataset else {}
    la = deep_merge(deep_merge(config.get("resources") or {}, ds.get("resources")), STAGE_SHAPE[stage])
    if stage == "error_sweep":
        la["cpus_per_task"] = sweep_jobs(config)
    la = deep_merge(la, (config.get("stages") or {}).get(stage))
    la["executor"] = config.get("launcher", "inprocess")
    if _site_path(config):
        la["site"] = _site_path(config)
    return launcher_section(la, where=f"the {stage} stage's resources")


# -- what reruns a job -----------------------------------------------------------------------------------
# Snakemake reruns a job when a rule's params change. The rules' params carry a job's identity; its run
# settings (resources, launcher, loader workers, intervals, eval batch size) reach the command as Untracked
# values, which Snakemake's params trigger skips, so changing them never reruns finished work.


class Untracked:
    """A value for a rule's shell command that is not part of the job's identity. Snakemake records a param for
    its rerun trigger only if it is a builtin value (snakemake.persistence `_serialize_param`: str, int, dict,
    ...; anything else is UNREPRESENTABLE and skipped), so this wrapper reaches `{params.x}` (through str())
    without making a changed value rerun the job. tests/test_pipeline.py checks it with a real dry run."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Untracked({self.text!r})"


def yaml_text(value) -> Untracked:
    """A config file's text for a rule that writes it (untracked: the rule's own params say what is tracked)."""
    return Untracked(yaml.safe_dump(value, sort_keys=False))


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _full(config: dict, run: Run) -> dict:
    return _merge(copy.deepcopy(DEFAULTS), train_config(config, run))


def identity(config: dict, run: Run) -> dict:
    """The run's identity keys and values (neuclip.train.config.IDENTITY_KEYS, defaults filled): the train
    rules' params, so exactly these rerun a cell."""
    cfg = _full(config, run)
    return {key: get(cfg, key) for key in IDENTITY_KEYS}


def config_file(config: dict, run: Run) -> dict:
    """What the train_config rule writes: the cell's train config without its run settings. Those (the
    launcher's resources, loader workers, intervals) travel one channel only, `train_settings`, as overrides
    current at run time: a value written in the file could disagree with them."""

    cfg = train_config(config, run)
    for section, values in run_settings(_full(config, run)).items():
        kept = {k: v for k, v in (cfg.get(section) or {}).items() if k not in values}
        if kept:
            cfg[section] = kept
        else:
            cfg.pop(section, None)
    return cfg


def train_settings(config: dict, run: Run) -> Untracked:
    """The run settings as `neuclip train` overrides (`launcher={...}` ...): passed at run time, so a cell
    that (re)trains uses the current ones even when its config file was written before they changed."""
    import shlex


    parts = [f"{section}={_flow(values)}" for section, values in run_settings(_full(config, run)).items()]
    return Untracked(" ".join(shlex.quote(p) for p in parts))


def stage_settings(config: dict, stage: str, dataset: str | None = None, **options) -> Untracked:
    """`--OPTION VALUE ... --launcher '{...}'` for a stage command: its run settings, untracked."""
    import shlex

    words = []
    for key, value in options.items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    words += ["--launcher", _flow(stage_launcher(config, stage, dataset))]
    return Untracked(" ".join(shlex.quote(w) for w in words))


SCHEMA = REPO / "workflows" / "schema.yaml"


def schema() -> dict:
    """The experiment schema with its enums filled from the registries: methods from the estimator classes,
    data sets from datasets.yaml (workflows/schema.yaml leaves them empty, so no list is written twice)."""
    from neuclip.estimators.registry import METHOD_NAME, method_names

    doc = yaml_load(SCHEMA.read_text())
    doc["definitions"]["method"]["enum"] = method_names()
    doc["properties"]["cells"]["items"]["pattern"] = f"^[A-Za-z0-9_]+/{METHOD_NAME}$"
    doc["definitions"]["dataset"]["enum"] = list(_registry_file())
    # resources: the launcher keys (one table, neuclip/grid/launcher.yaml), but executor and site
    for name in ("safe_string", "positive_int_or_null"):
        doc["definitions"][name] = DEFINITIONS[name]
    doc["definitions"]["resources"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {k: {key: v for key, v in LAUNCHER[k].items() if key != "default"} for k in RESOURCE_KEYS},
    }
    return doc


def validate_config(config: dict) -> None:
    """Schema validation (snakemake.utils.validate, which also fills defaults), preceded by a check that
    names unknown top-level keys together with the allowed ones (jsonschema only says "unexpected")."""
    import tempfile

    from snakemake.utils import validate


    doc = schema()
    unknown = sorted(set(config) - set(doc["properties"]))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(doc['properties']))}")
    sections = {"resources": config.get("resources")}
    sections.update({f"per_dataset.{d}.resources": (v or {}).get("resources")
                     for d, v in (config.get("per_dataset") or {}).items()})
    sections.update({f"stages.{s}": v for s, v in (config.get("stages") or {}).items()})
    for where, section in sections.items():
        if isinstance(section, dict):  # old spellings get their new name; the schema checks the rest
            check_keys(section, RESOURCE_KEYS, f"experiment config {where}", "resource key")
    with tempfile.TemporaryDirectory() as tmp:  # snakemake's validate takes a file
        path = Path(tmp) / "schema.yaml"
        path.write_text(yaml.safe_dump(doc))
        validate(config, str(path))
