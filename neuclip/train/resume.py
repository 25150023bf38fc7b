"""The trainer's state in a checkpoint and back: everything a bit-identical continuation needs.

A checkpoint (format 2) holds the model, optimiser and estimator state dicts, every rank's RNG states,
the data position (neuclip/train/data.py `TrainLoader.state`: the next step, and what the order depends
on, checked on resume), the schedule's position, the config it was written with and the training wall time
so far. Format 1 (the earlier slot-based loader, whose order depended on the worker count) is refused with
a message: its data order cannot be continued. Files and their atomic writing are neuclip/train/checkpoint.py's
business.
"""

from __future__ import annotations

import sys
from pathlib import Path

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
            "estimator": parts.estimator.state_dict(),
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
    found = ckpt.load_latest(ckpt_dir)
    if found is None:
        return 0, 0, 0.0
    path, state = found
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
