"""The rehearsal switch (big_vision's `runlocal`): an experiment's own grid and code path, with only sizes shrunk.

Add `rehearsal: {...}` to any experiment config, most simply as a second config file, which works together
with the SLURM profile (whose `config` list a command-line `--config` would replace):

    snakemake --profile slurm all --configfile workflows/configs/paper.yaml workflows/configs/rehearsal.yaml

What changes (sizes only): every data set becomes synthetic shards made by `neuclip data synth` with the
rehearsal's sample count, several shards, and a data_size at least as much larger than the samples present as
the real set's (max id + 1 over pairs present; the generator's img2dataset keys, gapped between shards, may
need more: neuclip.grid.workflow.synthetic_data_size); models become the tiny model of their family (RN* ->
tiny-cnn, with BatchNorm like RN50; ViT* -> tiny-vit); training runs `steps` steps at a global batch of at most
`global_batch_size`; checkpoints, logs and error tracking come every few steps; resources shrink to what the
test cluster has; evaluation runs the tiny suite; one seed. What does not change: the data sets, methods,
variants, per-data-set options, every method option, the launcher and the resource keys, the profile.
The runs go to runs/<experiment>_rehearsal/, labelled scale "rehearsal" (never compared with published numbers).
"""

from __future__ import annotations

import copy
import math

import neuclip.grid.workflow as wf
from neuclip.grid.launcher import world_size
from neuclip.grid.workflow import deep_merge, stage_launcher

DEFAULTS = {
    "synthetic": {"num_train": 384, "num_eval": 48, "seed": 0, "shard_size": 128, "image_size": 32},
    "steps": 6,
    "global_batch_size": 32,
    "nodes": 1,
    "gpus_per_node": 1,
    "cpus_per_task": 1,
    "mem_gb": 2,
    "timeout_min": 30,
    "workers": 1,
    "error_anchors": 128,
    "eval_suite": "tiny",
    "cells": "all",  # all | sample: every method on the first data set, one (rotating) method on each other
    "data_root": "data",  # where the synthetic stand-ins are written (relative: Snakemake's working directory)
}


def tiny_model(name: str) -> str:
    """The tiny model of a model's family."""
    if name.startswith("RN"):
        return "tiny-cnn"
    if name.startswith("ViT") or name.startswith("tiny-vit"):
        return "tiny-vit"
    return name


def _merge(base: dict | None, update: dict | None) -> dict:
    return deep_merge(base or {}, update or {})


def _cap(value, cap):
    return cap if value is None else min(value, cap)


def _shrink_resources(res: dict | None, r: dict) -> dict:
    res = dict(res or {})
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        if key in res or key in ("nodes", "mem_gb", "timeout_min"):
            res[key] = _cap(res.get(key), r[key])
    return res


def _shrink_train(train: dict, r: dict, world: int) -> dict:
    steps = int(r["steps"])
    batch = min(int(train.get("global_batch_size", 64)), int(r["global_batch_size"]))
    batch = max(world * 2, batch - batch % world)
    out = {
        **train,
        "global_batch_size": batch,
        "max_steps": steps,
        "warmup_steps": min(int(train.get("warmup_steps", 0)), steps // 3),
        "checkpoint_every": max(1, steps // 2),
        "log_every": 1,
        "threads": 1,
    }
    return out


def _shrink_error(err: dict | None, r: dict) -> dict:
    err = dict(err or {})
    if err.get("every"):
        err["every"] = max(1, int(r["steps"]) // 2)
    if "anchors" in err or err.get("every"):
        err["anchors"] = min(int(err.get("anchors", r["error_anchors"])), int(r["error_anchors"]))
    if "batch_size" in err:
        err["batch_size"] = min(int(err["batch_size"]), 64)
    err.pop("shards", None)
    return err


def _world(config: dict, dataset: str) -> int:
    """The shrunk config's train world size, as the launcher will start it (site defaults included)."""
    return world_size(stage_launcher(config, "train", dataset))


def _sampled_cells(datasets: list[str], methods: list[str]) -> list[str]:
    cells = [f"{datasets[0]}/{m}" for m in methods]
    cells += [f"{d}/{methods[i % len(methods)]}" for i, d in enumerate(datasets[1:], start=1)]
    return cells


def _shrink_sweep(sweep: dict | None, r: dict) -> dict | None:
    if not sweep:
        return sweep
    out = copy.deepcopy(sweep)
    sizes = sorted({min(int(n), 640) for n in out["grid"]["n"]})
    out["grid"] = {"n": sizes[:2], "batch_size": sorted(out["grid"]["batch_size"])[:1]}
    out["steps"] = min(int(out.get("steps", 50)), 50)
    out["measure_at"] = [out["steps"]]
    out["seeds"] = (out.get("seeds") or [0])[:1]
    out["run"] = {**(out.get("run") or {}), "anchors": min(int((out.get("run") or {}).get("anchors", 128)), 128)}
    return out


def rehearse(config: dict) -> dict:
    """The shrunk config when `config` asks for a rehearsal, else `config` unchanged."""
    if not config.get("rehearsal"):
        return config

    given = config["rehearsal"] if isinstance(config["rehearsal"], dict) else {}
    r = {**DEFAULTS, **given, "synthetic": {**DEFAULTS["synthetic"], **(given.get("synthetic") or {})}}
    c = copy.deepcopy(config)
    c["experiment"] = f"{config['experiment']}_rehearsal"
    c["scale"] = "rehearsal"
    c["synthetic"] = r["synthetic"]
    c["data_root"] = r["data_root"]
    abl = c.get("ablations") or {}
    datasets = list(dict.fromkeys([*c.get("datasets", []), *abl.get("datasets", [])]))
    reg = wf.registry(config)
    n = int(r["synthetic"]["num_train"])
    overrides = {}
    for d in datasets:
        entry = reg[d]
        ratio = (entry.get("data_size") or n) / (entry.get("num_samples") or n) if not entry.get("generated") else 1
        overrides[d] = {"generated": True, "eval_suites": [r["eval_suite"]], "data_size": math.ceil(n * ratio),
                        "num_samples": n}
    c["dataset_overrides"] = _merge(c.get("dataset_overrides"), overrides)
    c["model"] = tiny_model(c.get("model", "tiny-vit"))
    c["resources"] = _shrink_resources(c.get("resources"), r)
    if c.get("stages"):  # the same caps on each stage's own resources (the same keys, one table)
        c["stages"] = {stage: _shrink_resources(res, r) for stage, res in c["stages"].items()}
    c["data_loader"] = {**(c.get("data_loader") or {})}
    if "workers" in c["data_loader"]:
        c["data_loader"]["workers"] = min(int(c["data_loader"]["workers"]), int(r["workers"]))
    c["error_tracking"] = _shrink_error(c.get("error_tracking"), r)
    per = c.setdefault("per_dataset", {}) or {}
    c["per_dataset"] = per
    first_seed = (c.get("seeds") or [0])[:1]
    c["seeds"] = first_seed
    for d in datasets:
        ds = per.setdefault(d, {})
        if "model" in ds:
            ds["model"] = tiny_model(ds["model"])
        if "resources" in ds:
            ds["resources"] = _shrink_resources(ds["resources"], r)
        if "error_tracking" in ds:
            ds["error_tracking"] = _shrink_error(ds["error_tracking"], r)
        if "seeds" in ds:
            ds["seeds"] = ds["seeds"][:1]
        if "data_loader" in ds and "workers" in ds["data_loader"]:
            ds["data_loader"] = {**ds["data_loader"], "workers": min(int(ds["data_loader"]["workers"]), r["workers"])}
        ds["train"] = _shrink_train(_merge(c.get("train"), ds.get("train")), r, _world(c, d))
    c["eval"] = {**(c.get("eval") or {}), "suites": None}
    for key, cap in (("batch_size", 64), ("workers", 1)):
        if key in c["eval"]:
            c["eval"][key] = min(int(c["eval"][key]), cap)
    if abl:
        c["ablations"] = {**abl, "seeds": (abl.get("seeds") or first_seed)[:1]}
    c["error_study"] = _shrink_sweep(c.get("error_study"), r)
    if r["cells"] == "sample" and c.get("datasets") and c.get("methods"):
        c["cells"] = _sampled_cells(c["datasets"], c["methods"])
    c.pop("rehearsal")
    return c
