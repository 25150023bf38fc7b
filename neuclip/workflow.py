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

REPO = Path(__file__).resolve().parent.parent
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
    return yaml.safe_load(REGISTRY.read_text())


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


def shards(config: dict, dataset: str) -> str:
    entry = registry(config)[dataset]
    if entry.get("generated"):
        n = int(config["synthetic"]["num_train"])
        size = int(config["synthetic"].get("shard_size", 1024))
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
    if entry.get("generated"):  # a rehearsal keeps the real set's data_size / num_samples ratio
        num_samples = int(config["synthetic"]["num_train"])
        data_size = int(entry.get("data_size") or num_samples)
    else:
        num_samples, data_size = entry.get("num_samples"), entry.get("data_size")
    launcher = deep_merge(config.get("resources") or {}, ds.get("resources"))
    launcher["executor"] = config.get("launcher", "inprocess")
    if config.get("slurm_site"):
        site = Path(config["slurm_site"])
        if not site.is_absolute() and not site.exists() and (REPO / site).exists():
            site = REPO / site  # the profile names it relative to the repo; snakemake may run elsewhere
        launcher["site"] = str(site)
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
        "launcher": launcher,
        "meta": {
            "experiment": config["experiment"],
            "dataset": run.dataset,
            "method": run.method,
            "variant": run.variant,
            "seed": run.seed,
            "scale": config.get("scale", "paper"),
        },
    }


SCHEMA = REPO / "workflows" / "schema.yaml"


def schema() -> dict:
    """The experiment schema with its enums filled from the registries: methods from the estimator classes,
    data sets from datasets.yaml (workflows/schema.yaml leaves them empty, so no list is written twice)."""
    from neuclip.estimators.registry import method_names

    doc = yaml.safe_load(SCHEMA.read_text())
    doc["definitions"]["method"]["enum"] = method_names()
    doc["definitions"]["dataset"]["enum"] = list(_registry_file())
    return doc


def load_experiment(paths: list[str | Path], **values) -> dict:
    """Experiment config files merged in order (as Snakemake merges several --configfile), `values` over them
    (as --config), validated, and shrunk when it asks for a rehearsal: what the Snakefile's workflow sees."""
    from neuclip.rehearsal import rehearse

    config: dict = {}
    for path in paths:
        config = deep_merge(config, yaml.safe_load(Path(path).read_text()) or {})
    config = deep_merge(config, values)
    validate_config(config)
    if config.get("rehearsal"):
        config = rehearse(config)
        validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Schema validation (snakemake.utils.validate, which also fills defaults), preceded by a check that
    names unknown top-level keys together with the allowed ones (jsonschema only says "unexpected")."""
    import tempfile

    from snakemake.utils import validate

    doc = schema()
    unknown = sorted(set(config) - set(doc["properties"]))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(doc['properties']))}")
    with tempfile.TemporaryDirectory() as tmp:  # snakemake's validate takes a file
        path = Path(tmp) / "schema.yaml"
        path.write_text(yaml.safe_dump(doc))
        validate(config, str(path))
