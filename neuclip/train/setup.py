"""Building a run's parts from its resolved config: the step geometry, the open_clip model with its
transforms, the estimator, the optimiser, the error tracker and the data loader.

`make_loader` is the one place the trainer constructs its data pipeline; what the loop needs from the
result is `next_batch()`, `bad_counts()`, `positions` (per-slot reading positions, saved in checkpoints)
and `close()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuclip.error_study.tracking import ErrorTracker, TrackingContext
from neuclip.train.config import ConfigError
from neuclip.train.data import Loader, TrainStream
from neuclip.train.optim import build_optimizer
from neuclip.train.runtime import Process


@dataclass(frozen=True)
class Geometry:
    """How the run's samples divide into steps, and the steps into reader slots."""

    batch: int  # train.global_batch_size
    num_slots: int  # world size x max(1, data.workers): the data's independent reading positions
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: dict, world: int) -> Geometry:
        t, d = cfg["train"], cfg["data"]
        batch, workers = t["global_batch_size"], max(1, d["workers"])
        num_slots = world * workers
        if batch % num_slots:
            raise ConfigError(
                f"train.global_batch_size ({batch}) must be divisible by world size x "
                f"max(1, data.workers) = {world} x {workers} = {num_slots}"
            )
        spe = max(1, d["train_num_samples"] // batch)
        total = int(t["max_steps"]) if t["max_steps"] is not None else max(1, round(t["epochs"] * spe))
        return cls(batch, num_slots, spe, total)


@dataclass
class Parts:
    """What the loop trains and checkpoints, and the model's input side."""

    model: torch.nn.Module  # the open_clip model itself (never the DDP wrapper)
    estimator: torch.nn.Module
    optimizer: torch.optim.Optimizer
    embed_dim: int
    train_transform: object
    eval_transform: object
    tokenizer: object


def _embed_dim(model, model_name: str) -> int:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    return int(model.visual.output_dim)


def build_parts(cfg: dict, geo: Geometry, device: torch.device) -> Parts:
    """Model, estimator and optimiser, freshly initialised from the global seed (set by the caller)."""
    from neuclip.estimators.base import EstimatorContext
    from neuclip.estimators.registry import build_estimator  # looked up per call: tests substitute it
    from neuclip.export import create_model

    model, train_tf, eval_tf, tokenizer = create_model(cfg["model"], device=device)
    for name in ("logit_scale", "logit_bias"):  # the estimator owns the temperature (and SigLIP's bias)
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad_(False)
    ctx = EstimatorContext(
        embed_dim=_embed_dim(model, cfg["model"]),
        data_size=cfg["data"]["data_size"],
        total_epochs=geo.total_steps / geo.steps_per_epoch,
        total_steps=geo.total_steps,
        steps_per_epoch=geo.steps_per_epoch,
    )
    m = cfg["method"]
    estimator = build_estimator(m["name"], m["options"], ctx, common=m.get("common_options")).to(device)
    optimizer = build_optimizer(model, estimator, cfg["train"])
    return Parts(model, estimator, optimizer, ctx.embed_dim, train_tf, eval_tf, tokenizer)


def make_tracker(cfg: dict, parts: Parts, shards: list[str], proc: Process, bf16: bool) -> ErrorTracker:
    e, run_dir = cfg["error"], cfg["run_dir"]
    ctx = TrackingContext(
        run_dir=run_dir,
        method=cfg["method"]["name"],
        every=e["every"],
        anchors=e["anchors"],
        embed_batch=e["batch_size"],
        shards=shards[: e["shards"]] if e["shards"] else shards,
        train_batch=cfg["train"]["global_batch_size"],
        seed=cfg["seed"],
        workers=cfg["data"]["workers"],
        skip_bad=cfg["data"]["skip_bad"],
        rank=proc.rank,
        world=proc.world,
        device=proc.device,
        bf16=bf16,
        embed_dim=parts.embed_dim,
        transform=parts.eval_transform,
        tokenizer=parts.tokenizer,
    )
    return ErrorTracker(ctx, parts.estimator)


def make_loader(cfg: dict, shards: list[str], proc: Process, geo: Geometry, positions: list[dict], parts: Parts):
    """The training batches of this rank, continuing from `positions` (one per slot)."""
    d = cfg["data"]
    stream = TrainStream(
        shards,
        seed=cfg["seed"],
        rank=proc.rank,
        world_size=proc.world,
        workers=d["workers"],
        chunk_size=geo.batch // geo.num_slots,
        positions=positions,
        shuffle_buffer=d["shuffle_buffer"],
        skip_bad=d["skip_bad"],
        transform=parts.train_transform,
        tokenizer=parts.tokenizer,
    )
    return Loader(stream, pin_memory=proc.device.type == "cuda")


def wrap_ddp(model: torch.nn.Module, proc: Process) -> torch.nn.Module:
    """What the step calls: DistributedDataParallel(model) under a process group, else the model."""
    if proc.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
        broadcast_buffers=False,
    )
