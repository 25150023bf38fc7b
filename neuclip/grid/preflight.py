"""Check every cell of an experiment before anything is queued (run by the Snakefile when the DAG is built).

For each run of the grid, the job's own config is built exactly as the job will see it (neuclip.grid.workflow's
train config, launcher.site merged, the world size the launcher will start) and put through the start-up
checks the trainer makes: the train-config schema, the batch geometry (neuclip.train.setup.Geometry, the
trainer's own code), the method's options and sizes (the estimator's own declaration), a known model, and the
per-node host memory that per-sample state needs against `mem_gb`. Under the SLURM launcher, every stage's
request (train, eval, error pass, sweep) is also compared with the nodes of the cluster the Snakefile submits
to, where `sinfo` answers (neuclip/grid/cluster_fit.py): a request no node can hold would pend for ever.
Nothing here reads the shards: they may live only on the cluster's file system. A data set registered
without a data_size takes it, as the trainer does, from the dataset.yaml beside its shards when that file is
here (neuclip/data/keys.py).

A failing cell fails `snakemake -n` with one line per problem, each naming the cell and the key to change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import neuclip.grid.workflow as wf
from neuclip.data.keys import declared_data_size
from neuclip.data.shards import expand_pattern
from neuclip.grid.cluster_fit import misfit
from neuclip.grid.launcher import world_size
from neuclip.train.config import DEFAULTS, ConfigError, _merge, validate

GIB = 1024**3


class PreflightError(ValueError):
    """One or more cells would stop at start-up; the message lists each cell, its key and the fix."""


@dataclass
class CellPlan:
    cell: str
    world: int
    steps: int
    state_gib_per_rank: float
    state_gib_total: float  # summed over ranks once (what the checkpoint's files hold)
    warnings: list[str]
    cfg: dict  # the cell's train config as the job will see it (site merged)
    options: dict  # the method's resolved options (its own over common_options over its defaults)


def _known_models() -> set[str]:
    import open_clip

    from neuclip.export import register_model_configs

    register_model_configs()
    return set(open_clip.list_models())


def check_cell(config: dict, run, models: set[str] | None = None) -> CellPlan:
    """Raise ConfigError/OptionError (naming the key) if this cell's job would stop at start-up."""
    from neuclip.estimators.base import EstimatorContext
    from neuclip.estimators.registry import check_method, estimator_class
    from neuclip.train.setup import Geometry

    cfg = _merge(copy.deepcopy(DEFAULTS), wf.train_config(config, run))
    validate(cfg)  # its launcher section is complete (site merged): neuclip.grid.workflow.stage_launcher
    d = cfg["data"]
    if d["train_num_samples"] is None:
        raise ConfigError(f"data set {run.dataset!r} has no num_samples in workflows/datasets.yaml: set it "
                          "(or dataset_overrides in the experiment config)")
    warnings = []
    if d["data_size"] is None:  # the trainer takes it from beside the shards: dataset.yaml, else their index

        try:
            declared = declared_data_size(expand_pattern(d["train_shards"]))
        except ValueError as err:
            raise ConfigError(f"data set {run.dataset!r}: {err}") from None
        if declared is not None:
            d["data_size"] = declared[0]
        else:  # the shards may not be here (nothing here reads them): the sample count is a lower bound
            d["data_size"] = d["train_num_samples"]
            warnings.append(f"data set {run.dataset!r} has no data_size (max sample id + 1) in workflows/datasets.yaml "
                            "and no dataset.yaml beside its shards here: per-sample state was sized for num_samples, "
                            "a lower bound (the trainer takes max id + 1 from the shards' index); set data_size")
    if d["train_num_samples"] < cfg["train"]["global_batch_size"]:
        raise ConfigError(f"train.global_batch_size ({cfg['train']['global_batch_size']}) exceeds the data set's "
                          f"{d['train_num_samples']} samples")
    world = world_size(cfg["launcher"])
    geo = Geometry.of(cfg, world)
    if models is not None and cfg["model"] not in models:
        raise ConfigError(f"model {cfg['model']!r} is not an open_clip model nor one in neuclip/model_configs")
    m = cfg["method"]
    ctx = EstimatorContext(embed_dim=1, data_size=d["data_size"], num_samples=d["train_num_samples"],
                           total_epochs=geo.total_steps / geo.steps_per_epoch,
                           total_steps=geo.total_steps, steps_per_epoch=geo.steps_per_epoch)
    options, method_warnings = check_method(m["name"], m["options"], m["common_options"], ctx, geo.batch)
    warnings += method_warnings
    cls = estimator_class(m["name"])
    state = cls.state_bytes(options, ctx, world)  # per rank: a 1/world share when sharded
    whole = cls.state_bytes(options, ctx, 1)
    la = cfg["launcher"]
    tasks = world // int(la["nodes"])
    # Every rank holds its state and, on resume, loads it (its own checkpoint shard) into host memory.
    need_gib = tasks * state / GIB
    sharded = options.get("state_placement") == "sharded"
    if la["mem_gb"] is not None and need_gib > la["mem_gb"]:
        fix = "raise resources.mem_gb for this data set" + (
            "" if sharded else ", or set common_options.state_placement: sharded (1/world of it per rank)")
        raise ConfigError(
            f"launcher.mem_gb ({la['mem_gb']}) is below the {need_gib:.0f} GiB that {m['name']}'s per-sample "
            f"state needs per node ({tasks} ranks x {state / GIB:.1f} GiB{' (sharded)' if sharded else ''} for "
            f"data_size {d['data_size']:,}): {fix}"
        )
    if world > 1 and not sharded and state > GIB:
        warnings = [*warnings, f"per-sample state is replicated: {state / GIB:.1f} GiB on every rank; "
                    f"state_placement: sharded would keep {state / world / GIB:.1f} GiB per rank"]
    return CellPlan(run.key, world, geo.total_steps, state / GIB, whole / GIB, warnings, cfg, options)


def preflight(config: dict, cluster=None) -> list[CellPlan]:
    """Check every cell; raise PreflightError listing all failing cells (each line: cell, key, fix). With
    `cluster` (neuclip.grid.cluster_fit.cluster_nodes(): the Snakefile passes the cluster it submits to), each
    stage's SLURM request is also checked against its nodes."""
    from neuclip.estimators.options import OptionError

    models = _known_models()
    failures, plans = [], []
    for run in wf.runs(config):
        try:
            plans.append(check_cell(config, run, models))
        except (ConfigError, OptionError) as err:
            failures.append(f"  cell {config['experiment']}/{run.key}: {err}")
    if failures:
        raise PreflightError(f"{len(failures)} cell(s) would stop at start-up:\n" + "\n".join(failures))
    misfits = _cluster_misfits(config, plans, cluster) if cluster else []
    if misfits:
        raise PreflightError(f"{len(misfits)} job request(s) no node of the cluster can hold:\n" + "\n".join(misfits))
    return plans


def _cluster_misfits(config: dict, plans: list[CellPlan], cluster) -> list[str]:
    """Under the SLURM launcher, each stage's request against the cluster's nodes (neuclip/grid/cluster_fit.py)."""
    if config.get("launcher") != "slurm":
        return []

    sections = {}  # (what, stage) -> launcher section; one check per distinct stage and data set
    for plan in plans:
        dataset = plan.cfg["meta"]["dataset"]
        sections.setdefault((f"cell {config['experiment']}/{plan.cell}", "train"), plan.cfg["launcher"])
        if wf.eval_suites(config, dataset):
            sections.setdefault((f"data set {dataset}", "eval"), wf.stage_launcher(config, "eval", dataset))
        sections.setdefault((f"data set {dataset}", "error_run"), wf.stage_launcher(config, "error_run", dataset))
    if config.get("error_study"):
        sections[(f"experiment {config['experiment']}", "error_sweep")] = wf.stage_launcher(config, "error_sweep")
    out, seen = [], set()
    for (what, stage), la in sections.items():
        why = misfit(la, cluster)
        if why and (stage, why) not in seen:
            seen.add((stage, why))
            out.append(f"  {what}, stage {stage}: {why}")
    return out


def print_warnings(plans: list[CellPlan]) -> None:
    """Warnings (runs that start, but not as one might expect) to stderr once per distinct message."""
    import sys

    seen = set()
    for plan in plans:
        for message in plan.warnings:
            if message not in seen:
                seen.add(message)
                print(f"neuclip preflight: warning ({plan.cell}): {message}", file=sys.stderr)
