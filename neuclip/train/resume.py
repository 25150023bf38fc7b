"""The trainer's state in a checkpoint and back: everything a bit-identical continuation needs.

A checkpoint (format 2) holds the model, optimiser and estimator state dicts, every rank's RNG states,
the data position (neuclip/train/data.py `TrainLoader.state`: the next step, and what the order depends
on, checked on resume), the schedule's position, the config it was written with and the training wall time
so far. Format 1 (the earlier slot-based loader, whose order depended on the worker count) is refused with
a message: its data order cannot be continued. Files and their atomic writing are neuclip/train/checkpoint.py's
business.

Per-sample state (the arrays of `Estimator.sharded_state()`) is not in the main file but in shard files beside
it: sharded across ranks (`state_placement: sharded`, neuclip/estimators/sharding.py), each rank writes its own
and, on resume, reads only its own (at the same world size) or, at another world size, re-cuts the old shards
one at a time into its new share (`estimator_state`); replicated, rank 0 writes the one whole copy. Shards are
read memory-mapped, so a resume never holds a second private copy of the state. The ranks agree on which
checkpoint they resume from, so a shard unreadable on one rank sends all back to an older one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from neuclip.estimators.sharding import IdShards, reshard
from neuclip.train import checkpoint as ckpt
from neuclip.train.config import ConfigError, identity_diff
from neuclip.train.data import TrainData, resume_point
from neuclip.train.runtime import Process
from neuclip.train.setup import Geometry, Parts

FORMAT = 2  # 2: the data entry is TrainLoader.state() (1: per-slot positions of the earlier loader)


def save(
    ckpt_dir: Path, step: int, cfg: dict, geo: Geometry, proc: Process, parts: Parts, loader, train_wall_s: float
) -> Path | None:
    """Collective: every rank contributes its RNG and data counts; rank 0 writes. Returns the path on rank 0."""
    rngs = proc.gather(ckpt.rng_state())
    data_state = loader.state()
    estimator = parts.estimator.state_dict()
    sharded = parts.estimator.sharded_state()
    if sharded is not None:  # the shards first: a main file is only ever written after all of its shards
        shard = {key: estimator.pop(key) for key in sharded.fills}
        if sharded.world > 1 or proc.rank == 0:  # replicated (world 1): every rank holds the same, rank 0 writes
            meta = {"rank": sharded.rank, "world": sharded.world, "data_size": sharded.data_size}
            ckpt.save_shard(ckpt_dir, step, sharded.rank, sharded.world,
                            {"format": FORMAT, "step": step, **meta, "estimator": shard})
        proc.barrier()
    path = None
    if proc.rank == 0:
        state = {
            "format": FORMAT,
            "step": step,
            "epoch": step / geo.steps_per_epoch,
            "config": cfg,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": {"step": step, "total_steps": geo.total_steps, "warmup_steps": cfg["train"]["warmup_steps"]},
            "estimator": estimator,
            "estimator_shards": None if sharded is None else {
                "world": sharded.world, "data_size": sharded.data_size, "fills": sharded.fills},
            "rng": rngs,
            "data": data_state,
            "world_size": proc.world,
            "train_wall_s": train_wall_s,
        }
        path = ckpt.save(ckpt_dir, step, state, cfg["train"]["keep_last"])
    proc.barrier()
    return path


def load(
    ckpt_dir: Path, cfg: dict, geo: Geometry, proc: Process, parts: Parts, data: TrainData
) -> tuple[int, int, float]:
    """Restore the newest readable checkpoint into `parts` and this process's RNGs.

    Returns (step, this rank's share of the undecodable-image count, training wall time so far); (0, 0, 0.0)
    without a checkpoint.
    """
    def complete(path: Path, state: dict) -> dict:  # this rank's estimator state, shards included
        return {**state, "estimator": estimator_state(path, state, parts.estimator)}

    unreadable: list[Path] = []
    found = ckpt.load_latest(ckpt_dir, complete=complete, agree=proc.all_ok, unreadable=unreadable)
    if found is None:
        return 0, 0, 0.0
    path, state = found
    if unreadable and proc.rank == 0:
        for moved in ckpt.set_aside(unreadable):
            print(f"neuclip train: set aside the unreadable {moved}", file=sys.stderr, flush=True)
    diff = identity_diff(state["config"], cfg)
    if diff:
        raise ConfigError(
            f"checkpoint {path} was written with a different config ({'; '.join(diff)}); use a new run_dir"
        )
    next_step, bad_decoded = resume_point(state["data"], data, proc.rank, f"checkpoint {path}")
    if next_step != state["step"]:
        raise ConfigError(f"checkpoint {path}: its data position (step {next_step}) is not its step {state['step']}")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.estimator.load_state_dict(state["estimator"])
    rngs = state["rng"]
    if len(rngs) != proc.world and proc.rank == 0:
        print(
            f"neuclip train: checkpoint has {len(rngs)} ranks' RNG states, this run {proc.world} ranks: "
            "the continuation will not be bit-identical",
            file=sys.stderr,
            flush=True,
        )
    ckpt.set_rng_state(rngs[proc.rank] if proc.rank < len(rngs) else rngs[0])
    if proc.rank == 0:
        print(f"neuclip train: resumed from {path} (step {state['step']})", file=sys.stderr, flush=True)
    return int(state["step"]), bad_decoded, float(state.get("train_wall_s", 0.0))


def estimator_state(path: Path, state: dict, estimator) -> dict:
    """The estimator's state_dict for *its* layout from checkpoint `path` (main file already read: `state`).

    Per-sample arrays come from the shard files beside it: this rank's own shard when the world size is the
    same, else every old shard in turn re-cut into this rank's share (neuclip/estimators/sharding.py `reshard`;
    any world size to any, one process included); or, from a checkpoint whose main file holds them whole (as
    before shard files), this rank's strided share of those."""
    out = dict(state["estimator"])
    info, mine = state.get("estimator_shards"), estimator.sharded_state()
    if info is None and mine is None:
        return out
    own = estimator.state_dict()
    keys = sorted((info or {}).get("fills", {}) or (mine.fills if mine else {}))
    n = int(info["data_size"]) if info else mine.data_size
    target = IdShards(mine.rank, mine.world, n) if mine else IdShards(0, 1, n)
    if info is None:  # whole arrays in the main file: take this rank's strided share
        return out | {key: out[key][target.rank :: target.world] for key in keys}  # load_state_dict copies
    folder, step, world = path.parent, int(state["step"]), int(info["world"])
    if target.world == world:
        shard = ckpt.load_shard(folder, step, target.rank, world)
        if (shard["rank"], shard["world"], shard["data_size"]) != (target.rank, world, n):
            raise ValueError(f"{ckpt.shard_path(folder, step, target.rank, world)} is the shard of another layout")
        return out | {key: shard["estimator"][key] for key in keys}  # memory-mapped; load_state_dict copies
    specs = {key: (own[key].dtype, info["fills"][key]) for key in keys}
    sources = [(IdShards(r, world, n), lambda r=r: ckpt.load_shard(folder, step, r, world)["estimator"])
               for r in range(world)]
    return out | reshard(target, specs, sources)
